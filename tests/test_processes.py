"""`leafmail serve` as a tree of processes, run for real as root (as CI runs).

The parent stays root; the smtpd workers and the queue manager, which read what the
network sends, run as the `leafmail` user (.ci/run creates it); local delivery is a
root-side service. Each test reads /proc for the facts (uids, which process holds a
connection) and waits on the product's own signals (READY, its log lines, pidfds) with
bounded deadlines, never on sleeps.
"""

from __future__ import annotations

import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from leafmail_fixtures import (
    IO_TIMEOUT,
    Leafmail,
    LeafmailFactory,
    RawSMTP,
    clean_env,
    leafmail_command,
    leafmail_servers,
    run_flush,
    smtp_client,
    smtplib_send,
    toml_string,
    write_config,
)
from lifecycle_handlers import descendants, holds_socket
from localusers import remove_scratch, scratch
from smarthost import Smarthost
from system_users import as_user_seeing, ensure_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation needs root")

DEADLINE = 15.0


def _daemon_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("leafmail")
    except KeyError:
        pytest.skip("no leafmail user (.ci/run creates it)")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)
    remove_scratch()  # local_config's mail directories, once the daemons have stopped


def roles(server: Leafmail) -> dict[str, list[int]]:
    """Pids by role, from the parent's "processes ready" log line."""
    line = next(x for x in server.log().splitlines() if "processes ready" in x)
    found = {}
    for role in ("smtpd", "qmgr", "local"):
        match = re.search(rf'{role}="?([0-9 ]*)"?', line)
        found[role] = [int(p) for p in match[1].split()] if match else []
    return found


def ids(pid: int) -> tuple[set[int], set[int]]:
    """The real, effective, saved and filesystem uids and gids of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1:]
    gids = next(x for x in status.splitlines() if x.startswith("Gid:")).split()[1:]
    return {int(u) for u in uids}, {int(g) for g in gids}


def wait_for(what: str, condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll a condition the product gives no signal for, within a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_gone(pids: list[int], timeout: float = DEADLINE) -> list[int]:
    """Wait (on pidfds) until every process in `pids` has exited; returns those left."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(fds), [], [], deadline - time.monotonic())
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def local_config(tmp_path: Path, *, extra: str = "") -> str:
    """Local delivery for mx.test: alice's Maildir under tmp_path/mail.

    alice has no account, so she is written as [local] virtual_user (the daemon's user
    by default): tmp_path/mail points to a directory of that user's, since pytest's
    tmp_path is closed to other users.
    """
    mail = tmp_path / "mail"
    if not mail.exists():
        mail.symlink_to(scratch(_daemon_user(), mode=0o700))
    mail = mail.resolve()
    return (
        '[relay]\nlocal_domains = ["mx.test"]\n'
        f'[local]\nusers = ["alice"]\npath = {toml_string(str(mail / "{user}"))}\n'
        f"{extra}"
    )


def test_no_process_that_reads_the_network_is_root(
    servers: LeafmailFactory, tmp_path: Path
) -> None:
    user = _daemon_user()
    # The check pool only sees mail from outside relay_networks (loopback is inside).
    checked = '[process]\nworkers = 2\n[checks]\nrfc5322 = "tag"\n'
    config = local_config(tmp_path, extra=checked)
    server = servers(config.replace("[relay]\n", "[relay]\nrelay_networks = []\n", 1))
    found = roles(server)
    assert len(found["smtpd"]) == 2 and len(found["qmgr"]) == 1 and len(found["local"]) == 1
    tree = descendants(server.proc.pid)
    assert sorted(tree) == sorted(found["smtpd"] + found["qmgr"] + found["local"])
    for pid in found["smtpd"] + found["qmgr"]:
        uids, gids = ids(pid)
        assert uids == {user.pw_uid} and gids == {user.pw_gid}, (pid, uids, gids)
        groups = Path(f"/proc/{pid}/status").read_text().split("Groups:")[1].split("\n")[0]
        assert {int(g) for g in groups.split()} <= {user.pw_gid}, groups
    assert ids(found["local"][0])[0] == {0}  # becomes each recipient per delivery
    spool = os.stat(server.spool_path)
    # 0711, not 0700: a daemon started as root opens the submission socket in public/.
    assert spool.st_uid == user.pw_uid and spool.st_mode & 0o777 == 0o711
    # Mail still flows through the unprivileged workers into the user-owned spool.
    with smtp_client(server) as client:
        qid = smtplib_send(client, "bob@far.test", ["alice@mx.test"], b"Subject: hi\r\n\r\nx\r\n")
    mailbox = tmp_path / "mail" / "alice" / "new"  # written by the root-side service
    wait_for("alice's copy", lambda: mailbox.is_dir() and any(mailbox.iterdir()))
    wait_for("the qmgr's log line", lambda: f"qid={qid} result=delivered" in server.log())
    # The message was parsed by a check worker, forked by an smtpd worker and kept idle
    # for the next message: it read the client's bytes too, so it is not root either.
    checkers = [pid for worker in found["smtpd"] for pid in descendants(worker)]
    assert checkers, "no check worker under the smtpd workers"
    for pid in checkers:
        assert ids(pid) == ({user.pw_uid}, {user.pw_gid}), (pid, ids(pid))


def test_a_killed_worker_is_replaced_and_service_goes_on(servers: LeafmailFactory) -> None:
    _daemon_user()
    server = servers("[process]\nworkers = 2\n")
    first = roles(server)["smtpd"]
    os.kill(first[0], signal.SIGKILL)
    assert wait_gone([first[0]]) == []
    wait_for("a new smtpd", lambda: server.log().count("smtpd started") == 3)
    for _ in range(4):  # every session is served, whichever worker takes it
        with RawSMTP(server.address()) as raw:
            raw.greeting()
            assert raw.command("QUIT").code == 221
    assert "smtpd died; replacing it" in server.log()


def test_sigkill_of_the_parent_ends_every_worker(servers: LeafmailFactory, tmp_path: Path) -> None:
    _daemon_user()
    server = servers(local_config(tmp_path))
    children = descendants(server.proc.pid)
    assert len(children) >= 3
    idle = RawSMTP(server.address())  # a session in a worker when the parent dies
    idle.greeting()
    server.proc.kill()
    server.proc.wait(IO_TIMEOUT)
    server.exit_code = 0  # killed on purpose: teardown must not count it as a failure
    assert wait_gone(children) == [], "workers kept running without their parent"
    assert idle.at_eof()
    idle.close()


def test_per_source_cap_holds_across_workers(servers: LeafmailFactory) -> None:
    _daemon_user()
    config = (
        "[relay]\nrelay_networks = []\n"
        "[smtp]\nmax_sessions_per_source = 2\n[process]\nworkers = 2\n"
    )
    server = servers(config)
    workers = roles(server)["smtpd"]
    held = [RawSMTP(server.address()) for _ in range(2)]
    for raw in held:
        raw.greeting()
    # The two sessions are served by the two workers (the least busy takes each one).
    holders = {_holder(raw.sock, workers) for raw in held}
    assert holders == set(workers), holders
    with RawSMTP(server.address()) as third:
        reply = third.reply()
        assert reply.code == 421 and "Too many connections" in reply.text
    held[0].close()
    wait_for("the slot to come back", lambda: _greeted(server))
    for raw in held[1:]:
        raw.close()


def _greeted(server: Leafmail) -> bool:
    with RawSMTP(server.address()) as raw:
        return raw.reply().code == 220


def _holder(sock: socket.socket, pids: list[int]) -> int:
    """Which of `pids` holds the server side of the client socket `sock`."""
    client_port = sock.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == client_port and fields[3] == "01":  # ESTABLISHED, server side
            inode = fields[9]
    assert inode is not None
    for pid in pids:
        if holds_socket(pid, inode):
            return pid
    raise AssertionError(f"no worker holds socket {inode}")


def test_flush_goes_through_the_qmgr_control_socket(
    servers: LeafmailFactory, tmp_path: Path, sink: Smarthost
) -> None:
    user = _daemon_user()
    spool = tmp_path / "spool"
    config = write_config(
        tmp_path,
        f'hostname = "mx.test"\nspool = {toml_string(spool)}\n'
        f'[delivery]\nmode = "offline"\ntls = "none"\nsmarthost = "{sink.address}"\n',
    )
    server = servers.spawn(["--config", str(config), "--listen", "127.0.0.1:0"], spool_path=spool)
    with smtp_client(server) as client:
        qid = smtplib_send(client, "a@mx.test", ["b@far.test"], b"Subject: f\r\n\r\nx\r\n")
    control = os.stat(spool / "control")
    assert control.st_uid == user.pw_uid  # served by the unprivileged queue manager
    done = run_flush(tmp_path, config)
    assert done.returncode == 0, done.stderr
    assert f"{qid} delivered" in done.stdout
    assert len(sink.received) == 1


def test_qmgr_delivers_while_every_smtpd_worker_is_stopped(
    servers: LeafmailFactory, tmp_path: Path, sink: Smarthost
) -> None:
    _daemon_user()
    config = f'[delivery]\nmode = "smarthost"\ntls = "none"\nsmarthost = "{sink.address}"\n'
    server = servers(config + "[process]\nworkers = 2\n")
    with smtp_client(server) as client:
        smtplib_send(client, "a@mx.test", ["b@far.test"], b"Subject: 1\r\n\r\nx\r\n")
    wait_for("the first delivery", lambda: len(sink.received) == 1)
    workers = roles(server)["smtpd"]
    for pid in workers:  # the sessions' processes can do nothing now
        os.kill(pid, signal.SIGSTOP)
    try:
        submit = subprocess.run(
            leafmail_command("sendmail", "b@far.test"),
            input=b"Subject: 2\n\nsent while smtpd is stopped\n",
            env=clean_env(tmp_path, {"LEAFMAIL_SPOOL": str(server.spool_path)}),
            capture_output=True,
            timeout=IO_TIMEOUT * 4,
            check=False,
        )
        assert submit.returncode == 0, submit.stderr
        wait_for("the second delivery", lambda: len(sink.received) == 2)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)


def test_root_without_the_daemon_user_exits_78_with_the_fix(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[process]\nuser = "lmt-no-such-user"\n')
    done = subprocess.run(
        leafmail_command(
            "serve", "--config", str(config), "--spool", str(tmp_path / "s"), "--listen",
            "127.0.0.1:0",
        ),
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT * 4,
        check=False,
    )  # fmt: skip
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "useradd --system" in lines[0] and "lmt-no-such-user" in lines[0]


def test_acceptance_slows_down_while_the_queue_is_over_in_flow_queue(
    servers: LeafmailFactory, sink: Smarthost
) -> None:
    """The smarthost hangs, nothing leaves: past in_flow_queue messages each 250 is held
    (Postfix's in_flow_delay), and no message is refused or lost meanwhile.

    The smtpd worker says so in one log line when it starts to slow down; the queue
    size comes from the qmgr's count of queue/, so the test sends until the line shows.
    """
    sink.behaviour.hang_at_data = True
    config = f'[delivery]\nmode = "smarthost"\ntls = "none"\nsmarthost = "{sink.address}"\n'
    server = servers(config + "[process]\nin_flow_queue = 3\n")
    sent = 0
    with smtp_client(server) as client:
        deadline = time.monotonic() + DEADLINE
        while "slowing acceptance" not in server.log():
            assert time.monotonic() < deadline, "acceptance never slowed down"
            smtplib_send(client, "a@mx.test", ["b@far.test"], b"Subject: q\r\n\r\nx\r\n")
            sent += 1
    assert sent > 3
    assert len(server.queue_ids()) == sent  # slowed, never refused or lost
    line = next(x for x in server.log().splitlines() if "slowing acceptance" in x)
    assert int(re.search(r"queued=(\d+)", line)[1]) > 3  # type: ignore[index]


def test_started_by_an_ordinary_user_everything_runs_as_that_user() -> None:
    """No root, no drop: the parent and all its children are the user who started it.

    The user's home is a fresh directory in /tmp (pytest's own are private to root).
    The interpreter may lie where the user cannot reach it (/root here): the daemon then
    runs in a mount namespace that shows the user only the way to it.
    """
    python = Path(sys.executable)  # the venv's, with its packages
    user = ensure_user("lmtprocs")
    home = Path(tempfile.mkdtemp(prefix="lmt-home-"))
    views = Path(tempfile.mkdtemp(prefix="lmt-views-"))
    seen = [python.resolve(), Path(sys.base_prefix), ROOT]
    os.chown(home, user.pw_uid, user.pw_gid)
    read_fd, write_fd = os.pipe()
    env = clean_env(home, {"HOME": str(home), "PYTHONPATH": str(ROOT / "src")})
    proc = subprocess.Popen(
        [
            *as_user_seeing(user, seen, views),
            str(python), "-m", "leafmail.cli", "serve", "--spool", str(home / "spool"),
            "--listen", "127.0.0.1:0", "--hostname", "mx.test", "--ready-fd", str(write_fd),
        ],
        pass_fds=(write_fd,), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=home,
    )  # fmt: skip
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], DEADLINE)
        line = os.read(read_fd, 4096).decode() if ready else ""
        if not line.startswith("READY "):
            proc.kill()
            raise AssertionError(proc.communicate()[1].decode(errors="replace"))
        tree = [proc.pid, *descendants(proc.pid)]
        assert len(tree) >= 3  # parent, qmgr, smtpd
        for pid in tree:
            assert ids(pid)[0] == {user.pw_uid}, pid
        host, _, port = line.split()[1].rpartition(":")
        with RawSMTP((host, int(port))) as raw:
            raw.greeting()
            raw.ehlo()
            assert raw.command("MAIL FROM:<a@mx.test>").code == 250
            assert raw.command("RCPT TO:<postmaster@mx.test>").code == 250
            assert raw.command("DATA").code == 354
            assert raw.command(b"Subject: u\r\n\r\nx\r\n.").code == 250
        assert os.stat(home / "spool").st_uid == user.pw_uid
    finally:
        os.close(read_fd)
        proc.terminate()
        code = proc.wait(DEADLINE)
        shutil.rmtree(home)
        shutil.rmtree(views)  # empty directories: the mounts went with the namespace
    assert code == 0
