"""Disk full: the spool on a small filesystem, on the way in and on the way out.

`leafmail serve` runs in a mount namespace of its own (``unshare -m``) with its spool on a
2 MiB tmpfs, so the kernel's own ENOSPC is what the server meets. The test sees that
filesystem through ``/proc/<server pid>/root/<spool>``, fills it with a filler file and
deletes the filler to give the space back. Nothing is mounted outside the namespace,
and the tmpfs goes away with the server process.

What the issue asks for, and what each test pins down:

- a message that cannot be written gets ``452 4.3.1`` (RFC 3463: mail system full), by
  DATA and by BDAT (RFC 3030), whether it is larger than the free space or the disk is
  full to the last block;
- nothing is half-accepted: no file of a refused transaction is left in tmp/ or queue/;
- the same session, and new ones, work as soon as there is space again;
- delivery on a full disk (status records and DSN commits failing with ENOSPC) loses
  nothing and delivers no recipient more often than once per attempt it could not
  record (at least once, RFC 5321 6.1), and the server keeps running.

Where mounting is impossible the namespace tests skip, and the in-process variant, with
ENOSPC injected at the spool's write layer, still runs: it is always run.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import errno
import functools
import io
import os
import shutil
import smtplib
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import soak
from conftest import launch_with_ready_fd
from leafmail_fixtures import (
    HOSTNAME,
    Leafmail,
    LeafmailFactory,
    RawSMTP,
    check_spooled,
    clean_env,
    leafmail_command,
    leafmail_servers,
    queued_id,
    run_flush,
    smtp_client,
    toml_string,
    write_config,
)
from smarthost import Smarthost, delivery_counts

from leafmail.checks import Stage
from leafmail.receive import Policy, ReceiveService
from leafmail.spool import GroupCommitter, Spool
from leafmail.states import QueueState
from netserver import CallbackHandler, Server
from netserver.connlog import ServerLog
from netserver.errors import EX_TEMPFAIL
from netserver.server import RunOptions
from netserver.smtp import ServerConfig

SENDER = "alice@src.test"
NULL = "<>"  # how aiosmtpd records MAIL FROM:<> (the null reverse path)
TMPFS_SIZE = 2 * 1024 * 1024
FILLER = "filler"
ROUNDS = soak.scaled(2, 20)
EMPTY: dict[str, list[str]] = {
    name: [] for name in ("tmp", "queue", "deferred", "hold", "corrupt", "status")
}
CLIENTS = soak.scaled(3, 8)

pytestmark = pytest.mark.timeout(soak.scaled(60, 600))


# --- the small filesystem ----------------------------------------------------------------


@functools.cache
def cannot_mount() -> str:
    """Why a private tmpfs cannot be mounted here ("" when it can)."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    with tempfile.TemporaryDirectory(prefix="lmprobe") as where:
        probe = subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64k lmprobe "$0"', where],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a mount namespace: {probe.stderr.strip()}"
    return ""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


@pytest.fixture
def mount_dir() -> Iterator[Path]:
    """A short path for the spool's mount point (the control socket's name must fit
    sockaddr_un even seen through /proc/PID/root)."""
    reason = cannot_mount()
    if reason:
        pytest.skip(reason)
    path = Path(tempfile.mkdtemp(prefix="lmd"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class SmallSpool:
    """A `leafmail serve` whose spool is a 2 MiB tmpfs only it can see, and that tmpfs."""

    server: Leafmail
    inner: Path  # the spool as the test sees it: /proc/PID/root/<spool>

    def spool(self) -> Spool:
        return Spool(self.inner, create=False)

    def free(self) -> int:
        st = os.statvfs(self.inner)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Write the filler until ENOSPC, then give back `leave` bytes of it."""
        fd = os.open(self.inner / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            block = b"x" * 65536
            while True:
                try:
                    os.write(fd, block)  # a short write first, then ENOSPC
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, size - leave))
        finally:
            os.close(fd)
        assert self.free() <= leave + 8192, (self.free(), leave)

    def release(self) -> None:
        (self.inner / FILLER).unlink(missing_ok=True)

    def leftovers(self) -> dict[str, list[str]]:
        """Every file in the spool's directories but the filler (queue ids and others)."""
        found = {}
        for name in EMPTY:
            found[name] = sorted(os.listdir(self.inner / name))
        return found


def start_small_spool(
    servers: LeafmailFactory, tmp_path: Path, mount: Path, config: str = ""
) -> SmallSpool:
    """`leafmail serve` in its own mount namespace with its spool on a fresh tmpfs."""
    count = len(list(tmp_path.glob("leafmail-*.log")))
    log_path = tmp_path / f"leafmail-{count}.log"
    argv = ["--spool", str(mount), "--hostname", HOSTNAME, "--listen", "127.0.0.1:0"]
    if config:
        argv += ["--config", str(write_config(tmp_path, config))]
    script = f'mount -t tmpfs -o size={TMPFS_SIZE},mode=0700 leafmail-spool "$0" && exec "$@"'

    def command(fd: int) -> list[str]:
        serve = leafmail_command("serve", *argv, "--ready-fd", str(fd))
        return ["unshare", "-m", "sh", "-c", script, str(mount), *serve]

    proc, words = launch_with_ready_fd(command, log_path, clean_env(tmp_path))
    addresses = []
    for word in words:
        host, _, port = word.rpartition(":")
        addresses.append((host.strip("[]"), int(port)))
    inner = Path(f"/proc/{proc.pid}/root") / str(mount).lstrip("/")
    server = Leafmail(proc, addresses, inner, log_path)
    servers.started.append(server)  # stopped (and its exit status checked) at teardown
    assert os.listdir(mount) == [], "the tmpfs leaked out of the namespace"
    return SmallSpool(server, inner)


def message(n: int, size: int = 0) -> bytes:
    """A message of about `size` bytes (lines of 76 characters), numbered."""
    head = f"From: <{SENDER}>\r\nSubject: disk test {n}\r\n\r\n".encode()
    line = b"%-76d\r\n" % n
    return head + line * max(1, size // len(line))


def data_reply(client: smtplib.SMTP, rcpt: str, body: bytes) -> tuple[int, str]:
    """MAIL, RCPT, DATA with smtplib; the reply to the end of the data."""
    client.ehlo_or_helo_if_needed()
    assert client.mail(SENDER)[0] == 250
    assert client.rcpt(rcpt)[0] == 250
    code, text = client.data(body)
    return code, text.decode()


def bdat_reply(raw: RawSMTP, rcpt: str, body: bytes) -> tuple[int, str]:
    """MAIL, RCPT and the body in two BDAT chunks (RFC 3030); the reply to the LAST one."""
    assert raw.command(f"MAIL FROM:<{SENDER}>").code == 250
    assert raw.command(f"RCPT TO:<{rcpt}>").code == 250
    half = len(body) // 2
    raw.send(b"BDAT %d\r\n" % half + body[:half])
    first = raw.reply()
    assert first.code == 250, first
    raw.send(b"BDAT %d LAST\r\n" % (len(body) - half) + body[half:])
    last = raw.reply()
    return last.code, last.text


def is_452(code: int, text: str) -> bool:
    return code == 452 and text.startswith("4.3.1")


# --- receiving ------------------------------------------------------------------------------


def test_data_and_bdat_get_452_and_nothing_is_half_accepted(
    servers: LeafmailFactory, tmp_path: Path, mount_dir: Path
) -> None:
    """A message bigger than the free space, then a disk full to the last block: each
    gets 452 4.3.1 by DATA and by BDAT, leaves no file behind, and the very same session
    spools the message once the space is back."""
    small = start_small_spool(servers, tmp_path, mount_dir)
    big = message(1, 300_000)
    refused = 0
    accepted: list[str] = []
    with smtp_client(small.server) as client, RawSMTP(small.server.address()) as raw:
        raw.greeting()
        raw.ehlo()
        for leave in (100_000, 0):
            small.fill(leave=leave)
            for _ in range(ROUNDS):
                assert is_452(*data_reply(client, "bob@dst.test", big))
                assert is_452(*bdat_reply(raw, "bob@dst.test", big))
                refused += 2
                assert small.leftovers() == {**EMPTY, "queue": sorted(accepted)}
            small.release()
            code, text = data_reply(client, "bob@dst.test", big)
            assert code == 250, text
            qid = queued_id(text)
            check_spooled(
                small.spool().get(qid), big, qid=qid, sender=SENDER, recipients=["bob@dst.test"]
            )
            code, text = bdat_reply(raw, "carol@dst.test", big)
            assert code == 250, text
            assert small.spool().get(queued_id(text)).data.endswith(big)
            accepted += [qid, queued_id(text)]
    assert small.server.proc.poll() is None
    assert small.spool().ids(QueueState.QUEUE) == sorted(accepted)
    assert small.leftovers()["tmp"] == []
    soak.record(
        "disk",
        "tmpfs: DATA and BDAT with too little and no space",
        sent=refused + len(accepted),
        refused_452=refused,
        acknowledged=len(accepted),
        spooled=len(small.spool().ids(QueueState.QUEUE)),
        lost=0,
        half_accepted=0,
    )


def test_concurrent_sessions_on_a_full_disk_all_get_452(
    servers: LeafmailFactory, tmp_path: Path, mount_dir: Path
) -> None:
    """Sessions that end DATA together share one group commit: when its writes fail
    every one of them must hear 452, none a 250 for mail that is not there."""
    small = start_small_spool(servers, tmp_path, mount_dir)
    small.fill()
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        with smtp_client(small.server) as client:
            got = data_reply(client, f"rcpt{n}@dst.test", message(n, 20_000))
        with lock:
            results.append(got)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == CLIENTS
    assert all(is_452(*r) for r in results), results
    assert small.leftovers() == EMPTY

    small.release()
    with smtp_client(small.server) as client:
        code, text = data_reply(client, "late@dst.test", message(99, 20_000))
    assert code == 250, text
    assert small.spool().ids(QueueState.QUEUE) == [queued_id(text)]
    soak.record(
        "disk",
        "tmpfs: concurrent sessions on a full disk",
        sent=CLIENTS + 1,
        refused_452=CLIENTS,
        acknowledged=1,
        spooled=1,
        lost=0,
    )


# --- delivering -------------------------------------------------------------------------------


def delivery_config(sink: Smarthost) -> str:
    """Offline (only `flush` delivers), one message at a time so which writes fail is known."""
    return (
        '[delivery]\nmode = "offline"\ntls = "none"\nretry_initial = 300\nconcurrency = 1\n'
        f'smarthost = "{sink.address}"\n'
    )


def flush_through_daemon(
    tmp_path: Path, small: SmallSpool, sink: Smarthost
) -> subprocess.CompletedProcess[str]:
    """`leafmail flush`, which finds the daemon's control socket in the spool and asks it."""
    text = f"spool = {toml_string(small.inner)}\n{delivery_config(sink)}"
    return run_flush(tmp_path, write_config(tmp_path, text))


def bounced_recipients(sink: Smarthost) -> list[str]:
    """The Final-Recipient of every failure DSN (RFC 3464) the smarthost got, sorted."""
    failed = []
    for got in sink.received:
        if got.sender != NULL:
            continue
        assert got.recipients == [SENDER]
        report = email.message_from_bytes(got.content, policy=email.policy.compat32)
        assert report.get_content_type() == "multipart/report", got.content[:500]
        assert report.get_param("report-type") == "delivery-status"
        parts = report.get_payload()
        assert isinstance(parts, list)
        status = parts[1]
        assert isinstance(status, email.message.Message)
        assert status.get_content_type() == "message/delivery-status"
        blocks = status.get_payload()
        assert isinstance(blocks, list)
        for block in blocks[1:]:
            assert isinstance(block, email.message.Message)
            assert block["Action"] == "failed", str(block)
            assert str(block["Status"]).startswith("5."), str(block)
            failed.append(str(block["Final-Recipient"]).split(";", 1)[1].strip())
    return sorted(failed)


def send_messages(small: SmallSpool, plan: dict[str, list[str]]) -> dict[str, str]:
    """One message per entry of `plan` (name: recipients), in order; their queue ids."""
    qids = {}
    with smtp_client(small.server) as client:
        for n, (name, rcpts) in enumerate(plan.items()):
            client.ehlo_or_helo_if_needed()
            assert client.mail(SENDER)[0] == 250
            for rcpt in rcpts:
                assert client.rcpt(rcpt)[0] == 250
            code, text = client.data(message(n, 1000))
            assert code == 250, text
            qids[name] = queued_id(text.decode())
    return qids


REFUSALS = {
    "busy@dst.test": "451 4.2.1 mailbox busy",
    "busy2@dst.test": "451 4.2.1 mailbox busy",
    "bad@dst.test": "550 5.1.1 no such user",
    "bad2@dst.test": "550 5.1.1 no such user",
}


def test_delivery_on_a_full_disk_loses_nothing(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path, mount_dir: Path
) -> None:
    """The daemon delivers (asked by `leafmail flush`) while status records and DSNs cannot
    be written: every message stays, the daemon lives, and once there is space again each
    recipient ends delivered or bounced, a delivered one at most once per unrecorded
    attempt more, and the spool is left empty."""
    sink.behaviour.rcpt_replies.update(REFUSALS)
    small = start_small_spool(servers, tmp_path, mount_dir, delivery_config(sink))
    plan = {  # "ok" last: its removal frees space, and the disk must stay full meanwhile
        "busy": ["busy@dst.test"],
        "bad": ["bad@dst.test"],
        "mixed": ["ok2@dst.test", "bad2@dst.test", "busy2@dst.test"],
        "ok": ["ok@dst.test"],
    }
    qids = send_messages(small, plan)
    full_flushes = ROUNDS
    for _ in range(full_flushes):
        small.fill()
        done = flush_through_daemon(tmp_path, small, sink)
        assert done.returncode == EX_TEMPFAIL, done.stderr
        assert small.server.proc.poll() is None, small.server.log()
        # Only the message that needed nothing written is gone; the others are untouched.
        assert small.spool().ids(QueueState.QUEUE) == sorted(
            qids[n] for n in ("busy", "bad", "mixed")
        )
        assert small.leftovers()["tmp"] == []
    assert bounced_recipients(sink) == []  # no DSN could be spooled, so none went out

    small.release()
    done = flush_through_daemon(tmp_path, small, sink)  # 451s deferred, 550s bounced
    assert done.returncode == EX_TEMPFAIL, done.stderr
    sink.behaviour.rcpt_replies.clear()
    done = flush_through_daemon(tmp_path, small, sink)  # the deferred ones go
    assert done.returncode == 0, done.stderr + done.stdout

    got = delivery_counts(sink)
    assert bounced_recipients(sink) == ["bad2@dst.test", "bad@dst.test"]
    assert got.pop(SENDER) == 2  # the two DSNs, each once
    assert got.pop("ok@dst.test") == 1
    assert got.pop("busy@dst.test") == 1
    assert got.pop("busy2@dst.test") == 1
    # ok2's delivery could not be recorded (its DSN could not be spooled) in each
    # full-disk flush, so it was sent again: at least once, at most once per attempt.
    ok2 = got.pop("ok2@dst.test")
    assert 1 <= ok2 <= full_flushes + 1
    assert got == {}
    assert small.server.proc.poll() is None
    assert small.leftovers() == EMPTY
    soak.record(
        "disk",
        "tmpfs: delivery with status and DSN writes failing",
        sent=4,
        recipients=6,
        full_disk_flushes=full_flushes,
        delivered=4,
        bounced=2,
        lost=0,
        duplicates=ok2 - 1,
    )


def test_a_bounce_whose_status_cannot_be_recorded_is_not_sent_twice(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path, mount_dir: Path
) -> None:
    """One page free: the DSN for bad2 fits and is committed, the status record that says
    bad2 has bounced (and busy2 is deferred) does not. The attempt counts as not recorded
    and is made again, so the DSN it left behind must not stay: otherwise the sender gets
    one bounce per full-disk attempt for a single failure."""
    sink.behaviour.rcpt_replies.update(REFUSALS)
    small = start_small_spool(servers, tmp_path, mount_dir, delivery_config(sink))
    rcpts = ["ok2@dst.test", "bad2@dst.test", "busy2@dst.test"]
    qids = send_messages(small, {"mixed": rcpts})
    small.fill(leave=4096)
    done = flush_through_daemon(tmp_path, small, sink)
    assert done.returncode == EX_TEMPFAIL, done.stderr
    assert qids["mixed"] in small.spool().ids(QueueState.QUEUE)
    small.release()
    del sink.behaviour.rcpt_replies["busy2@dst.test"]  # bad2 is still refused
    done = flush_through_daemon(tmp_path, small, sink)
    assert done.returncode == 0, done.stderr
    assert small.spool().ids(QueueState.QUEUE) == []
    soak.record(
        "disk",
        "tmpfs: DSN committed but status not",
        dsns=delivery_counts(sink).get(SENDER, 0),
        failed_recipients=1,
    )
    assert bounced_recipients(sink) == ["bad2@dst.test"]


def test_a_failed_status_write_leaves_no_file_behind(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path, mount_dir: Path
) -> None:
    """A 451 on a full disk: the status record cannot be written. Once there is space and
    the message is delivered, the spool must be empty again, status/ included: a file
    left per failed write would eat the inodes and space a full disk needs back."""
    sink.behaviour.rcpt_replies.update(REFUSALS)
    small = start_small_spool(servers, tmp_path, mount_dir, delivery_config(sink))
    qids = send_messages(small, {"busy": ["busy@dst.test"]})
    small.fill()
    done = flush_through_daemon(tmp_path, small, sink)
    assert done.returncode == EX_TEMPFAIL, done.stderr
    # Where the failure hits (open or write of status/QID.new) is the kernel's choice;
    # tests/test_spool.py forces it at write(2). Either way nothing may be left.
    assert small.leftovers()["status"] == []
    small.release()
    sink.behaviour.rcpt_replies.clear()
    done = flush_through_daemon(tmp_path, small, sink)
    assert done.returncode == 0, done.stderr
    assert delivery_counts(sink) == {"busy@dst.test": 1}
    left = small.leftovers()
    soak.record("disk", "tmpfs: leftovers after a failed status write", leftovers=left["status"])
    assert left == EMPTY, f"{qids['busy']}: {left}"


# --- ENOSPC injected at the spool's write layer (runs everywhere) ------------------------------


class FullSpool(Spool):
    """A spool with a budget of free bytes, failing as a full filesystem does.

    `write_tmp` creates the file and writes what still fits before it raises ENOSPC, as
    write(2) does, so a partial file is really left in tmp/ for the committer to clean
    up. `fail_sync` makes the durability barrier fail instead: on filesystems with
    delayed allocation ENOSPC may surface only at fsync. `fail_queue_sync` makes the
    next fsync of queue/ fail (EIO), after the rename into it: the commit must take
    the file back out, or it is delivered besides the client's resend.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.free: int | None = None
        self.fail_sync = False
        self.fail_queue_sync = False
        self._queue_dir = os.stat(self.root / QueueState.QUEUE)

    def write_tmp(self, qid: str, blob: bytes, tmp_dir: int | None = None) -> int:
        if self.free is None or len(blob) <= self.free:
            fd = super().write_tmp(qid, blob, tmp_dir)
            if self.free is not None:
                self.free -= len(blob)
            return fd
        fd = super().write_tmp(qid, blob[: self.free], tmp_dir)
        os.close(fd)
        self.free = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fsync_dir(self, fd: int) -> None:
        self._maybe_fail_queue_sync(fd)
        super().fsync_dir(fd)

    def sync_renamed(self, fds: list[int], dir_fd: int) -> None:
        """A commit's one barrier (data and names), a batch's or a lone message's:
        either failure hits it."""
        if self.fail_sync:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._maybe_fail_queue_sync(dir_fd)
        super().sync_renamed(fds, dir_fd)

    def _maybe_fail_queue_sync(self, dir_fd: int) -> None:
        if self.fail_queue_sync and os.fstat(dir_fd).st_ino == self._queue_dir.st_ino:
            self.fail_queue_sync = False
            raise OSError(errno.EIO, os.strerror(errno.EIO))


@contextlib.contextmanager
def in_process_server(spool: Spool, log: ServerLog | None = None) -> Iterator[tuple[str, int]]:
    """leafmail's receive service on a real netserver listener, in a thread of this process."""
    committer = GroupCommitter(spool)
    service = ReceiveService(
        ServerConfig(hostname=HOSTNAME), committer, Policy({Stage.MAIL: []}), log=log
    )
    server = Server(
        CallbackHandler(service.session),
        ["127.0.0.1:0"],
        mode="async",
        options=RunOptions(signals=False),
    )
    (endpoint,) = server.bind()  # listening now: connections wait in the backlog
    assert endpoint.port is not None
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield endpoint.host, endpoint.port
    finally:
        server.stop()
        thread.join(15)
        committer.close()
    assert not thread.is_alive()


@pytest.mark.parametrize("where", ["write", "sync"])
def test_injected_enospc_gets_452_and_leaves_nothing(tmp_path: Path, where: str) -> None:
    """The same promises with the failure injected where the spool writes: a partial
    file from a failed write(2), or a failed durability barrier, is removed and the
    client hears 452 4.3.1, by DATA and by BDAT; the session then works again."""
    spool = FullSpool(tmp_path / "spool")
    body = message(3, 50_000)
    refused = 0
    with in_process_server(spool) as address, RawSMTP(address) as raw:
        raw.greeting()
        raw.ehlo()
        with smtplib.SMTP(*address, local_hostname="client.test", timeout=10) as client:
            for _ in range(ROUNDS):
                spool.free, spool.fail_sync = (10_000, False) if where == "write" else (None, True)
                assert is_452(*data_reply(client, "bob@dst.test", body))
                spool.free = 0 if where == "write" else None
                assert is_452(*bdat_reply(raw, "bob@dst.test", body))
                refused += 2
                assert os.listdir(spool.root / "tmp") == []
                assert spool.ids(QueueState.QUEUE) == []
            spool.free, spool.fail_sync = None, False
            code, text = data_reply(client, "bob@dst.test", body)
            assert code == 250, text
            code, text = bdat_reply(raw, "carol@dst.test", body)
            assert code == 250, text
    assert len(spool.ids(QueueState.QUEUE)) == 2
    assert all(m.data.endswith(body) for m in spool.messages() if not isinstance(m, Exception))
    soak.record(
        "disk",
        f"injected ENOSPC at {where}: DATA and BDAT",
        sent=refused + 2,
        refused_452=refused,
        acknowledged=2,
        spooled=2,
        lost=0,
    )


def test_a_failed_queue_sync_is_taken_back_so_the_resend_is_the_only_copy(
    tmp_path: Path,
) -> None:
    """The fsync of queue/ after the rename fails: the client hears 452 4.3.1, the file
    the rename put in queue/ is gone (or the runner would deliver it besides the resend),
    the failure is logged, and the resend in the same session is the one copy queued."""
    spool = FullSpool(tmp_path / "spool")
    log = io.StringIO()
    body = message(1, 1000)
    with (
        in_process_server(spool, ServerLog(log, program="leafmail")) as address,
        smtplib.SMTP(*address, local_hostname="client.test", timeout=10) as client,
    ):
        spool.fail_queue_sync = True
        assert is_452(*data_reply(client, "bob@dst.test", body))
        assert not spool.fail_queue_sync  # the failure did happen, after the rename
        assert spool.ids(QueueState.QUEUE) == [] and os.listdir(spool.root / "tmp") == []
        code, text = data_reply(client, "bob@dst.test", body)
        assert code == 250, text
    assert spool.ids(QueueState.QUEUE) == [queued_id(text)]
    (line,) = [line for line in log.getvalue().splitlines() if "the spool failed" in line]
    assert line.startswith("leafmail: error ") and "Input/output error" in line, line


def test_injected_enospc_in_one_batch_spares_the_others(tmp_path: Path) -> None:
    """One group commit, some writes fail: only those sessions hear 452, the others'
    250s are for mail that is really in queue/."""
    spool = FullSpool(tmp_path / "spool")
    spool.free = 10 * 60_000
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    with in_process_server(spool) as address:

        def one(n: int) -> None:
            with smtplib.SMTP(*address, local_hostname="client.test", timeout=10) as client:
                got = data_reply(client, f"r{n}@dst.test", message(n, 50_000))
            with lock:
                results.append(got)

        threads = [threading.Thread(target=one, args=(n,)) for n in range(CLIENTS * 5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    ok = [queued_id(text) for code, text in results if code == 250]
    assert len(results) == CLIENTS * 5
    assert all(code == 250 or is_452(code, text) for code, text in results), results
    assert sorted(ok) == spool.ids(QueueState.QUEUE)
    assert 0 < len(ok) < len(results)
    assert os.listdir(spool.root / "tmp") == []
    soak.record(
        "disk",
        "injected ENOSPC inside a group commit",
        sent=len(results),
        acknowledged=len(ok),
        refused_452=len(results) - len(ok),
        spooled=len(spool.ids(QueueState.QUEUE)),
        lost=0,
    )
