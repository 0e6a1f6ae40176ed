"""Envelope and client data never reach a shell as syntax.

Every attack tries to make some shell run ``touch CANARY`` -- with ``$(...)``, backticks,
``;``, ``|``, ``&&``, ``${IFS}`` for blanks, quotes and leading dashes -- through what a
client controls: a PTR record (hosts.allow ``spawn``/``twist`` with ``%h %n %c``), the
bytes of a connection (a command per connection), the SMTP envelope (an aliases
``|command``), and the ``leafmail sendmail`` command line a web application fills in
(-f, -F, recipients, -X). The test passes only if no canary file appears and the data
arrives as data: verbatim in the command's environment or the spool, or turned into
``_`` where tcpd says expansions must be (hosts_access(5) %-expansions).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import soak
from conftest import ROOT, ServerFactory
from dnsserver import LoopbackDNS, reverse_name
from leafmail_fixtures import (
    LeafmailFactory,
    RawSMTP,
    clean_env,
    leafmail_command,
    leafmail_servers,
    queued_id,
    toml_string,
    write_config,
)
from lifecycle_handlers import connect, read_to_end, wait_until
from localusers import ROOT as AS_ROOT
from localusers import ensure_user

from leafmail.spool import Spool
from leafmail.states import QueueState

pytestmark = pytest.mark.timeout(soak.scaled(60, 300))

# tcpd's percent_x keeps only these characters of an expansion (README, hosts_access).
TCPD_SAFE = re.compile(r"[A-Za-z0-9!@%\-_=+:,./ \n]*")

DUMP = """\
import json, os, sys, uuid
out = os.path.join(sys.argv[1], uuid.uuid4().hex)
keep = ("SENDER", "RECIPIENT", "LOCAL", "DOMAIN", "TCPREMOTEIP", "TCPLOCALIP", "PROTO")
with open(out + ".tmp", "w") as f:
    json.dump({"argv": sys.argv, "env": {k: os.environ.get(k) for k in keep},
               "stdin": sys.stdin.buffer.read().decode("utf-8", "replace")}, f)
os.rename(out + ".tmp", out + ".json")  # the test never reads a half-written dump
"""


@pytest.fixture
def canary_dir() -> Iterator[Path]:
    """A short directory for canaries: a DNS label holds at most 63 octets.

    World-writable: a command leafmail runs as `nobody` must be able to leave a canary,
    or an injection that ran would go unseen.
    """
    path = Path(tempfile.mkdtemp(prefix="c", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def payloads(canary: Path, tag: str) -> list[str]:
    """Shell injections that would create `canary`/TAGn; none contains a blank or a dot."""
    c = f"{canary}/{tag}"
    return [
        f"$(touch${{IFS}}{c}1)",
        f"`touch${{IFS}}{c}2`",
        f";touch${{IFS}}{c}3;",
        f"|touch${{IFS}}{c}4",
        f"&&touch${{IFS}}{c}5&&",
        f"'$(touch${{IFS}}{c}6)'",
        f'"$(touch${{IFS}}{c}7)"',
    ]


def no_canaries(canary: Path) -> None:
    assert sorted(p.name for p in canary.iterdir()) == [], "a shell ran client data"


# The interpreter for commands: as root, leafmail runs an aliases command as `nobody`,
# who cannot reach a virtualenv under /root; the system's python3 is readable by all.
PYTHON = (
    "/usr/bin/python3"
    if os.geteuid() == 0 and os.path.exists("/usr/bin/python3")
    else (sys.executable)
)


@pytest.fixture
def dump_script() -> Iterator[tuple[Path, Path]]:
    """A command that records its argv, environment and stdin as JSON in `out`.

    Outside tmp_path (0700 under root's pytest directory), so `nobody` can run it too.
    """
    base = Path(tempfile.mkdtemp(prefix="dump", dir="/tmp"))
    base.chmod(0o755)
    script = base / "dump.py"
    script.write_text(DUMP)
    script.chmod(0o644)
    out = base / "out"
    out.mkdir()
    out.chmod(0o1777)
    yield script, out
    shutil.rmtree(base, ignore_errors=True)


def dumps(out: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


# --- hosts.allow spawn / twist with a hostile PTR ----------------------------------------


def zone_text(name: str) -> str:
    """`name` in master-file form: every octet but letters, digits, '-' and '.' as \\DDD."""
    return "".join(c if c.isalnum() or c in "-." else f"\\{ord(c):03d}" for c in name)


def evil_dns(dns: LoopbackDNS, names: list[str]) -> list[str]:
    """PTR 127.0.0.(2+i) -> names[i], each forward-confirmed by an A record."""
    sources = []
    for i, name in enumerate(names):
        source = f"127.0.0.{2 + i}"
        dns.set_records(reverse_name(source), "PTR", [name])
        dns.set_records(name, "A", [source])
        sources.append(source)
    return sources


def test_a_hostile_ptr_never_reaches_spawn_or_twist_as_syntax(
    netserver_proc: ServerFactory, tmp_path: Path, canary_dir: Path
) -> None:
    """tcpd: every expansion character outside its safe set becomes ``_``."""
    names = [f"a{p}b.evil.test" for p in payloads(canary_dir, "h")]
    names.append("good.test")  # the control: a clean name is expanded as itself
    log = tmp_path / "spawned"
    allow, deny = tmp_path / "hosts.allow", tmp_path / "hosts.deny"
    allow.write_text(
        f"ALL: ALL: spawn /bin/echo %a %h %n %c %u >> {log}: twist /bin/echo %h %n %c %u %d\n"
    )
    deny.write_text("")
    with LoopbackDNS() as dns:
        sources = evil_dns(dns, [zone_text(n) for n in names])
        server = netserver_proc(
            ["--listen", "127.0.0.1:0", "--hosts-allow", str(allow), "--hosts-deny",
             str(deny), "--dns-server", f"127.0.0.1:{dns.port}", "--", "/bin/cat"]
        )  # fmt: skip
        answers = {}
        for source in sources:
            with connect(server.host_port, source) as sock:
                answers[source] = read_to_end(sock).decode()
    for source, answer in answers.items():
        assert TCPD_SAFE.fullmatch(answer), answer
        assert answer.split()[0] in (source, "good.test"), answer
    assert answers[sources[-1]].startswith("good.test good.test"), answers[sources[-1]]
    assert wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == len(names))
    assert TCPD_SAFE.fullmatch(log.read_text()), log.read_text()
    no_canaries(canary_dir)
    soak.record("attack", "hostile PTR in spawn/twist", names=len(names), canaries=0)


# --- a command per connection ------------------------------------------------------------


def test_connection_bytes_stay_data_for_a_command(
    netserver_proc: ServerFactory, dump_script: tuple[Path, Path], canary_dir: Path
) -> None:
    script, out = dump_script
    server = netserver_proc(["--listen", "127.0.0.1:0", "--", PYTHON, str(script), str(out)])
    sent = "\n".join(payloads(canary_dir, "c")) + "\n"
    with connect(server.host_port, "127.0.0.2") as sock:
        sock.sendall(sent.encode())
        sock.shutdown(1)
        read_to_end(sock)
    assert wait_until(lambda: len(dumps(out)) == 1)
    [got] = dumps(out)
    assert got["argv"] == [str(script), str(out)]
    assert got["stdin"] == sent
    env = got["env"]
    assert isinstance(env, dict)
    assert (env["TCPREMOTEIP"], env["TCPLOCALIP"], env["PROTO"]) == (
        "127.0.0.2",
        "127.0.0.1",
        "TCP",
    )
    no_canaries(canary_dir)


# --- leafmail: an aliases |command gets the envelope as data ------------------------------


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def pipe_config(tmp_path: Path, script: Path, out: Path) -> str:
    aliases = tmp_path / "aliases"
    aliases.write_text(f'tickets: "|{PYTHON} {script} {out}"\n')
    (tmp_path / "mail").mkdir()
    # u has no account: as root, a real unprivileged user (useradd) stands in for her
    virtual = f'virtual_user = "{ensure_user("lmtvirt").pw_name}"\n' if AS_ROOT else ""
    return (
        f'[local]\nmailbox = "maildir"\npath = {toml_string(tmp_path / "mail" / "{user}")}\n'
        f'users = ["u"]\naliases = {toml_string(aliases)}\ncommand_timeout = "10s"\n'
        + virtual
        + '[checks]\nrfc5322 = "off"\nreceived = "off"\nspf = "off"\ndkim = "off"\n'
    )


def hostile_envelopes(canary: Path) -> list[tuple[str, str]]:
    """(sender path, recipient path) pairs; every one is valid RFC 5321 syntax."""
    c = f"{canary}/e"
    return [
        (f'<"$(touch {c}1)"@evil.test>', "<tickets@mx.test>"),
        (f"<`touch${{IFS}}{c}2`@evil.test>", "<tickets@mx.test>"),
        ("<-oQ/tmp@evil.test>", f'<"tickets+$(touch {c}3);|&"@mx.test>'),
        ("<>", f"<tickets+`touch${{IFS}}{c}4`@mx.test>"),
        (f"<a|touch${{IFS}}{c}5@evil.test>", f"<tickets+${{IFS}}&touch${{IFS}}{c}6@mx.test>"),
        (f'<"\\"; touch {c}7; \\""@evil.test>', "<TICKETS@MX.TEST>"),
    ]


def test_pipe_alias_gets_hostile_envelopes_verbatim_in_its_environment(
    servers: LeafmailFactory, tmp_path: Path, dump_script: tuple[Path, Path], canary_dir: Path
) -> None:
    script, out = dump_script
    server = servers(pipe_config(tmp_path, script, out))
    cases = hostile_envelopes(canary_dir)
    with RawSMTP(server.address()) as client:
        client.greeting()
        helo = client.command(f"EHLO x$(touch${{IFS}}{canary_dir}/helo)")
        if helo.code != 250:
            client.ehlo()
        for sender, rcpt in cases:
            assert client.command(f"MAIL FROM:{sender}").code == 250, sender
            assert client.command(f"RCPT TO:{rcpt}").code == 250, rcpt
            assert client.command("DATA").code == 354
            queued_id(client.command(b"Subject: x\r\n\r\nbody\r\n.").text)
    assert wait_until(lambda: len(dumps(out)) == len(cases), 10), server.log()
    seen = {(d["env"]["SENDER"], d["env"]["RECIPIENT"]) for d in dumps(out)}  # type: ignore[index]
    assert seen == {(s[1:-1], r[1:-1]) for s, r in cases}
    for got in dumps(out):
        assert got["argv"] == [str(script), str(out)]
        assert "body" in str(got["stdin"])
    no_canaries(canary_dir)
    soak.record("attack", "hostile envelopes to an aliases |command", cases=len(cases), canaries=0)


# --- leafmail sendmail with hostile arguments ----------------------------------------------


def sendmail(tmp_path: Path, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    config = write_config(tmp_path, 'hostname = "mx.test"\n')
    env = clean_env(
        tmp_path, {"LEAFMAIL_CONFIG": str(config), "LEAFMAIL_SPOOL": str(tmp_path / "spool")}
    )
    return subprocess.run(
        leafmail_command("sendmail", *args),
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_sendmail_arguments_are_data(tmp_path: Path, canary_dir: Path) -> None:
    """What PHP's mail() passes: -f, -F and recipients from a web form; -X as in CVE-2016-10033."""
    c = f"{canary_dir}/s"
    sender = f'"$(touch {c}1)`touch {c}2`"@evil.test'
    rcpts = [f"u+`touch${{IFS}}{c}3`@mx.test", f'"-oQ{c}4|touch {c}5"@mx.test']
    name = f"$(touch {c}6)\nBcc: victim@other.test"
    result = sendmail(
        tmp_path, "-i", "-f", sender, "-F", name, f"-X{c}7", f"-O QueueDirectory={c}8",
        "--", *rcpts, stdin=b"Subject: hi\n\nhello\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [msg] = Spool(tmp_path / "spool", create=False).messages(QueueState.QUEUE)
    assert not hasattr(msg, "reason"), msg
    envelope = msg.envelope  # type: ignore[union-attr]
    assert envelope.sender == sender
    assert [r.address for r in envelope.recipients] == rcpts
    data = msg.data  # type: ignore[union-attr]
    header = data.split(b"\r\n\r\n", 1)[0]
    lines = header.split(b"\r\n")
    assert not any(line.lower().startswith(b"bcc") for line in lines), header
    [from_line] = [line for line in lines if line.startswith(b"From:")]
    assert b"victim@other.test" in from_line  # -F's newline did not start a header
    no_canaries(canary_dir)
    soak.record("attack", "hostile sendmail arguments", canaries=0, injected_headers=0)


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "a@b.test\nX-Injected: yes", "u@mx.test"],
        ["u@mx.test\nBcc: victim@other.test"],
        ["u@mx.test;victim@other.test"],
        ["u@mx.test\r\n.\r\nMAIL FROM:<x@other.test>"],
        ["-C/etc/passwd", "u@mx.test"],
    ],
    ids=["newline-in-f", "newline-group-in-rcpt", "semicolon-in-rcpt", "smtp-in-rcpt", "-C"],
)
def test_sendmail_refuses_malformed_hostile_arguments(
    tmp_path: Path, args: list[str], canary_dir: Path
) -> None:
    result = sendmail(tmp_path, *args, stdin=b"Subject: hi\n\nhello\n")
    assert result.returncode in (64, 65), (result.returncode, result.stderr)
    queue = tmp_path / "spool" / "queue"
    assert not queue.exists() or list(queue.iterdir()) == []
    no_canaries(canary_dir)
