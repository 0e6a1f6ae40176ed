"""Local submission by ordinary users, without setuid (issue 12.4).

A real `leafmail serve` runs as root on a spool that a real second user (``lmtsubmit``)
cannot write; that user's `leafmail sendmail` goes through the daemon's submission
socket (SPOOL/public/submit), and the Received line names the uid the kernel gave
(SO_PEERCRED). With no daemon answering, sendmail exits 75 and claims nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from leafmail_fixtures import (
    Leafmail,
    LeafmailFactory,
    clean_env,
    leafmail_command,
    leafmail_servers,
    spawn_leafmail,
    toml_string,
)
from system_users import RUN_AS, ensure_user, needs_root, run_as, shared_dir

from leafmail import config as configuration
from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.pickup import MAX_OPEN, MAX_OPEN_PER_UID
from leafmail.spool import CorruptMessage, Spool, SpooledMessage
from leafmail.spoolcheck import check_spool
from leafmail.states import QueueState
from leafmail.submitwire import NoDaemon, Refused, encode_request, socket_path, submit
from netserver import privileges
from netserver.errors import EX_DATAERR, EX_TEMPFAIL, EX_UNAVAILABLE

USER = "lmtsubmit"
HOST = "leaf.test"
_RECEIVED = re.compile(
    rb"\AReceived: by leaf\.test \(leafmail, from userid (?P<uid>\d+)\)\r\n"
    rb"\t(?:with (?P<proto>[A-Z]+) )?id (?P<qid>[0-9A-F]{24})"
)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


@pytest.fixture
def box() -> Iterator[Path]:
    """A directory the second user can read: the config and the spool live there."""
    with shared_dir() as path:
        text = f'hostname = "{HOST}"\nspool = {toml_string(path / "spool")}\n'
        (path / "leafmail.toml").write_text(text + "[smtp]\nmax_message_size = 4000\n")
        (path / "leafmail.toml").chmod(0o644)
        yield path


def start(servers: LeafmailFactory, box: Path, *extra: str) -> Leafmail:
    argv = ["--config", str(box / "leafmail.toml"), "--listen", "127.0.0.1:0", *extra]
    return servers.spawn(argv, spool_path=box / "spool")


def sendmail_as_user(
    tmp_path: Path, box: Path, *args: str, stdin: bytes
) -> tuple[int, bytes, bytes]:
    env = clean_env(tmp_path, {"LEAFMAIL_CONFIG": str(box / "leafmail.toml")})
    done = run_as(USER, ["sendmail", *args], env=env, stdin=stdin)
    return done.returncode, done.stdout, done.stderr


def queued(box: Path) -> list[SpooledMessage]:
    found = []
    for item in Spool(box / "spool", create=False).messages(QueueState.QUEUE):
        assert not isinstance(item, CorruptMessage), item
        found.append(item)
    return found


def trace_uid(msg: SpooledMessage) -> int:
    match = _RECEIVED.match(msg.data)
    assert match is not None, msg.data[:200]
    assert match["qid"].decode() == msg.qid
    return int(match["uid"])


# --- through the socket, as a real second user ---------------------------------------------


@needs_root
def test_a_user_who_cannot_write_the_spool_submits_through_the_daemon(
    tmp_path: Path, box: Path, servers: LeafmailFactory
) -> None:
    user = ensure_user(USER)
    start(servers, box)
    spool = box / "spool"
    assert spool.stat().st_uid != user.pw_uid and stat.S_IMODE(spool.stat().st_mode) == 0o711
    queue = spool / "queue"  # not the user's to write: the daemon's, 0700
    assert queue.stat().st_uid != user.pw_uid and stat.S_IMODE(queue.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path(spool).stat().st_mode) == 0o666

    forged = b"Received: from trusted.example by mx.example; Mon, 1 Jan 2024 00:00:00 +0000\n"
    code, out, err = sendmail_as_user(
        tmp_path, box, "-t", stdin=forged + b"To: bob@dst.test\nSubject: cron\n\nhello\n"
    )
    assert (code, out, err) == (0, b"", b""), err

    (msg,) = queued(box)  # durable before the exit 0: no waiting
    assert trace_uid(msg) == user.pw_uid  # the kernel's uid, first, before the forged one
    assert msg.envelope.sender == f"{USER}@{HOST}"
    assert [r.address for r in msg.envelope.recipients] == ["bob@dst.test"]
    assert msg.envelope.client == ClientInfo(protocol="local")
    assert f"\r\nFrom: {USER}@{HOST}\r\n".encode() in msg.data
    assert msg.data.endswith(b"\r\n\r\nhello\r\n")
    assert stat.S_IMODE((spool / "queue" / msg.qid).stat().st_mode) == 0o600


@needs_root
def test_with_the_daemon_stopped_sendmail_exits_75_and_claims_nothing(
    tmp_path: Path, box: Path, servers: LeafmailFactory
) -> None:
    ensure_user(USER)
    start(servers, box).stop()
    code, out, err = sendmail_as_user(tmp_path, box, "bob@dst.test", stdin=b"Subject: x\n\nx\n")
    assert code == EX_TEMPFAIL
    assert out == b""
    text = err.decode()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert "no leafmail daemon answers" in text and "nothing was queued" in text
    assert queued(box) == []


@needs_root
def test_a_killed_daemon_leaves_a_socket_that_answers_75(tmp_path: Path, box: Path) -> None:
    ensure_user(USER)
    argv = ["--config", str(box / "leafmail.toml"), "--listen", "127.0.0.1:0"]
    daemon = spawn_leafmail(tmp_path, argv, spool_path=box / "spool")
    daemon.proc.kill()
    daemon.proc.wait()
    assert socket_path(box / "spool").is_socket()  # stale: nobody accepts on it
    code, _out, err = sendmail_as_user(tmp_path, box, "bob@dst.test", stdin=b"x\n")
    assert code == EX_TEMPFAIL, err
    assert b"Connection refused" in err
    assert queued(box) == []


@needs_root
def test_root_goes_through_the_socket_too_when_the_spool_is_the_daemon_users(
    tmp_path: Path, box: Path
) -> None:
    """Root could write the spool, but its files would be root's, which the daemon's
    unprivileged processes could not read: so root is a submitter like anyone else."""
    user = ensure_user(USER)
    check_spool(box / "spool", user.pw_uid)  # a spool that belongs to the daemon's user
    done = subprocess.run(
        leafmail_command("sendmail", "bob@dst.test"),
        input=b"x\n",
        env=clean_env(tmp_path, {"LEAFMAIL_CONFIG": str(box / "leafmail.toml")}),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == EX_TEMPFAIL, done.stderr  # no daemon: nothing written by root
    assert b"no leafmail daemon answers" in done.stderr
    assert queued(box) == [] and list((box / "spool" / "tmp").iterdir()) == []


@needs_root
def test_bs_as_a_user_goes_through_the_daemon(
    tmp_path: Path, box: Path, servers: LeafmailFactory
) -> None:
    user = ensure_user(USER)
    start(servers, box)
    dialogue = (
        b"EHLO cron.test\r\nMAIL FROM:<job@src.test>\r\nRCPT TO:<bob@dst.test>\r\nDATA\r\n"
        b"Subject: bs\r\n\r\nvia -bs\r\n.\r\nQUIT\r\n"
    )
    code, out, err = sendmail_as_user(tmp_path, box, "-bs", stdin=dialogue)
    assert code == 0, err
    (msg,) = queued(box)
    assert f"250 2.0.0 OK queued as {msg.qid}\r\n".encode() in out, out
    assert trace_uid(msg) == user.pw_uid
    assert _RECEIVED.match(msg.data)["proto"] == b"ESMTP"  # type: ignore[index]
    assert msg.envelope.sender == "job@src.test"
    assert msg.envelope.client == ClientInfo(protocol="local", helo="cron.test")


@needs_root
def test_bs_with_no_daemon_greets_421_and_exits_75(tmp_path: Path, box: Path) -> None:
    ensure_user(USER)
    code, out, _err = sendmail_as_user(tmp_path, box, "-bs", stdin=b"QUIT\r\n")
    assert code == EX_TEMPFAIL
    assert out.startswith(b"421 ")


@needs_root
def test_bp_as_a_user_says_the_queue_is_private(
    tmp_path: Path, box: Path, servers: LeafmailFactory
) -> None:
    ensure_user(USER)
    start(servers, box)
    code, out, err = sendmail_as_user(tmp_path, box, "-bp", stdin=b"")
    assert (code, out) == (EX_UNAVAILABLE, b"")
    assert err.decode().endswith(
        "is private to the daemon's user; ask root or that user to run `leafmail queue`\n"
    ), err
    assert len(err.splitlines()) == 1


@needs_root
def test_an_ordinary_users_daemon_offers_no_socket_unless_asked(
    tmp_path: Path, box: Path, servers: LeafmailFactory
) -> None:
    """[pickup] enabled = false (the default for a daemon not started as root)."""
    ensure_user(USER)
    with (box / "leafmail.toml").open("a") as f:
        f.write("[pickup]\nenabled = false\n")
    start(servers, box)
    assert not socket_path(box / "spool").exists()
    assert stat.S_IMODE((box / "spool").stat().st_mode) == 0o700
    code, _out, _err = sendmail_as_user(tmp_path, box, "bob@dst.test", stdin=b"x\n")
    assert code == EX_TEMPFAIL


_WITH_SYSTEM_CONFIG = (
    "mount --make-rprivate / && "
    'mount -t overlay overlay -o lowerdir=/etc,upperdir="$0/upper",workdir="$0/work" /etc && '
    'mkdir -p /etc/leafmail && cp "$1" /etc/leafmail/leafmail.toml && chmod "$2" /etc/leafmail '
    '&& shift 2 && exec "$@"'
)


def sendmail_with_system_config(
    tmp_path: Path, config: Path, mode: str, *args: str, stdin: bytes
) -> subprocess.CompletedProcess[bytes]:
    """sendmail as the user, with no LEAFMAIL_* or XDG_* variables, in a mount namespace
    where /etc/leafmail/leafmail.toml is `config` (an overlay over /etc) and
    /etc/leafmail has this mode; skips where such a mount is impossible."""
    layers = tmp_path / "etc-overlay"
    (layers / "upper").mkdir(parents=True)
    (layers / "work").mkdir()
    command = [sys.executable, str(RUN_AS), USER, "sendmail", *args]
    done = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            _WITH_SYSTEM_CONFIG,
            str(layers),
            str(config),
            mode,
            *command,
        ],
        input=stdin,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0 and b"mount" in done.stderr:
        pytest.skip(f"cannot mount an overlay over /etc here: {done.stderr.decode().strip()}")
    assert not Path("/etc/leafmail").exists()  # nothing leaked out of the namespace
    return done


@needs_root
def test_without_leafmail_config_a_user_reaches_the_system_daemon(
    tmp_path: Path, box: Path, servers: LeafmailFactory
) -> None:
    """The case that used to exit 0 with the mail in ~/.local/share/leafmail/spool,
    which no daemon reads: with /etc/leafmail/leafmail.toml in place (in a mount
    namespace of the test's own, over /etc), sendmail finds the system daemon."""
    user = ensure_user(USER)
    start(servers, box)
    done = sendmail_with_system_config(
        tmp_path, box / "leafmail.toml", "0755", "bob@dst.test", stdin=b"Subject: x\n\nx\n"
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    (msg,) = queued(box)
    assert trace_uid(msg) == user.pw_uid


@needs_root
def test_a_system_config_the_user_cannot_read_is_an_error_not_skipped(
    tmp_path: Path, box: Path
) -> None:
    """/etc/leafmail 0750 (it holds keys): one line and 78, never a personal spool."""
    ensure_user(USER)
    done = sendmail_with_system_config(
        tmp_path, box / "leafmail.toml", "0750", "bob@dst.test", stdin=b"x\n"
    )
    assert done.returncode == 78
    err = done.stderr.decode()
    assert "/etc/leafmail/leafmail.toml: cannot read" in err and len(err.splitlines()) == 1, err


# --- the daemon checks what it is told (as root: the uid is then 0) --------------------------


def envelope(**changes: object) -> Envelope:
    fields: dict[str, object] = {
        "sender": "me@src.test",
        "recipients": (Recipient("bob@dst.test"),),
        "client": ClientInfo(ip="203.0.113.9", port=25, protocol="ESMTPSA", auth="admin"),
        "received": "1999-01-01T00:00:00Z",
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def test_what_only_the_daemon_knows_is_never_taken_from_the_request(
    box: Path, servers: LeafmailFactory
) -> None:
    start(servers, box)
    path = socket_path(box / "spool")
    claimed = envelope(forward_of="0" * 24)  # a queue tool would settle that message
    qid = submit(path, claimed, b"Subject: x\r\n\r\nbody\r\n", full_name=None, protocol=None)
    (msg,) = queued(box)
    assert msg.qid == qid
    assert trace_uid(msg) == os.geteuid()
    assert msg.envelope.client == ClientInfo(protocol="local")  # no ip, no AUTH, no ESMTPSA
    assert msg.envelope.received != "1999-01-01T00:00:00Z"
    assert msg.envelope.forward_of is None


@pytest.mark.parametrize(
    ("env", "data", "says"),
    [
        (envelope(recipients=(Recipient("bob smith@dst.test"),)), b"x\r\n", "bad recipient"),
        (envelope(sender="a@b@c"), b"x\r\n", "bad sender"),
        (envelope(ret="ALL"), b"x\r\n", "bad RET"),
        (envelope(), b"x" * 4001, "larger than the limit of 4000"),
        (envelope(), b"Subject: " + b"y" * 1000 + b"\r\n\r\nx\r\n", "over 998"),
    ],
)
def test_the_daemon_refuses_what_sendmail_refuses(
    box: Path, servers: LeafmailFactory, env: Envelope, data: bytes, says: str
) -> None:
    start(servers, box)
    with pytest.raises(Refused, match=says) as refused:
        submit(socket_path(box / "spool"), env, data, full_name=None, protocol=None)
    assert refused.value.status == EX_DATAERR
    assert queued(box) == []


def raw_request(path: Path, request: bytes) -> dict[str, object]:
    """Send bytes no sendmail would send, half-close, and read the daemon's one reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError):  # refused before it read everything
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline()
    answer = json.loads(reply)
    assert isinstance(answer, dict), reply
    return answer


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"not json\n", 64, "bad request"),
        (b'{"envelope": {}, "full_name": null, "protocol": null, "size": 1}\n', 64, "fields"),
        (b"[" * 100_000 + b"\n", 64, "not JSON"),
        (encode_request(envelope(), b"12345", full_name=None, protocol=None)[:-2], 65, "incompl"),
        (b"x" * (2 << 20) + b"\n", 65, "over-long"),
    ],
)
def test_malformed_requests_get_one_answer_and_queue_nothing(
    box: Path, servers: LeafmailFactory, request_bytes: bytes, status: int, says: str
) -> None:
    start(servers, box)
    answer = raw_request(socket_path(box / "spool"), request_bytes)
    assert answer["status"] == status and says in str(answer["error"]), answer
    assert queued(box) == []


def test_past_64_open_connections_a_new_one_is_closed_and_the_open_ones_are_served(
    box: Path, servers: LeafmailFactory
) -> None:
    start(servers, box)
    path = socket_path(box / "spool")
    idle = []
    try:
        for _ in range(MAX_OPEN):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(str(path))
            idle.append(sock)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(10)
            extra.connect(str(path))
            assert extra.recv(1) == b""  # closed unanswered: that sendmail exits 75
        last = idle[-1]  # the connections already open are still served
        last.sendall(encode_request(envelope(), b"x\r\n", full_name=None, protocol=None))
        answer = json.loads(last.makefile("rb").readline())
    finally:
        for sock in idle:
            sock.close()
    assert [m.qid for m in queued(box)] == [answer["queued"]]


def test_no_daemon_is_no_daemon(box: Path) -> None:
    with pytest.raises(NoDaemon):
        submit(socket_path(box / "spool"), envelope(), b"x\r\n", full_name=None, protocol=None)


# --- which config sendmail reads ------------------------------------------------------------


def test_the_system_config_comes_after_the_users_own(tmp_path: Path) -> None:
    system = tmp_path / "etc-leafmail.toml"
    system.write_text('spool = "/var/spool/leafmail-test"\n')
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert configuration.load(env=env, system=system).spool == "/var/spool/leafmail-test"
    own = tmp_path / "xdg" / "leafmail" / "leafmail.toml"
    own.parent.mkdir(parents=True)
    own.write_text('spool = "/home/me/spool"\n')
    assert configuration.load(env=env, system=system).spool == "/home/me/spool"
    chosen = tmp_path / "chosen.toml"
    chosen.write_text('spool = "/chosen"\n')
    assert configuration.load(env={**env, "LEAFMAIL_CONFIG": str(chosen)}).spool == "/chosen"


# --- per-user limits ------------------------------------------------------------------------


@needs_root
def test_a_user_past_the_rate_limit_gets_75_and_others_are_not_held_back(
    tmp_path: Path, box: Path, servers: LeafmailFactory
) -> None:
    """[pickup] message_rate_limit per rate_time_unit, per uid as the kernel names it."""
    user = ensure_user(USER)
    config = box / "leafmail.toml"
    config.write_text(
        config.read_text() + '[pickup]\nmessage_rate_limit = 2\nrate_time_unit = "1h"\n'
    )
    daemon = start(servers, box)
    message = b"Subject: cron\n\nhello\n"
    for _ in range(2):
        code, _out, err = sendmail_as_user(tmp_path, box, "bob@dst.test", stdin=message)
        assert code == 0, err
    code, out, err = sendmail_as_user(tmp_path, box, "bob@dst.test", stdin=message)
    assert (code, out) == (EX_TEMPFAIL, b"")
    text = err.decode()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert f"uid {user.pw_uid} submitted more than 2 messages in 3600 s" in text
    assert len(queued(box)) == 2  # the refused one was not queued
    # Root is not counted (it could write the spool itself).
    submit(socket_path(box / "spool"), envelope(), b"x\r\n", full_name=None, protocol=None)
    assert len(queued(box)) == 3
    assert f'msg="local submission refused" uid={user.pw_uid} ' in daemon.log()


@needs_root
def test_one_user_cannot_hold_every_submission_slot(box: Path, servers: LeafmailFactory) -> None:
    """A user's 17th open submission is refused (75) while root still gets through."""
    user = ensure_user(USER)
    start(servers, box)
    path = socket_path(box / "spool")
    answer_r, answer_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the user: hold MAX_OPEN_PER_UID connections, try one more, wait
        code = 1
        try:
            os.close(answer_r)
            os.close(release_w)
            privileges.drop(privileges.resolve(USER))
            held = []
            for _ in range(MAX_OPEN_PER_UID):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10)
                sock.connect(str(path))
                held.append(sock)
            os.write(answer_w, json.dumps(raw_request(path, b"")).encode() + b"\n")
            os.read(release_r, 1)  # until the test closes its end
            code = 0
        finally:
            os._exit(code)
    os.close(answer_w)
    os.close(release_r)
    try:
        with os.fdopen(answer_r, "rb") as reader:
            line = reader.readline()
        answer = json.loads(line)
        assert answer["status"] == EX_TEMPFAIL, answer
        assert f"uid {user.pw_uid} has {MAX_OPEN_PER_UID} submissions open" in str(answer["error"])
        submit(path, envelope(), b"x\r\n", full_name=None, protocol=None)  # root: served
    finally:
        os.close(release_w)
        _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(queued(box)) == 1
