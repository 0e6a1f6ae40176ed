"""Local delivery: Maildir, mbox, aliases (commands, files, forwards), the RCPT check.

Everything is real: files in tmp_path, read back with Python's `mailbox` module; other
processes that append to the same mbox or hold its lock; commands run as python scripts
(sys.executable). Waiting is on real events (a lock holder prints a line when it holds
the lock), never a sleep. Tests marked `root` check the ownership rules and run only as
root; everything else runs as any user. As an ordinary user, commands and files named in
the aliases run as the current user (via `default_user`); as root, the users in the
configs have no account and are written as a real unprivileged user (VIRTUAL, made with
useradd), which is also the `default_user`, in a tmp_path that user owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import mailbox
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from localusers import PYTHON, VIRTUAL, give_to_virtual, virtual_tmp

from leafmail.checks import ACCEPT, Check, CheckContext, Defer, Reject
from leafmail.checks.recipients import local_recipient_check
from leafmail.config import Config, _build
from leafmail.delivery import Outcome, Result, asuser
from leafmail.delivery.local import (
    Copy,
    LocalAgent,
    LockPolicy,
    append_mbox,
    mbox_entry,
)
from leafmail.delivery.local_common import MailboxLocked
from leafmail.delivery.router import build_agent
from leafmail.envelope import Envelope, Recipient
from leafmail.queue import QueueRunner
from leafmail.retry import RetryPolicy
from leafmail.spool import Spool
from leafmail.states import QueueState
from leafmail.status import MessageStatus, RcptState
from netserver.errors import ConfigError
from netserver.smtp.addresses import Mailbox

HOST = "mx.test"
SENDER = "sender@remote.example"
ME = pwd.getpwuid(os.geteuid()).pw_name
ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not ROOT, reason="ownership rules apply only to root")
RUNS_AS = VIRTUAL if ROOT else ME  # who commands and files of root's aliases run as
MESSAGE = (
    b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (leafmail) with ESMTP id X;"
    b" Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    b"From: <sender@remote.example>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"First line.\r\n"
    b"From the beginning\r\n"
    b">From a quoted line\r\n"
    b">>From twice\r\n"
    b"Fromage is not quoted\r\n"
    b" From indented is not quoted\r\n"
)


def make_config(
    tmp_path: Path,
    *,
    mailbox_kind: str = "maildir",
    users: Sequence[str] = ("alice", "bob"),
    aliases: str | None = None,
    path: str | None = None,
    timeout: float = 20.0,
    **top: Any,
) -> Config:
    """A config with a [local] table; aliases (if any) written to tmp_path/aliases."""
    suffix = "maildir" if mailbox_kind == "maildir" else "mbox"
    local: dict[str, Any] = {
        "mailbox": mailbox_kind,
        "path": path or f"{tmp_path}/{{user}}.{suffix}",
        "users": list(users),
        "command_timeout": timeout,
    }
    if aliases is not None:
        (tmp_path / "aliases").write_text(aliases, encoding="utf-8")
        local["aliases"] = str(tmp_path / "aliases")
    if ROOT:
        local["virtual_user"] = VIRTUAL
    return _build({"hostname": HOST, "local": local, **top}, "test")


def make_agent(config: Config, tmp_path: Path, **kwargs: Any) -> LocalAgent:
    kwargs.setdefault("default_user", RUNS_AS)
    return LocalAgent(config.local, config.local_domains, Spool(tmp_path / "spool"), **kwargs)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """pytest's tmp_path, or as root one that VIRTUAL owns and every user can reach."""
    yield from virtual_tmp(tmp_path)


def deliver(
    agent: LocalAgent, rcpts: Sequence[str], data: bytes = MESSAGE, sender: str = SENDER
) -> list[Result]:
    envelope = Envelope(sender, tuple(Recipient(r) for r in rcpts))
    results = asyncio.run(agent.deliver(envelope, data, range(len(rcpts))))
    return [results[i] for i in range(len(rcpts))]


def maildir_messages(path: Path) -> list[bytes]:
    box = mailbox.Maildir(str(path), factory=None, create=False)
    return sorted(box.get_bytes(key) for key in box.iterkeys())


def mbox_messages(path: Path) -> list[mailbox.mboxMessage]:
    return list(mailbox.mbox(str(path), create=False))


def unquote_mboxrd(body: bytes) -> bytes:
    return re.sub(rb"(?m)^>(>*From )", rb"\1", body)


def outcomes(results: Sequence[Result]) -> list[tuple[Outcome, str]]:
    return [(r.outcome, r.status) for r in results]


DELIVERED = (Outcome.DELIVERED, "2.0.0")


# --- Maildir -----------------------------------------------------------------------


def test_maildir_delivery_with_trace_headers(tmp_path: Path) -> None:
    agent = make_agent(make_config(tmp_path), tmp_path)
    assert outcomes(deliver(agent, ["alice@mx.test"])) == [DELIVERED]
    box = tmp_path / "alice.maildir"
    (stored,) = maildir_messages(box)
    assert stored == (  # LF line ends, as Postfix and Dovecot write (issue 13.8)
        b"Return-Path: <sender@remote.example>\nDelivered-To: alice@mx.test\n"
        + MESSAGE.replace(b"\r\n", b"\n")
    )
    for sub in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE(os.stat(box / sub).st_mode) == 0o700
    (name,) = os.listdir(box / "new")
    assert stat.S_IMODE(os.stat(box / "new" / name).st_mode) == 0o600
    assert os.listdir(box / "tmp") == []
    assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+R[0-9a-f]{8}\..+", name)
    parsed = mailbox.Maildir(str(box), create=False)
    (message,) = parsed
    assert message["Return-Path"] == "<sender@remote.example>"
    assert message["Delivered-To"] == "alice@mx.test"


def test_many_messages_get_unique_names(tmp_path: Path) -> None:
    agent = make_agent(make_config(tmp_path), tmp_path)
    for i in range(20):
        deliver(agent, ["alice@mx.test"], MESSAGE + b"%d\r\n" % i)
    assert len(os.listdir(tmp_path / "alice.maildir" / "new")) == 20


def test_no_descriptors_leak_on_success_or_failure(tmp_path: Path) -> None:
    (tmp_path / "bob.maildir").symlink_to(tmp_path)  # refused every time
    (tmp_path / "alice.mbox.lock").write_text("1\n")  # held every time
    maildir = make_agent(make_config(tmp_path), tmp_path)
    mbox = make_agent(
        make_config(tmp_path, mailbox_kind="mbox"), tmp_path, locks=LockPolicy(timeout=0.01)
    )
    deliver(maildir, ["alice@mx.test"])  # warm up (imports, first directory creation)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        assert outcomes(deliver(maildir, ["alice@mx.test"])) == [DELIVERED]
        assert deliver(maildir, ["bob@mx.test"])[0].outcome is Outcome.DEFERRED
        assert deliver(mbox, ["alice@mx.test"])[0].outcome is Outcome.DEFERRED
    assert len(os.listdir("/proc/self/fd")) == before


def test_null_sender_and_extension(tmp_path: Path) -> None:
    agent = make_agent(make_config(tmp_path), tmp_path)
    assert outcomes(deliver(agent, ["Alice+Lists@mx.test"], sender="")) == [DELIVERED]
    (stored,) = maildir_messages(tmp_path / "alice.maildir")
    assert stored.startswith(b"Return-Path: <>\nDelivered-To: Alice+Lists@mx.test\n")


def test_two_recipients_for_one_mailbox_get_one_copy(tmp_path: Path) -> None:
    agent = make_agent(make_config(tmp_path), tmp_path)
    results = deliver(agent, ["alice@mx.test", "ALICE+x@mx.test", "bob@mx.test"])
    assert outcomes(results) == [DELIVERED] * 3
    assert len(maildir_messages(tmp_path / "alice.maildir")) == 1
    assert len(maildir_messages(tmp_path / "bob.maildir")) == 1


def test_symlinked_maildir_is_refused_and_deferred(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "alice.maildir").symlink_to(elsewhere)
    agent = make_agent(make_config(tmp_path), tmp_path)
    (result,) = deliver(agent, ["alice@mx.test"])
    assert result.outcome is Outcome.DEFERRED and result.status == "4.2.0"
    assert "symbolic link" in result.text
    assert os.listdir(elsewhere) == []


def test_missing_parent_directories_are_made_by_the_writer(tmp_path: Path) -> None:
    config = make_config(tmp_path, path=f"{tmp_path}/missing/{{user}}/Maildir")
    assert outcomes(deliver(make_agent(config, tmp_path), ["alice@mx.test"])) == [DELIVERED]
    assert len(maildir_messages(tmp_path / "missing" / "alice" / "Maildir")) == 1
    for made in (tmp_path / "missing", tmp_path / "missing" / "alice"):
        assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
        assert os.stat(made).st_uid == os.stat(tmp_path).st_uid  # the writer's, not root's


def test_a_parent_the_writer_may_not_make_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)  # as root: root's, so the writer (VIRTUAL) may not write it
    config = make_config(tmp_path, path=f"{locked}/{{user}}/Maildir")
    (result,) = deliver(make_agent(config, tmp_path), ["alice@mx.test"])
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.3.0")
    assert f"cannot create {locked}/alice: Permission denied" in result.text
    assert os.listdir(locked) == []


# --- mbox --------------------------------------------------------------------------


def test_mbox_delivery_appends_with_from_line_and_trace_headers(tmp_path: Path) -> None:
    agent = make_agent(make_config(tmp_path, mailbox_kind="mbox"), tmp_path)
    assert outcomes(deliver(agent, ["bob@mx.test"])) == [DELIVERED]
    assert outcomes(deliver(agent, ["bob@mx.test"], sender="")) == [DELIVERED]
    path = tmp_path / "bob.mbox"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first, second = mbox_messages(path)
    assert first.get_from().startswith("sender@remote.example ")
    assert second.get_from().startswith("MAILER-DAEMON ")
    assert first["Return-Path"] == "<sender@remote.example>"
    assert first["Delivered-To"] == "bob@mx.test"
    assert second["Return-Path"] == "<>"
    raw = path.read_bytes()
    assert b"\r" not in raw
    assert raw.startswith(b"From sender@remote.example ")
    assert raw.endswith(b"not quoted\n\n")
    assert not os.path.exists(f"{path}.lock")


def test_mboxrd_quoting_round_trips(tmp_path: Path) -> None:
    agent = make_agent(make_config(tmp_path, mailbox_kind="mbox"), tmp_path)
    deliver(agent, ["bob@mx.test"])
    (message,) = mbox_messages(tmp_path / "bob.mbox")
    stored = message.as_bytes()
    assert b"\n>From the beginning\n>>From a quoted line\n>>>From twice\n" in stored
    assert b"\nFromage is not quoted\n From indented is not quoted\n" in stored
    expected = b"Return-Path: <sender@remote.example>\nDelivered-To: bob@mx.test\n"
    expected += MESSAGE.replace(b"\r\n", b"\n")
    assert unquote_mboxrd(stored) == expected


def test_message_without_final_newline_and_foreign_mbox_tail(tmp_path: Path) -> None:
    path = tmp_path / "bob.mbox"
    path.write_bytes(b"From x Thu Jan  1 00:00:00 2026\nSubject: old\n\nno blank line after")
    give_to_virtual(path)
    agent = make_agent(make_config(tmp_path, mailbox_kind="mbox"), tmp_path)
    deliver(agent, ["bob@mx.test"], b"Subject: new\r\n\r\nno newline at the end")
    old, new = mbox_messages(path)
    assert old["Subject"] == "old" and new["Subject"] == "new"
    assert path.read_bytes().endswith(b"no newline at the end\n\n")


APPENDER = """
import sys
from leafmail.delivery.local import Copy, LockPolicy, append_mbox, mbox_entry
path, who, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(count):
    head = "Subject: %s-%d\\r\\n\\r\\n" % (who, i)
    body = head.encode() + b"From a line that needs quoting\\r\\n" * 300
    append_mbox(path, mbox_entry(Copy("s@x.test", "r@y.test", body), 0.0), None, LockPolicy(60))
"""


def test_concurrent_appends_from_processes_and_tasks_stay_intact(tmp_path: Path) -> None:
    path = tmp_path / "bob.mbox"
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(path), f"proc{n}", "15"])
        for n in range(4)
    ]
    agent = make_agent(make_config(tmp_path, mailbox_kind="mbox"), tmp_path)

    async def many() -> list[dict[int, Result]]:
        body = b"Subject: task\r\n\r\n" + b"From a line that needs quoting\r\n" * 300
        envelope = Envelope(SENDER, (Recipient("bob@mx.test"),))
        return await asyncio.gather(*(agent.deliver(envelope, body, [0]) for _ in range(15)))

    task_results = asyncio.run(many())
    assert all(proc.wait(60) == 0 for proc in procs)
    assert all(r[0].outcome is Outcome.DELIVERED for r in task_results)
    messages = mbox_messages(path)
    subjects = sorted(str(m["Subject"]) for m in messages)
    expected = sorted([f"proc{n}-{i}" for n in range(4) for i in range(15)] + ["task"] * 15)
    assert subjects == expected
    for message in messages:
        payload = message.get_payload(decode=True)
        assert isinstance(payload, bytes)
        assert payload == b">From a line that needs quoting\n" * 300


def test_held_dotlock_defers_within_the_bound_and_is_left_alone(tmp_path: Path) -> None:
    lock = tmp_path / "bob.mbox.lock"
    lock.write_text("12345\n")
    config = make_config(tmp_path, mailbox_kind="mbox")
    agent = make_agent(config, tmp_path, locks=LockPolicy(timeout=0.2))
    (result,) = deliver(agent, ["bob@mx.test"])
    assert result.outcome is Outcome.DEFERRED and result.status == "4.2.0"
    assert "bob.mbox.lock is held" in result.text
    assert not (tmp_path / "bob.mbox").exists()
    assert lock.read_text() == "12345\n"


def test_stale_dotlock_is_broken(tmp_path: Path) -> None:
    lock = tmp_path / "bob.mbox.lock"
    lock.write_text("12345\n")
    past = os.stat(lock).st_mtime - 3600
    os.utime(lock, (past, past))
    agent = make_agent(make_config(tmp_path, mailbox_kind="mbox"), tmp_path)
    assert outcomes(deliver(agent, ["bob@mx.test"])) == [DELIVERED]
    assert not lock.exists()
    assert len(mbox_messages(tmp_path / "bob.mbox")) == 1


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_fcntl_lock_of_another_process_is_honoured(tmp_path: Path) -> None:
    path = tmp_path / "bob.mbox"
    path.touch(0o600)
    give_to_virtual(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        config = make_config(tmp_path, mailbox_kind="mbox")
        agent = make_agent(config, tmp_path, locks=LockPolicy(timeout=0.2))
        (result,) = deliver(agent, ["bob@mx.test"])
        assert result.outcome is Outcome.DEFERRED and result.status == "4.2.0"
        assert path.read_bytes() == b""
        assert not (tmp_path / "bob.mbox.lock").exists()  # our dotlock was let go
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert outcomes(deliver(agent, ["bob@mx.test"])) == [DELIVERED]


PATIENT_HOLDER = """
import fcntl, os, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
deadline = time.monotonic() + 30
while not os.path.exists(path + ".lock") and time.monotonic() < deadline:
    time.sleep(0.002)  # the deliverer has its dotlock and now waits for our fcntl lock
print("size", os.fstat(fd).st_size, flush=True)
"""


def test_delivery_waits_for_a_lock_that_is_let_go(tmp_path: Path) -> None:
    path = tmp_path / "bob.mbox"
    path.touch(0o600)
    give_to_virtual(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", PATIENT_HOLDER, str(path)], stdout=subprocess.PIPE
    )
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        config = make_config(tmp_path, mailbox_kind="mbox")
        agent = make_agent(config, tmp_path, locks=LockPolicy(timeout=30))
        assert outcomes(deliver(agent, ["bob@mx.test"])) == [DELIVERED]
        assert holder.stdout.read() == b"size 0\n"  # nothing was written while it held it
    finally:
        holder.kill()
        holder.wait(10)
    assert len(mbox_messages(path)) == 1


def test_hard_linked_or_symlinked_mbox_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    give_to_virtual(victim)
    os.link(victim, tmp_path / "bob.mbox")
    (tmp_path / "alice.mbox").symlink_to(victim)
    agent = make_agent(make_config(tmp_path, mailbox_kind="mbox"), tmp_path)
    results = deliver(agent, ["bob@mx.test", "alice@mx.test"])
    assert [r.status for r in results] == ["4.2.0", "4.2.0"]
    assert "hard links" in results[0].text and "symbolic link" in results[1].text
    assert victim.read_bytes() == b"precious\n"


FILLER = """
import resource, signal, sys
from leafmail.delivery.local import Copy, append_mbox, mbox_entry
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
limit = len(open(path, "rb").read()) + 1000
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    append_mbox(path, mbox_entry(Copy("s@x.test", "r@y.test", b"x" * 100000), 0.0))
except OSError as exc:
    print(exc.errno)
"""


def test_a_failed_append_leaves_the_mbox_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "bob.mbox"
    agent = make_agent(make_config(tmp_path, mailbox_kind="mbox"), tmp_path)
    deliver(agent, ["bob@mx.test"])
    before = path.read_bytes()
    done = subprocess.run(
        [sys.executable, "-c", FILLER, str(path)], capture_output=True, check=True
    )
    assert done.stdout.strip() == b"27"  # EFBIG: the file size limit cut the write short
    assert path.read_bytes() == before
    assert not (tmp_path / "bob.mbox.lock").exists()


# --- who exists ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["zed@mx.test", '"../etc"@mx.test', '".hidden"@mx.test', '"a/b"@mx.test', "-rf@mx.test"],
)
def test_unknown_or_unsafe_users_fail_5_1_1(tmp_path: Path, address: str) -> None:
    agent = make_agent(make_config(tmp_path), tmp_path)
    (result,) = deliver(agent, [address])
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.1.1")
    assert sorted(os.listdir(tmp_path)) == ["spool"]


def test_postmaster_is_always_deliverable(tmp_path: Path) -> None:
    agent = make_agent(make_config(tmp_path, users=["alice"]), tmp_path)
    results = deliver(agent, ["postmaster", "PostMaster@mx.test"])
    assert outcomes(results) == [DELIVERED] * 2
    assert len(maildir_messages(tmp_path / "postmaster.maildir")) == 1


def test_postmaster_alias_wins(tmp_path: Path) -> None:
    config = make_config(tmp_path, users=["alice"], aliases="postmaster: alice\n")
    assert outcomes(deliver(make_agent(config, tmp_path), ["postmaster"])) == [DELIVERED]
    assert len(maildir_messages(tmp_path / "alice.maildir")) == 1
    assert not (tmp_path / "postmaster.maildir").exists()


def test_system_accounts_when_no_users_are_listed(tmp_path: Path) -> None:
    config = make_config(tmp_path, users=())
    agent = make_agent(config, tmp_path)
    results = deliver(agent, [f"{ME}@mx.test", "no-such-account-here@mx.test"])
    assert outcomes(results) == [DELIVERED, (Outcome.FAILED, "5.1.1")]
    assert len(maildir_messages(tmp_path / f"{ME}.maildir")) == 1


def test_forwarding_loop_is_detected(tmp_path: Path) -> None:
    agent = make_agent(make_config(tmp_path), tmp_path)
    looped = b"Delivered-To: ALICE@mx.test\r\n" + MESSAGE
    results = deliver(agent, ["alice@mx.test", "bob@mx.test"], looped)
    assert outcomes(results) == [(Outcome.FAILED, "5.4.6"), DELIVERED]


# --- aliases: commands ---------------------------------------------------------------

RECORDER = """
import json, os, sys
data = sys.stdin.buffer.read()
env = {k: os.environ.get(k) for k in ("SENDER", "RECIPIENT", "LOCAL", "DOMAIN", "PATH")}
with open(sys.argv[1], "w") as f:
    json.dump({"argv": sys.argv[2:], "stdin": data.decode("latin-1"), "env": env}, f)
"""
EXITER = """
import sys
sys.stdout.write("o" * 300000)
sys.stderr.write(sys.argv[2] + "\\n" + "e" * 300000)
sys.exit(int(sys.argv[1]))
"""
HANGER = """
import os, sys, threading
open(sys.argv[1], "w").write(str(os.getpid()))
threading.Event().wait()
"""


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return f"{PYTHON} {path}"


def test_command_gets_the_message_on_stdin_and_no_shell(tmp_path: Path) -> None:
    out, pwned = tmp_path / "out.json", tmp_path / "pwned"
    recorder = script(tmp_path, "recorder.py", RECORDER)
    aliases = f"tickets: \"|{recorder} {out} a;b $(touch {pwned}) `touch {pwned}` 'x y' |\"\n"
    agent = make_agent(make_config(tmp_path, aliases=aliases), tmp_path)
    assert outcomes(deliver(agent, ["tickets@mx.test"])) == [DELIVERED]
    seen = json.loads(out.read_text())
    assert seen["argv"] == ["a;b", "$(touch", f"{pwned})", "`touch", f"{pwned}`", "x y", "|"]
    assert not pwned.exists()
    expected = b"Return-Path: <sender@remote.example>\nDelivered-To: tickets@mx.test\n"
    assert seen["stdin"].encode("latin-1") == expected + MESSAGE.replace(b"\r\n", b"\n")
    assert seen["env"]["SENDER"] == SENDER and seen["env"]["RECIPIENT"] == "tickets@mx.test"
    assert seen["env"]["LOCAL"] == "tickets" and seen["env"]["DOMAIN"] == "mx.test"


@pytest.mark.parametrize(
    ("code", "expected", "needle"),
    [
        (0, DELIVERED, "delivered to command"),
        (75, (Outcome.DEFERRED, "4.3.0"), "try later: busy now"),
        (1, (Outcome.FAILED, "5.3.0"), "(exit 1): busy now"),
    ],
)
def test_command_exit_codes(
    tmp_path: Path, code: int, expected: tuple[Outcome, str], needle: str
) -> None:
    exiter = script(tmp_path, "exiter.py", EXITER)
    aliases = f"run: \"|{exiter} {code} 'busy now'\"\n"
    agent = make_agent(make_config(tmp_path, aliases=aliases), tmp_path)
    (result,) = deliver(agent, ["run@mx.test"])
    assert (result.outcome, result.status) == expected
    assert needle in result.text
    assert len(result.text) < 400  # the rest of the output was dropped


def test_a_command_gets_sigpipe_at_its_default(tmp_path: Path) -> None:
    """The delivery child ignores SIGPIPE, as Python and the smtpd/qmgr workers do (a
    write to a closed pipe is EPIPE there); the command must not inherit that, or
    `producer | head` in it would run on after head left. sh, not Python: Python ignores
    SIGPIPE itself at start-up."""
    out = tmp_path / "sigign"
    aliases = f"sig: \"|/bin/sh -c 'grep SigIgn: /proc/self/status > {out}'\"\n"
    assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN  # as in a worker
    agent = make_agent(make_config(tmp_path, aliases=aliases), tmp_path)
    assert outcomes(deliver(agent, ["sig@mx.test"])) == [DELIVERED]
    mask = int(out.read_text().split()[1], 16)
    assert not mask & (1 << (signal.SIGPIPE - 1)), hex(mask)


def test_command_timeout_defers_and_kills_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    hanger = script(tmp_path, "hanger.py", HANGER)
    config = make_config(tmp_path, aliases=f"slow: |{hanger} {pidfile}\n", timeout=0.5)
    (result,) = deliver(make_agent(config, tmp_path), ["slow@mx.test"])
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.3.0")
    assert "timed out" in result.text
    assert has_ended(int(pidfile.read_text()))


class Cancellable:
    """A delivery run on its own loop in a thread, which the test cancels as the daemon
    stopping does; `ended` says how it ended."""

    def __init__(self, agent: LocalAgent, rcpt: str, data: bytes) -> None:
        self.loop = asyncio.new_event_loop()
        envelope = Envelope(SENDER, (Recipient(rcpt),))
        self.task = self.loop.create_task(agent.deliver(envelope, data, [0]))
        self.ended: list[str] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.task)
            self.ended.append("finished")
        except asyncio.CancelledError:
            self.ended.append("cancelled")
        finally:
            self.loop.close()

    def cancel(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)

    def join(self) -> None:
        self.thread.join(60)


STUBBORN = """
import os, signal, sys, threading
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write(str(os.getpid()))
threading.Event().wait()
"""


def test_a_command_that_ignores_the_stop_is_killed_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command delivery cancelled (the daemon stopping) asks the command to stop
    (SIGTERM, with its delivery child); one that ignores that is killed once the grace
    has passed, not left running."""
    monkeypatch.setattr(asuser, "STOP_GRACE", 0.2)
    pidfile = tmp_path / "pid"
    stubborn = script(tmp_path, "stubborn.py", STUBBORN)
    config = make_config(tmp_path, aliases=f"slow: |{stubborn} {pidfile}\n", timeout=60.0)
    delivery = Cancellable(make_agent(config, tmp_path), "slow@mx.test", MESSAGE)
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text() != "", "no command")
    finally:
        delivery.cancel()
        delivery.join()
    assert delivery.ended == ["cancelled"]
    assert has_ended(int(pidfile.read_text()))


def has_ended(pid: int) -> bool:
    """The process has exited (its pidfd is readable once it has, even as a zombie that
    init has yet to reap: it was killed with its delivery child, its parent)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], 10)[0])
    finally:
        os.close(fd)


def test_missing_command_defers(tmp_path: Path) -> None:
    config = make_config(tmp_path, aliases=f"x: |{tmp_path}/no-such-program\n")
    (result,) = deliver(make_agent(config, tmp_path), ["x@mx.test"])
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.3.0")


# --- aliases: chains, files, includes, forwards --------------------------------------


def test_alias_chain_loop_and_include(tmp_path: Path) -> None:
    members = tmp_path / "members.txt"
    members.write_text("# the list\nbob\n", encoding="utf-8")
    aliases = (
        "postmaster: admins\nadmins: alice, team\n"
        f"team: :include:{members}\nloop1: loop2\nloop2: loop1\n"
    )
    agent = make_agent(make_config(tmp_path, aliases=aliases), tmp_path)
    results = deliver(agent, ["postmaster@mx.test", "loop1@mx.test", "team@mx.test"])
    assert outcomes(results) == [DELIVERED, (Outcome.FAILED, "5.4.6"), DELIVERED]
    assert len(maildir_messages(tmp_path / "alice.maildir")) == 1
    assert len(maildir_messages(tmp_path / "bob.maildir")) == 1  # shared by two recipients


def test_partly_failing_alias_fails_with_the_reason(tmp_path: Path) -> None:
    config = make_config(tmp_path, aliases="team: alice, ghost\n")
    (result,) = deliver(make_agent(config, tmp_path), ["team@mx.test"])
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.1.1")
    assert "1 of 2 copies delivered" in result.text and "ghost" in result.text


def test_partly_deferred_alias_defers(tmp_path: Path) -> None:
    config = make_config(tmp_path, aliases=f"team: alice, |{tmp_path}/missing\n")
    (result,) = deliver(make_agent(config, tmp_path), ["team@mx.test"])
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.3.0")


def test_file_target_is_appended_as_mbox(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    config = make_config(tmp_path, aliases=f"archive: {archive}, alice\n")
    agent = make_agent(config, tmp_path)
    assert outcomes(deliver(agent, ["archive@mx.test"])) == [DELIVERED]
    (message,) = mbox_messages(archive)
    assert message["Delivered-To"] == "archive@mx.test"
    assert len(maildir_messages(tmp_path / "alice.maildir")) == 1


def test_remote_targets_are_forwarded_through_the_spool(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, aliases="alice: \\alice, carol@remote.example, dave@other.example\n"
    )
    queued: list[str] = []
    agent = make_agent(config, tmp_path, notify=queued.append)
    envelope = Envelope(SENDER, (Recipient("alice@mx.test", ("FAILURE",), None),), body="8BITMIME")
    results = asyncio.run(agent.deliver(envelope, MESSAGE, [0]))
    assert results[0].outcome is Outcome.DELIVERED
    assert len(maildir_messages(tmp_path / "alice.maildir")) == 1
    spool = agent.spool
    assert spool.ids(QueueState.QUEUE) == queued and len(queued) == 1
    forwarded = spool.get(queued[0])
    assert forwarded.envelope.sender == SENDER
    assert forwarded.envelope.body == "8BITMIME"
    assert forwarded.envelope.recipients == (
        Recipient("carol@remote.example", ("FAILURE",), "rfc822;alice@mx.test"),
        Recipient("dave@other.example", ("FAILURE",), "rfc822;alice@mx.test"),
    )
    assert forwarded.data == b"Delivered-To: alice@mx.test\r\n" + MESSAGE


def test_forwarded_copy_coming_back_is_a_loop(tmp_path: Path) -> None:
    config = make_config(tmp_path, aliases="alice: carol@remote.example\n")
    agent = make_agent(config, tmp_path)
    deliver(agent, ["alice@mx.test"])
    (qid,) = agent.spool.ids(QueueState.QUEUE)
    back = agent.spool.get(qid).data
    (result,) = deliver(agent, ["alice@mx.test"], back)
    assert (result.outcome, result.status) == (Outcome.FAILED, "5.4.6")


def test_broken_aliases_file_is_a_config_error_then_defers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"aliases:1: "):
        make_agent(make_config(tmp_path, aliases="oops\n"), tmp_path)
    agent = make_agent(make_config(tmp_path, aliases="x: alice\n"), tmp_path)
    path = tmp_path / "aliases"
    path.write_text("x: alice\ny\n", encoding="utf-8")
    (result,) = deliver(agent, ["x@mx.test"])
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.3.5")
    assert "aliases:2:" in result.text


# --- the queue runner, end to end ----------------------------------------------------


def test_queue_runner_delivers_to_a_maildir_once(tmp_path: Path) -> None:
    config = make_config(tmp_path, path=f"{tmp_path}/boxes/{{user}}")
    spool = Spool(tmp_path / "spool")
    agent = build_agent(config.queue, spool)
    assert agent is not None
    now = [time.time()]
    runner = QueueRunner(spool, agent, RetryPolicy(), hostname=HOST, clock=lambda: now[0])
    envelope = Envelope(SENDER, (Recipient("alice@mx.test"), Recipient("bob@mx.test")))
    qid = spool.commit(envelope, MESSAGE)
    (tmp_path / "boxes").mkdir()
    (tmp_path / "boxes" / "bob").mkdir()
    give_to_virtual(tmp_path / "boxes", tmp_path / "boxes" / "bob")
    (tmp_path / "boxes" / "bob").chmod(0o500)  # bob's maildir cannot take tmp/ yet
    first = asyncio.run(runner.run_once())
    assert first.counts["deferred"] == 1
    assert spool.ids(QueueState.DEFERRED) == [qid]
    assert len(maildir_messages(tmp_path / "boxes" / "alice")) == 1
    bob = tmp_path / "boxes" / "bob"
    bob.chmod(0o700)
    now[0] += 3600
    second = asyncio.run(runner.run_once(force=True))
    assert second.counts["delivered"] == 1
    assert spool.ids(QueueState.DEFERRED) == [] and spool.ids(QueueState.QUEUE) == []
    assert len(maildir_messages(tmp_path / "boxes" / "alice")) == 1  # not again
    assert len(maildir_messages(bob)) == 1


def test_unknown_recipient_bounces_through_the_runner(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    spool = Spool(tmp_path / "spool")
    agent = build_agent(config.queue, spool)
    runner = QueueRunner(spool, agent, RetryPolicy(), hostname=HOST, clock=time.time)
    qid = spool.commit(Envelope(SENDER, (Recipient("zed@mx.test"),)), MESSAGE)
    summary = asyncio.run(runner.run_once())
    assert summary.counts["bounced"] == 1
    assert qid not in spool.ids(QueueState.QUEUE) + spool.ids(QueueState.DEFERRED)
    dsns = [spool.get(q) for q in spool.ids(QueueState.QUEUE) + spool.ids(QueueState.DEFERRED)]
    assert [d.envelope.recipients[0].address for d in dsns] == [SENDER]
    assert b"5.1.1" in dsns[0].data


# --- the RCPT check ------------------------------------------------------------------


def recipient_check(config: Config) -> Check:
    return local_recipient_check(config.local, config.local_domains, config.route_for)


def rcpt(local: str, domain: str = HOST) -> CheckContext:
    return CheckContext(client_ip=None, recipient=Mailbox(local, domain))


def test_local_recipient_check(tmp_path: Path) -> None:
    config = make_config(tmp_path, aliases="staff: alice\n")
    check = recipient_check(config)
    for ok in (
        rcpt("alice"),
        rcpt("Alice+tag"),
        rcpt("staff"),
        rcpt("Postmaster", ""),
        rcpt("postmaster"),
        rcpt("zed", "elsewhere.example"),
        CheckContext(client_ip=None),
    ):
        assert check(ok) is ACCEPT
    for bad in (rcpt("zed"), rcpt('"../alice"'), rcpt("ZED", "MX.TEST.")):
        verdict = check(bad)
        assert isinstance(verdict, Reject)
        assert (verdict.reply.code, verdict.reply.enhanced) == (550, "5.1.1")
    (tmp_path / "aliases").write_text("broken\n", encoding="utf-8")
    verdict = check(rcpt("staff"))
    assert isinstance(verdict, Defer) and verdict.reply.code == 451


def test_local_recipient_check_leaves_other_routes_alone(tmp_path: Path) -> None:
    routed = make_config(
        tmp_path,
        routes={HOST: "smarthost"},
        delivery={"smarthost": "smart.example:25", "tls": "none"},
    )
    assert recipient_check(routed)(rcpt("zed")) is ACCEPT
    no_local = _build({"hostname": HOST}, "test")
    assert recipient_check(no_local)(rcpt("zed")) is ACCEPT


def test_mbox_entry_sender_without_spaces() -> None:
    entry = mbox_entry(Copy('"a b"@x.test', "r@y.test", b"Subject: s\r\n\r\nx\r\n"), 0.0)
    assert entry.split(b"\n", 1)[0].startswith(b'From "a_b"@x.test ')


def test_fifo_or_directory_in_place_of_the_mbox_defers_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "bob.mbox")
    give_to_virtual(tmp_path / "bob.mbox")
    (tmp_path / "alice.mbox").mkdir()
    agent = make_agent(make_config(tmp_path, mailbox_kind="mbox"), tmp_path)
    bob, alice = deliver(agent, ["bob@mx.test", "alice@mx.test"])
    assert (bob.outcome, bob.status) == (Outcome.DEFERRED, "4.2.0")
    assert "not a regular file" in bob.text
    assert (alice.outcome, alice.status) == (Outcome.DEFERRED, "4.3.0")
    with pytest.raises(IsADirectoryError):
        append_mbox(str(tmp_path / "alice.mbox"), b"From x\n\n")


# --- bugs found elsewhere (config.py): strict xfails until fixed ----------------------


def test_zero_command_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="command_timeout"):
        _build({"hostname": HOST, "local": {"command_timeout": 0}}, "test")


@pytest.mark.parametrize("path", ["Maildir/{user}", "/var/mail/{usr}"])
def test_bad_local_path_template_is_a_config_error(path: str) -> None:
    with pytest.raises(ConfigError, match=r"local\.path"):
        _build({"hostname": HOST, "local": {"path": path}}, "test")


GATE = """\
import sys
sys.stdin.buffer.read()
with open(sys.argv[1], "rb") as gate:  # blocks until the test opens the FIFO to write
    gate.read()
"""


def test_a_recipient_delivered_while_another_waits_is_recorded_at_once(tmp_path: Path) -> None:
    """alice's mailbox takes the message at once; bob's alias runs a command that waits
    (a slow filter, up to its command_timeout). While it waits, the status record must
    already say alice has it, or a crash then gives her a second copy at the retry."""
    gate = tmp_path / "gate"
    os.mkfifo(gate, 0o666)
    gate.chmod(0o666)
    waiter = script(tmp_path, "gate.py", GATE)
    aliases = f'bob: "|{waiter} {gate}"\n'
    config = make_config(tmp_path, users=("alice",), aliases=aliases, timeout=60.0)
    spool = Spool(tmp_path / "spool")
    agent = build_agent(config.queue, spool)
    assert agent is not None
    runner = QueueRunner(spool, agent, RetryPolicy(), hostname=HOST, clock=time.time)
    qid = spool.commit(
        Envelope(SENDER, (Recipient("alice@mx.test"), Recipient("bob@mx.test"))), MESSAGE
    )
    summary: list[Any] = []
    passing = threading.Thread(target=lambda: summary.append(asyncio.run(runner.run_once())))
    passing.start()
    try:
        deadline = time.monotonic() + 30.0
        while recorded_states(spool, qid) != [RcptState.DELIVERED, RcptState.PENDING]:
            assert time.monotonic() < deadline, f"not recorded: {recorded_states(spool, qid)}"
            assert passing.is_alive(), f"the pass ended before bob was let go: {summary}"
            time.sleep(0.01)  # polling a condition, with a bound
    finally:
        let_go(gate)
        passing.join(30.0)
    assert summary[0].counts["delivered"] == 1
    assert len(maildir_messages(tmp_path / "alice.maildir")) == 1
    assert spool.find(qid) is None


def let_go(gate: Path) -> None:
    """Open the FIFO for writing once the command has it open to read, and close it:
    the command reads its end and exits (opened too early, it would wait for ever)."""
    deadline = time.monotonic() + 30.0
    while True:
        try:
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
        time.sleep(0.01)  # the command has not opened it yet: poll, with a bound


def recorded_states(spool: Spool, qid: str) -> list[RcptState] | None:
    blob = spool.read_status(qid)
    if blob is None:
        return None
    return [r.state for r in MessageStatus.from_bytes(blob, spool.get(qid).envelope).recipients]


STRACE = shutil.which("strace")
_MADE = re.compile(r'^\d+\s+mkdir(?:at)?\((?:\d+<([^>]*)>, )?"([^"]+)", \S+\) = 0', re.M)
_SYNCED = re.compile(r"^\d+\s+fsync\(\d+<([^>]*)>\) = 0", re.M)


@pytest.mark.skipif(STRACE is None, reason="needs strace to see the fsync calls")
def test_every_directory_a_maildir_delivery_makes_is_synced_in_its_parent(
    tmp_path: Path,
) -> None:
    """A first delivery to a virtual Maildir whose parents do not exist yet: every
    directory made, the parents too, is followed by an fsync of the directory it was
    made in, or a power cut on a file system without a journal can forget the parent's
    entry and with it the mail reported delivered (the spool then has removed it)."""
    target = tmp_path / "vmail" / "example.test" / "alice" / "Maildir"
    code = (
        "from leafmail.delivery.maildir import write_maildir\n"
        f"write_maildir({str(target)!r}, b'Subject: x\\n\\nbody\\n')\n"
    )
    trace = tmp_path / "trace"
    argv = [str(STRACE), "-f", "-y", "-e", "trace=mkdir,mkdirat,fsync", "-o", str(trace)]
    subprocess.run([*argv, sys.executable, "-c", code], check=True, timeout=60)
    text = trace.read_text()
    made = [(m.start(), os.path.join(m[1] or "", m[2])) for m in _MADE.finditer(text)]
    synced = [(m.start(), m[1]) for m in _SYNCED.finditer(text)]
    assert {path for _at, path in made} >= {str(target), str(tmp_path / "vmail")}, text
    unsynced = [
        path
        for at, path in made
        if not any(when > at and where == os.path.dirname(path) for when, where in synced)
    ]
    assert unsynced == [], text


def test_a_utf8_remote_target_makes_the_forwarded_copy_smtputf8(tmp_path: Path) -> None:
    """The copy of an ASCII message for a UTF-8 address needs SMTPUTF8 (RFC 6531 3.2):
    marked so, it is sent with it (or refused by a hop without it) and its bounce uses
    the RFC 6533 types, instead of a RCPT the client cannot encode."""
    config = make_config(tmp_path, aliases="alice: j\u00f6s\u00e9@remote.example\n")
    agent = make_agent(config, tmp_path)
    assert outcomes(deliver(agent, ["alice@mx.test"])) == [DELIVERED]
    (qid,) = agent.spool.ids(QueueState.QUEUE)
    forwarded = agent.spool.get(qid).envelope
    assert [r.address for r in forwarded.recipients] == ["j\u00f6s\u00e9@remote.example"]
    assert forwarded.smtputf8 is True


class NoRoomForStatus(Spool):
    """A spool whose status records cannot be written while `full` (ENOSPC)."""

    full = True

    def write_status(self, qid: str, blob: bytes) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write_status(qid, blob)


UNTIL_OPEN = """\
import os, sys
sys.stdin.buffer.read()
sys.exit(0 if os.path.exists(sys.argv[1]) else 75)
"""


def test_an_alias_target_delivered_in_an_unrecorded_attempt_gets_no_copy_again(
    tmp_path: Path,
) -> None:
    """team: alice and a command that says "try later". alice has her copy, but the
    record saying so cannot be written (a full disk): the runner keeps that mark in
    memory with the attempt's other results (`message.Unrecorded`), so pass after pass
    alice gets no copy again, and once there is room the mark is recorded."""
    flag = tmp_path / "open"
    waiter = script(tmp_path, "until_open.py", UNTIL_OPEN)
    config = make_config(tmp_path, aliases=f'team: alice, "|{waiter} {flag}"\n')
    spool = NoRoomForStatus(tmp_path / "spool")
    agent = build_agent(config.queue, spool)
    assert agent is not None
    clock = [time.time()]
    policy = RetryPolicy(initial=300.0, maximum=2400.0)
    runner = QueueRunner(spool, agent, policy, hostname=HOST, clock=lambda: clock[0])
    qid = spool.commit(Envelope(SENDER, (Recipient("team@mx.test"),)), MESSAGE)
    for _ in range(3):
        assert asyncio.run(runner.run_once()).counts["deferred"] == 1
        assert spool.read_status(qid) is None  # nothing recorded
        clock[0] += policy.initial
    assert len(maildir_messages(tmp_path / "alice.maildir")) == 1
    spool.full = False
    assert asyncio.run(runner.run_once()).counts["deferred"] == 1
    blob = spool.read_status(qid)
    assert blob is not None
    (team,) = MessageStatus.from_bytes(blob, spool.get(qid).envelope).recipients
    assert [m.key for m in team.targets if m.state.final] == ["user:alice"]
    flag.touch()
    assert asyncio.run(runner.run_once(force=True)).counts["delivered"] == 1
    assert spool.find(qid) is None
    assert len(maildir_messages(tmp_path / "alice.maildir")) == 1


# --- a delivery stopped half-way --------------------------------------------------------


def lock_owner(lock: Path) -> int:
    """The pid the mbox writer put in its dotlock (it holds it, and waits for the
    fcntl lock next): polled, with a bound, until it is there."""
    deadline = time.monotonic() + 30.0
    while True:
        with contextlib.suppress(FileNotFoundError):
            first, newline, _ = lock.read_text().partition("\n")
            if newline:
                return int(first)
        assert time.monotonic() < deadline, "the writer never took its dotlock"
        time.sleep(0.01)  # polling a condition, with a bound


def process_state(pid: int) -> str:
    """'Z' ended, '' reaped, or another state letter; from /proc/PID/stat."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat_line.rpartition(")")[2].split()[0]


def sigterm_pending(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if "Pnd:" in line]
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in masks)


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30.0
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)  # polling a condition, with a bound


@pytest.mark.skipif(STRACE is None, reason="needs strace to stop the writer mid-append")
def test_a_delivery_stopped_mid_append_leaves_no_part_of_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon stopping cancels a local delivery while its writer is half-way through
    a large mbox entry (strace stops it at the entry of its second write; another
    program's fcntl lock holds it back until strace is attached). The writer must cut
    the mbox back and remove its dotlock before it exits (before: it was SIGKILLed, and
    the mbox kept the first part of the message, under a dotlock left stale for 500 s),
    so the retry appends the one whole copy the user sees."""
    monkeypatch.setattr(
        asuser, "STOP_GRACE", 60.0, raising=False
    )  # the test resumes the writer itself
    path, lock = tmp_path / "bob.mbox", tmp_path / "bob.mbox.lock"
    path.touch(0o600)
    give_to_virtual(path)
    big = MESSAGE + b"a line of text to make the message large enough\r\n" * 100_000
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == b"locked\n"
    agent = make_agent(
        make_config(tmp_path, mailbox_kind="mbox"), tmp_path, locks=LockPolicy(timeout=60)
    )
    delivery = Cancellable(agent, "bob@mx.test", big)
    tracer: subprocess.Popen[bytes] | None = None
    writer = 0
    try:
        writer = lock_owner(lock)
        inject = "inject=write:signal=SIGSTOP:when=2"
        argv = [str(STRACE), "-p", str(writer), "-e", "trace=write", "-e", inject]
        tracer = subprocess.Popen(argv, stderr=subprocess.PIPE)
        assert tracer.stderr is not None
        assert b"attached" in tracer.stderr.readline()
        holder.stdin.close()  # the writer gets the fcntl lock and starts to append
        seen = b""
        while b"stopped by SIGSTOP" not in seen:  # the writer ends (lock timeout): EOF
            line = tracer.stderr.readline()
            assert line, f"the writer was never stopped: {seen[-500:]!r}"
            seen += line
        assert 0 < path.stat().st_size < len(big)  # half-way
        delivery.cancel()
        wait_until(
            lambda: sigterm_pending(writer) or process_state(writer) in ("", "Z"),
            "the writer was neither asked to stop nor killed",
        )
    finally:
        if tracer is not None:
            tracer.terminate()  # strace detaches; the writer stays stopped
            tracer.wait(30)
        if writer:
            with contextlib.suppress(ProcessLookupError):
                os.kill(writer, signal.SIGCONT)
        holder.kill()
        holder.wait(30)
        delivery.join()
    assert delivery.ended == ["cancelled"]
    left = path.stat().st_size
    assert left == 0, f"the stopped delivery left {left} bytes in the mbox (lock: {lock.exists()})"
    assert not lock.exists(), "the dotlock was left behind"
    assert outcomes(deliver(agent, ["bob@mx.test"], big)) == [DELIVERED]
    (message,) = mbox_messages(path)
    assert message.as_bytes().endswith(b"a line of text to make the message large enough\n")


LINE = b"a line of text to make the message large enough\r\n"


def stopping_append(path: str, entry: bytes) -> dict[str, Any]:
    """In a delivery child: append_mbox, which stops itself (SIGSTOP) at its first write
    after part of the entry is in the mbox, for the test to kill it there."""
    write = os.write

    def stop_half_way(fd: int, data: Any) -> int:
        if os.path.getsize(path) > 0:
            os.kill(os.getpid(), signal.SIGSTOP)
        return write(fd, data)

    os.write = stop_half_way  # in the forked child only
    append_mbox(path, entry)
    return {}


def test_a_killed_writers_lock_and_part_entry_are_cleaned_up_by_the_next(tmp_path: Path) -> None:
    """A writer killed half-way through an entry (SIGKILL: past the stop grace, or by the
    OOM killer) cannot clean up. The next delivery must not wait out its dotlock (before:
    held for 500 s, the delivery deferred after its lock timeout) and must cut off the part
    of an entry it left, so the mbox holds one whole copy."""
    path, lock = tmp_path / "bob.mbox", tmp_path / "bob.mbox.lock"
    path.touch(0o600)
    give_to_virtual(path)
    agent = make_agent(
        make_config(tmp_path, mailbox_kind="mbox"), tmp_path, locks=LockPolicy(timeout=15)
    )
    box = agent.mailbox("bob")
    assert not isinstance(box, Result)
    big = MESSAGE + LINE * 100_000
    entry = mbox_entry(Copy(SENDER, "bob@mx.test", big), time.time())
    step = partial(stopping_append, str(path), entry)
    ended: list[str] = []

    def killed() -> None:
        try:
            asyncio.run(asuser.run_as(box.writer, step, timeout=60.0))
        except asuser.StepError as exc:
            ended.append(str(exc))

    passing = threading.Thread(target=killed)
    passing.start()
    writer = lock_owner(lock)
    try:
        wait_until(lambda: process_state(writer) == "T", "the writer never stopped")
        assert 0 < path.stat().st_size < len(entry)  # half-way
    finally:
        os.kill(writer, signal.SIGKILL)
        passing.join(30)
    assert ended == ["the delivery process ended without an answer (killed by signal 9)"]
    assert lock.exists()  # left behind, as any killed writer leaves it
    assert outcomes(deliver(agent, ["bob@mx.test"], big)) == [DELIVERED]
    (message,) = mbox_messages(path)
    assert message.as_bytes().endswith(LINE.replace(b"\r\n", b"\n"))
    assert not lock.exists()


OLD_ENTRY = b"From a@b.test Thu Jan  1 00:00:00 1970\nSubject: old\n\nkept\n\n"


@pytest.mark.parametrize(
    ("left", "kept"),
    [
        (lambda e: e[: len(e) // 2], False),  # half of the entry: cut off
        (lambda e: e, True),  # all of it: perhaps reported delivered, kept
        (lambda e: b"From someone@else.test" + e[22 : len(e) // 2], True),  # not ours: kept
    ],
)
def test_what_a_dead_writers_lock_says_is_cut_only_when_it_is_there(
    tmp_path: Path, left: Any, kept: bool
) -> None:
    """A lock of ours with no flock (its writer killed) is broken at once; the part of
    the entry it names is cut off only when the mbox still ends inside that very entry."""
    path, lock = tmp_path / "bob.mbox", tmp_path / "bob.mbox.lock"
    entry = mbox_entry(Copy(SENDER, "bob@mx.test", MESSAGE), 0.0)
    path.write_bytes(OLD_ENTRY + left(entry))
    inode = path.stat().st_ino
    lock.write_text(
        f"1\nleafmail\nappend {inode} {len(OLD_ENTRY)} {len(entry)} {entry[:48].hex()}\n"
    )
    append_mbox(
        str(path), mbox_entry(Copy(SENDER, "bob@mx.test", b"Subject: new\r\n\r\nnew\r\n"), 0.0)
    )
    subjects = [m["Subject"] for m in mbox_messages(path)]
    assert (subjects[0], subjects[-1], len(subjects)) == ("old", "new", 3 if kept else 2)
    assert not lock.exists()


def test_a_lock_of_ours_whose_writer_lives_is_honoured(tmp_path: Path) -> None:
    path, lock = tmp_path / "bob.mbox", tmp_path / "bob.mbox.lock"
    lock.write_text("1\nleafmail\n")
    with open(lock, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a writer that is still at work holds it
        with pytest.raises(MailboxLocked):
            append_mbox(str(path), b"From x\n\n", None, LockPolicy(timeout=0.2))
    assert lock.read_text() == "1\nleafmail\n"
