"""What `leafmail` prints: control characters escaped, closed pipes, mailq and newaliases.

Every command runs as a real process (the console script of this checkout, also through
symlinks named mailq and newaliases), against a spool filled with the public Spool API
and a real queue-runner pass to the aiosmtpd smarthost, whose replies carry an escape
sequence. Pipes are real: the reader is head(1), which closes its end early.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from leafmail_fixtures import (
    clean_env,
    leafmail_command,
    run_argv,
    run_flush,
    run_leafmail,
    run_on_terminal,
    toml_string,
    write_config,
)
from smarthost import Greeter, Smarthost

from leafmail.cli import EX_PIPE
from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.printable import printable
from leafmail.spool import Spool
from leafmail.states import QueueState
from netserver.errors import EX_CONFIG, EX_DATAERR, EX_TEMPFAIL

SENDER = "alice@src.test"
CLEAR = "\x1b[2J"  # what a hostile smarthost would like the operator's terminal to do
TITLE = "\x1b]0;owned\x07"  # and this sets the window title
TIMEOUT = 20.0
SCRIPT = Path(sys.executable).with_name("leafmail")  # the installed console script


def body(subject: str, extra: bytes = b"") -> bytes:
    return f"From: <{SENDER}>\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode() + extra


def commit(spool: Spool, rcpts: list[str], sender: str = SENDER, data: bytes = b"") -> str:
    envelope = Envelope(
        sender=sender,
        recipients=tuple(Recipient(r) for r in rcpts),
        client=ClientInfo("127.0.0.1", 40000, "client.test"),
    )
    return spool.commit(envelope, data or body("test"))


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run_leafmail(tmp_path, *args, timeout=TIMEOUT)


def flush_config(tmp_path: Path, spool: Spool, smarthost: str) -> Path:
    text = (
        f'hostname = "leaf.test"\nspool = {toml_string(spool.root)}\n\n'
        f'[delivery]\nmode = "offline"\ntls = "none"\nsmarthost = "{smarthost}"\n'
    )
    return write_config(tmp_path, text)


# --- the sanitiser ---------------------------------------------------------------------


def test_printable_escapes_controls_and_keeps_text() -> None:
    assert printable("plain text, caf\u00e9, \u65e5\u672c") == "plain text, caf\u00e9, \u65e5\u672c"
    assert printable(f"451 {CLEAR}busy") == "451 \\x1b[2Jbusy"
    assert printable(TITLE) == "\\x1b]0;owned\\x07"
    assert printable("a\tb\nc\rd\x7f\x9b\u202e") == "a\\x09b\\x0ac\\x0dd\\x7f\\x9b\\u202e"
    # Multi-line text keeps tabs and line ends (CRLF shown as LF), never a lone CR.
    assert printable("a\tb\r\nc\nd\re\x1b", lines=True) == "a\tb\nc\nd\\x0de\\x1b"


# --- flush, queue and show with a hostile reply and envelope ----------------------------


def test_a_hostile_reply_is_escaped_by_flush_and_queue_and_exact_in_json(
    tmp_path: Path, spool: Spool, sink: Smarthost
) -> None:
    reply = f"451 4.2.1 {CLEAR}busy{TITLE}"
    sink.behaviour.rcpt_replies["busy@dst.test"] = reply
    qid = commit(spool, ["busy@dst.test"])
    config = flush_config(tmp_path, spool, sink.address)

    done = run_flush(tmp_path, config)

    assert done.returncode == EX_TEMPFAIL, done.stderr
    assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout
    assert done.stdout == f"{qid} deferred: 451 4.2.1 \\x1b[2Jbusy\\x1b]0;owned\\x07\n"

    listing = cli(tmp_path, "queue", "--spool", str(spool.root))
    assert listing.returncode == 0, listing.stderr
    assert b"\x1b" not in listing.stdout and b"\x07" not in listing.stdout
    assert b"\\x1b[2Jbusy\\x1b]0;owned\\x07" in listing.stdout

    exact = cli(tmp_path, "queue", "--json", "--spool", str(spool.root))
    assert exact.returncode == 0, exact.stderr
    assert b"\x1b" not in exact.stdout  # escaped by JSON ...
    (entry,) = json.loads(exact.stdout)
    assert entry["recipients"][0]["reply"] == reply  # ... and exact once decoded


def test_an_envelope_with_control_characters_is_escaped_everywhere(
    tmp_path: Path, spool: Spool
) -> None:
    sender = f"ev{CLEAR}il@src.test"
    data = body("hostile", extra=f"{TITLE}\r\nbye\r\n".encode())
    qid = commit(spool, [f"bob{TITLE}@dst.test"], sender=sender, data=data)

    listing = cli(tmp_path, "queue", "--spool", str(spool.root))
    assert listing.returncode == 0, listing.stderr
    assert b"\x1b" not in listing.stdout and b"\x07" not in listing.stdout
    assert b"<ev\\x1b[2Jil@src.test>" in listing.stdout
    assert b"<bob\\x1b]0;owned\\x07@dst.test>" in listing.stdout

    # sendmail -bp is the same listing.
    env = {"LEAFMAIL_SPOOL": str(spool.root)}
    bp = run_argv(tmp_path, leafmail_command("sendmail", "-bp"), env=env, timeout=TIMEOUT)
    assert bp.returncode == 0, bp.stderr
    assert b"<ev\\x1b[2Jil@src.test>" in bp.stdout and b"\x1b" not in bp.stdout

    # Piped, `show` gives the message exactly (for saving it); its JSON part is escaped.
    piped = cli(tmp_path, "show", qid, "--spool", str(spool.root))
    assert piped.returncode == 0, piped.stderr
    head, _, message = piped.stdout.partition(b"}\n\n")
    assert b"\x1b" not in head and json.loads(head + b"}")["envelope"]["sender"] == sender
    assert message.endswith(data)

    # On a terminal, nothing in it reaches the terminal as a control sequence.
    argv = leafmail_command("show", qid, "--spool", str(spool.root))
    status, screen, _ = run_on_terminal(tmp_path, argv, timeout=TIMEOUT)
    assert status == 0
    assert "\x1b" not in screen and "\x07" not in screen
    assert "\\x1b]0;owned\\x07\nbye\n" in screen.replace("\r\n", "\n")


def test_the_progress_bar_and_its_summary_escape_the_reply(tmp_path: Path, spool: Spool) -> None:
    overloaded = Greeter("127.0.0.1", 0, f"421 4.3.2 {CLEAR}closing{TITLE}\r\n".encode())
    where = f"127.0.0.1:{overloaded.port}"
    commit(spool, ["bob@dst.test"])
    config = flush_config(tmp_path, spool, where)
    try:
        argv = leafmail_command("flush", "--config", str(config))
        status, screen, summary = run_on_terminal(tmp_path, argv, timeout=TIMEOUT)
    finally:
        overloaded.stop()
    assert status == EX_TEMPFAIL
    assert "flushing" in screen, screen  # the bar was drawn (with rich's own sequences) ...
    assert CLEAR not in screen and TITLE not in screen  # ... and none from the smarthost
    assert "\x1b" not in summary
    assert f"unreachable: {where}: 421 4.3.2 \\x1b[2Jclosing\\x1b]0;owned\\x07\n" in summary


# --- closed pipes -------------------------------------------------------------------------


def piped_into_head(tmp_path: Path, argv: list[str], *head: str) -> tuple[int, bytes, bytes]:
    """Run `ARGV | head HEAD`: (ARGV's status, its stderr, what head printed)."""
    writer = subprocess.Popen(
        argv, cwd=ROOT, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert writer.stdout is not None and writer.stderr is not None
    reader = subprocess.Popen(["head", *head], stdin=writer.stdout, stdout=subprocess.PIPE)
    writer.stdout.close()  # only head holds the read end now
    shown, _ = reader.communicate(timeout=TIMEOUT)
    status = writer.wait(TIMEOUT)
    errors = writer.stderr.read()
    writer.stderr.close()
    return status, errors, shown


@pytest.fixture
def crowded(spool: Spool) -> Spool:
    """Three hundred messages whose listing (400 KB of text) is far more than a pipe
    holds (64 KiB) plus what head reads, so the writer surely meets the closed pipe."""
    for n in range(300):
        commit(spool, [f"recipient-{i}-of-message-{n}@destination.test" for i in range(20)])
    return spool


def test_queue_json_into_head_ends_quietly(tmp_path: Path, crowded: Spool) -> None:
    argv = leafmail_command("queue", "--json", "--spool", str(crowded.root))
    status, errors, shown = piped_into_head(tmp_path, argv, "-c", "100")
    assert len(shown) == 100 and shown.startswith(b"[")
    assert (status, errors) == (EX_PIPE, b"")


def test_queue_text_into_head_ends_quietly(tmp_path: Path, crowded: Spool) -> None:
    argv = leafmail_command("queue", "--spool", str(crowded.root))
    status, errors, shown = piped_into_head(tmp_path, argv, "-n", "1")
    assert shown.startswith(b"Queue ID")
    assert (status, errors) == (EX_PIPE, b"")


def test_show_into_head_ends_quietly(tmp_path: Path, spool: Spool) -> None:
    lines = b"".join(b"line %d of a long message\r\n" % n for n in range(20000))
    qid = commit(spool, ["bob@dst.test"], data=body("long", extra=lines))
    argv = leafmail_command("show", qid, "--spool", str(spool.root))
    status, errors, shown = piped_into_head(tmp_path, argv, "-n", "3")
    assert shown.startswith(b"{\n")
    assert (status, errors) == (EX_PIPE, b"")


def test_mailq_into_head_ends_quietly(tmp_path: Path, crowded: Spool) -> None:
    mailq = named(tmp_path, "mailq")
    status, errors, shown = piped_into_head(
        tmp_path, [str(mailq), "--json", "--spool", str(crowded.root)], "-c", "100"
    )
    assert len(shown) == 100 and shown.startswith(b"[")
    assert (status, errors) == (EX_PIPE, b"")


def test_flush_into_head_goes_quiet_and_delivers_everything(
    tmp_path: Path, spool: Spool, sink: Smarthost
) -> None:
    qids = [commit(spool, [f"bob{n}@dst.test"]) for n in range(5)]
    config = flush_config(tmp_path, spool, sink.address)
    argv = leafmail_command("flush", "--config", str(config))
    status, errors, shown = piped_into_head(tmp_path, argv, "-n", "1")
    assert shown.decode() in {f"{qid} delivered\n" for qid in qids}
    assert (status, errors) == (0, b"flush: 5 delivered\n")
    assert len(sink.received) == 5
    assert not any(spool.ids(state) for state in (QueueState.QUEUE, QueueState.DEFERRED))


# --- mailq and newaliases by name ---------------------------------------------------------


def named(tmp_path: Path, name: str) -> Path:
    """A symlink called `name` to the leafmail console script, as a package installs it."""
    link = tmp_path / "bin" / name
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(SCRIPT)
    return link


def run_named(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = run_argv(tmp_path, [str(named(tmp_path, name)), *args], timeout=TIMEOUT)
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def test_mailq_by_its_name_lists_the_queue(tmp_path: Path, spool: Spool) -> None:
    qid = commit(spool, ["bob@dst.test"])
    done = run_named(tmp_path, "mailq", "--spool", str(spool.root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("Queue ID")
    assert qid in done.stdout and "<bob@dst.test>" in done.stdout
    same = cli(tmp_path, "queue", "--spool", str(spool.root)).stdout.decode()
    assert done.stdout.splitlines()[-1] == same.splitlines()[-1]  # (the ages may differ)

    as_json = run_named(tmp_path, "mailq", "--json", "--spool", str(spool.root))
    assert [e["id"] for e in json.loads(as_json.stdout)] == [qid]


def test_mailq_with_the_spool_from_the_environment(tmp_path: Path, spool: Spool) -> None:
    commit(spool, ["bob@dst.test"])
    env = {**clean_env(tmp_path), "LEAFMAIL_SPOOL": str(spool.root)}
    done = subprocess.run(
        [str(named(tmp_path, "mailq"))], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    assert "-- " in done.stdout and "in 1 message" in done.stdout


def aliases_config(tmp_path: Path, aliases: str | None) -> Path:
    text = f'hostname = "leaf.test"\nspool = {toml_string(tmp_path / "spool")}\n[local]\n'
    if aliases is not None:
        path = tmp_path / "aliases"
        path.write_text(aliases)
        text += f"aliases = {toml_string(path)}\n"
    return write_config(tmp_path, text)


def test_newaliases_accepts_a_good_file(tmp_path: Path) -> None:
    config = aliases_config(tmp_path, "postmaster: root\nstaff: alice,\n  bob\n")
    done = run_named(tmp_path, "newaliases", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'aliases'}: 2 aliases\n"
    same = cli(tmp_path, "newaliases", "--config", str(config))
    assert (same.returncode, same.stdout.decode()) == (0, done.stdout)


def test_newaliases_names_the_file_and_line_of_a_mistake(tmp_path: Path) -> None:
    config = aliases_config(tmp_path, "postmaster: root\n# fine\nstaff alice\n")
    done = run_named(tmp_path, "newaliases", "--config", str(config))
    assert done.returncode == EX_DATAERR
    assert done.stderr == (
        f"newaliases: {tmp_path / 'aliases'}:3: expected 'name: target, target'\n"
    )
    assert done.stdout == ""


def test_newaliases_without_a_file_to_check(tmp_path: Path) -> None:
    unset = run_named(tmp_path, "newaliases", "--config", str(aliases_config(tmp_path, None)))
    assert unset.returncode == EX_CONFIG
    assert "local.aliases is not set" in unset.stderr
    config = aliases_config(tmp_path, "a: b\n")
    (tmp_path / "aliases").unlink()
    missing = run_named(tmp_path, "newaliases", "--config", str(config))
    assert missing.returncode == EX_CONFIG
    gone = tmp_path / "aliases"
    assert missing.stderr == f"newaliases: {gone}: cannot read: No such file or directory\n"
