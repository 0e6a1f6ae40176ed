"""Helpers for the `leafmail serve` integration tests: a real server process, raw SMTP.

`start_leafmail` runs ``python -m leafmail.cli serve`` with a temporary spool,
``--hostname mx.test`` and ``--listen 127.0.0.1:0`` (plus an optional TOML config) and
returns once the server wrote ``READY ADDR ...`` on its ``--ready-fd``: readiness comes
from the server, never from sleeping. The environment is scrubbed of ``LEAFMAIL_*`` and
points the XDG directories into the test's temporary directory, so no config of the
machine running the tests can leak in.

What the server spooled is read back with `leafmail.spool.Spool`, and `check_spooled`
asserts that the stored bytes are exactly the bytes the client sent plus the one
Received header leafmail prepends, whose fields are parsed and checked one by one.
"""

from __future__ import annotations

import email.utils
import os
import pty
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from conftest import ROOT, launch_with_ready_fd

from leafmail.auth import hash_password
from leafmail.spool import CorruptMessage, Spool, SpooledMessage
from leafmail.states import QueueState

HOSTNAME = "mx.test"
CLIENT = "client.test"
IO_TIMEOUT = 5.0
PASSWORD = "correct horse battery staple"  # noqa: S105 (a test account)

# Received: from HELO ([IP])\r\n\tby mx.test (leafmail) with PROTO id QID[ (TLS)]
# then either "\r\n\tfor <RCPT>; DATE\r\n" (one recipient) or ";\r\n\tDATE\r\n".
_RECEIVED = re.compile(
    rb"Received: from (?P<helo>[^ \r\n]+) \(\[(?P<ip>[^\]\r\n]+)\]\)\r\n"
    rb"\tby mx\.test \(leafmail\) with (?P<proto>[A-Z0-9]+) id (?P<qid>[0-9A-F]{24})"
    rb"(?: \((?P<tls>[^)\r\n]*)\))?"
    rb"(?:;\r\n\t|\r\n\tfor <(?P<rcpt>[^>\r\n]*)>; )"
    rb"(?P<date>[^\r\n]+)\r\n"
)
_QUEUED = re.compile(r"\b2\.0\.0 OK queued as ([0-9A-F]{24})\Z")


def leafmail_command(*args: str) -> list[str]:
    """The argv that runs the `leafmail` CLI of this checkout."""
    return [sys.executable, "-m", "leafmail.cli", *args]


def clean_env(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without LEAFMAIL_*, with XDG dirs inside `tmp_path`, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAFMAIL_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    env.update(extra or {})
    return env


FLUSH_TIMEOUT = 30.0
CLI_TIMEOUT = 20.0


def run_argv(
    tmp_path: Path,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` to completion (bounded) in the checkout, in a clean environment + `env`."""
    return subprocess.run(
        argv,
        cwd=ROOT,
        env=clean_env(tmp_path, env),
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def run_leafmail(
    tmp_path: Path, *args: str, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """`leafmail ARGS` to completion (bounded), in a clean environment."""
    return run_argv(tmp_path, leafmail_command(*args), timeout=timeout)


def run_on_terminal(
    tmp_path: Path, argv: Sequence[str], *, timeout: float = CLI_TIMEOUT
) -> tuple[int, str, str]:
    """Run `argv` with its stdout on a pseudo-terminal: (status, screen, stderr)."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**clean_env(tmp_path), "COLUMNS": "100", "TERM": "xterm"},
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=subprocess.PIPE,
        )
        os.close(terminal)
        screen = b""
        while chunk := _read_pty(controller):
            screen += chunk
        status = proc.wait(timeout)
        assert proc.stderr is not None
        errors = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    finally:
        os.close(controller)
    return status, screen.decode(errors="replace"), errors


def _read_pty(fd: int) -> bytes:
    """What the terminal shows next; b"" once the writer has closed it (EIO on Linux)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def start_flush_alone(
    tmp_path: Path, config: Path, output: int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """``leafmail flush --config CONFIG --no-daemon`` started as its own process, in a
    clean environment (a test that kills it mid-delivery); `output` takes its stdout
    and stderr (subprocess.PIPE to read them)."""
    return subprocess.Popen(
        leafmail_command("flush", "--config", str(config), "--no-daemon"),
        cwd=ROOT,
        env=clean_env(tmp_path),
        stdout=output,
        stderr=output,
    )


def run_flush(
    tmp_path: Path, config: Path, *args: str, timeout: float = FLUSH_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``leafmail flush --config CONFIG ARGS`` as its own process, in a clean environment."""
    return run_leafmail_text(tmp_path, "flush", "--config", str(config), *args, timeout=timeout)


def run_leafmail_text(
    tmp_path: Path, *args: str, timeout: float = FLUSH_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``leafmail ARGS`` to completion (bounded), in a clean environment; text output."""
    return subprocess.run(
        leafmail_command(*args),
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_config(tmp_path: Path, text: str) -> Path:
    """Write a TOML config file with a fresh name and return its path."""
    count = len(list(tmp_path.glob("leafmail-*.toml")))
    path = tmp_path / f"leafmail-{count}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def toml_string(path: Path | str) -> str:
    """A TOML basic string for a path (tmp paths have no quotes or backslashes)."""
    text = str(path)
    assert '"' not in text and "\\" not in text
    return f'"{text}"'


# --- the server process --------------------------------------------------------------


@dataclass
class Leafmail:
    """A running `leafmail serve` process, where it listens and its spool."""

    proc: subprocess.Popen[bytes]
    addresses: list[tuple[str, int]]
    spool_path: Path
    log_path: Path
    exit_code: int | None = field(default=None)
    terminated: bool = field(default=False)

    def address(self, host: str = "127.0.0.1") -> tuple[str, int]:
        """The first listener bound on `host` (listeners are told apart by address)."""
        for addr in self.addresses:
            if addr[0] == host:
                return addr
        raise AssertionError(f"no listener on {host}: {self.addresses}")

    @property
    def port(self) -> int:
        return self.address()[1]

    def spool(self) -> Spool:
        return Spool(self.spool_path, create=False)

    def queue_ids(self) -> list[str]:
        return self.spool().ids(QueueState.QUEUE)

    def messages(self) -> list[SpooledMessage]:
        """Every message in queue/, oldest first; a corrupt file fails the test."""
        found: list[SpooledMessage] = []
        for item in self.spool().messages(QueueState.QUEUE):
            assert not isinstance(item, CorruptMessage), f"corrupt spool file: {item}"
            found.append(item)
        return found

    def message(self, qid: str) -> SpooledMessage:
        msg = self.spool().get(qid)
        assert msg.state == "queue"
        return msg

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        """Send SIGTERM, once: a second one could land after the handlers are gone."""
        if not self.terminated and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.terminated = True

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, and return the exit status (killed if it hangs)."""
        if self.exit_code is not None:
            return self.exit_code
        self.terminate()
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit_code = -9
        return self.exit_code


def start_leafmail(
    tmp_path: Path,
    *,
    config: str | None = None,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    listen: Sequence[str] = ("127.0.0.1:0",),
    spool: Path | None = None,
    hostname: str | None = HOSTNAME,
) -> Leafmail:
    """Start ``leafmail serve`` and return once its READY line arrived.

    `config` is TOML text written to a file and passed with ``--config``. `spool` None
    means a fresh directory under `tmp_path`; pass ``args`` for anything else.
    """
    count = len(list(tmp_path.glob("leafmail-*.log")))
    spool_path = spool or tmp_path / f"spool-{count}"
    argv = ["--spool", str(spool_path)]
    if hostname is not None:
        argv += ["--hostname", hostname]
    for spec in listen:
        argv += ["--listen", spec]
    if config is not None:
        argv += ["--config", str(write_config(tmp_path, config))]
    return spawn_leafmail(tmp_path, [*argv, *args], env=env, spool_path=spool_path)


def spawn_leafmail(
    tmp_path: Path,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    spool_path: Path,
) -> Leafmail:
    """Run ``leafmail serve ARGV --ready-fd N`` exactly as given; wait for READY.

    `spool_path` is where the test will look for the messages (the flag, variable or
    config that puts them there is the caller's business).
    """
    count = len(list(tmp_path.glob("leafmail-*.log")))
    log_path = tmp_path / f"leafmail-{count}.log"
    proc, words = launch_with_ready_fd(
        lambda fd: leafmail_command("serve", *argv, "--ready-fd", str(fd)),
        log_path,
        clean_env(tmp_path, env),
    )
    addresses = []
    for word in words:
        host, _, port = word.rpartition(":")
        addresses.append((host.strip("[]"), int(port)))
    return Leafmail(proc, addresses, spool_path, log_path)


class LeafmailFactory:
    """Starts servers for one test and stops them at teardown, checking they exit 0."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Leafmail] = []

    def __call__(
        self,
        config: str | None = None,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        listen: Sequence[str] = ("127.0.0.1:0",),
        spool: Path | None = None,
    ) -> Leafmail:
        server = start_leafmail(
            self.tmp_path, config=config, args=args, env=env, listen=listen, spool=spool
        )
        self.started.append(server)
        return server

    def spawn(
        self, argv: Sequence[str], *, spool_path: Path, env: dict[str, str] | None = None
    ) -> Leafmail:
        """`spawn_leafmail` with exactly these arguments, stopped at teardown."""
        server = spawn_leafmail(self.tmp_path, argv, env=env, spool_path=spool_path)
        self.started.append(server)
        return server

    def close(self) -> None:
        bad = []
        for server in self.started:
            code = server.stop()
            if code != 0:
                bad.append(f"exit {code}:\n{server.log()}")
        if bad:
            pytest.fail("leafmail did not exit 0 after SIGTERM: " + "\n".join(bad))


def leafmail_servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    """The body of each test module's ``servers`` fixture (the name avoids `leafmail`)."""
    factory = LeafmailFactory(tmp_path)
    yield factory
    factory.close()


# --- the Received header and the spooled message --------------------------------------


@dataclass(frozen=True)
class Received:
    """The fields of the Received header leafmail prepends."""

    helo: str
    ip: str
    protocol: str
    qid: str
    tls: str | None
    recipient: str | None
    date: datetime


def split_received(data: bytes) -> tuple[Received, bytes]:
    """Parse the leading Received header; return it and the rest of the message."""
    match = _RECEIVED.match(data)
    assert match is not None, f"no leafmail Received header at the start: {data[:300]!r}"
    rcpt = match["rcpt"]
    tls = match["tls"]
    received = Received(
        helo=match["helo"].decode(),
        ip=match["ip"].decode(),
        protocol=match["proto"].decode(),
        qid=match["qid"].decode(),
        tls=None if tls is None else tls.decode(),
        recipient=None if rcpt is None else rcpt.decode("utf-8"),
        date=email.utils.parsedate_to_datetime(match["date"].decode()),
    )
    return received, data[match.end() :]


def check_spooled(
    msg: SpooledMessage,
    sent: bytes,
    *,
    qid: str,
    protocol: str = "ESMTP",
    recipients: Sequence[str],
    sender: str = "",
    helo: str = CLIENT,
    ip: str = "127.0.0.1",
    tls: bool = False,
    auth: str | None = None,
) -> Received:
    """Assert `msg` is exactly `sent` behind one Received header, with this envelope."""
    received, rest = split_received(msg.data)
    if rest != sent:
        at = next((i for i, (x, y) in enumerate(zip(rest, sent, strict=False)) if x != y), None)
        raise AssertionError(
            f"spooled bytes differ from what was sent: {len(rest)} vs {len(sent)} octets, "
            f"first difference at {at}: {rest[:200]!r}"
        )
    env = msg.envelope
    expect("queue id", msg.qid, qid)
    expect("Received id (the id of the 250 reply)", received.qid, qid)
    expect("Received with", received.protocol, protocol)
    expect("Received from", received.helo, helo)
    expect("Received [ip]", received.ip, ip)
    expect("Received for", received.recipient, recipients[0] if len(recipients) == 1 else None)
    expect("Received date offset", received.date.utcoffset(), timedelta(0))
    assert abs(datetime.now(UTC) - received.date) < timedelta(minutes=5), received.date
    expect("envelope sender", env.sender, sender)
    expect("envelope recipients", [r.address for r in env.recipients], list(recipients))
    expect("envelope client ip", env.client.ip, ip)
    expect("envelope client helo", env.client.helo, helo)
    expect("envelope protocol", env.client.protocol, protocol)
    expect("envelope tls set", env.client.tls is not None, tls)
    expect("Received tls comment", received.tls is not None, tls)
    if tls:
        assert env.client.tls is not None and env.client.tls.startswith("TLSv1."), env.client
        expect("Received tls comment", received.tls, env.client.tls)  # "TLSv1.3 TLS_AES_..."
    expect("envelope auth", env.client.auth, auth)
    return received


def expect(what: str, got: object, want: object) -> None:
    """assert got == want, saying what and both values (helpers are not rewritten)."""
    assert got == want, f"{what}: got {got!r}, want {want!r}"


def queued_id(text: str | bytes) -> str:
    """The queue id from ``250 2.0.0 OK queued as QID`` (the text after the code)."""
    if isinstance(text, bytes):
        text = text.decode()
    match = _QUEUED.search(text.strip())
    assert match is not None, f"not a 'queued as' reply: {text!r}"
    return match[1]


# --- clients ---------------------------------------------------------------------------


def smtp_client(
    server: Leafmail,
    host: str = "127.0.0.1",
    *,
    source: str | None = None,
) -> smtplib.SMTP:
    """smtplib connected to `server` (never asks the resolver for our own name)."""
    port = server.address(host)[1]
    return smtplib.SMTP(
        host,
        port,
        local_hostname=CLIENT,
        timeout=IO_TIMEOUT,
        source_address=(source, 0) if source else None,
    )


def smtplib_send(
    client: smtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    body: bytes,
    *,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
) -> str:
    """One transaction with smtplib's low-level calls; returns the queue id."""
    client.ehlo_or_helo_if_needed()
    code, text = client.mail(sender, list(mail_options))
    assert code == 250, (code, text)
    for rcpt in recipients:
        code, text = client.rcpt(rcpt, list(rcpt_options))
        assert code == 250, (rcpt, code, text)
    code, text = client.data(body)
    assert code == 250, (code, text)
    return queued_id(text)


@dataclass(frozen=True)
class Reply:
    """One SMTP reply read off the wire."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        first = self.lines[0].split(" ", 1)[0] if self.lines else ""
        return first if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", first) else None


class RawSMTP:
    """A plain socket speaking SMTP byte by byte, for what real clients will not send."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        source: str | None = None,
        context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        sock = socket.create_connection(
            address, timeout=IO_TIMEOUT, source_address=(source, 0) if source else None
        )
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=server_hostname or address[0])
        self.sock: socket.socket = sock
        self.address = address
        self.buf = bytearray()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {bytes(self.buf)!r}")
            self.buf += chunk

    def reply(self) -> Reply:
        """Read one complete (possibly multi-line) reply."""
        lines: list[str] = []
        code = 0
        while True:
            line = self._line().decode("utf-8")
            assert re.match(r"\d{3}[ -]", line + " "), f"malformed reply line {line!r}"
            code = int(line[:3])
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return Reply(code, tuple(lines))

    def replies(self, count: int) -> list[Reply]:
        return [self.reply() for _ in range(count)]

    def command(self, line: str | bytes) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def greeting(self) -> Reply:
        reply = self.reply()
        assert reply.code == 220, reply
        return reply

    def ehlo(self, name: str = CLIENT) -> Reply:
        reply = self.command(f"EHLO {name}")
        assert reply.code == 250, reply
        return reply

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None = None) -> None:
        """Handshake on the open connection; nothing may be buffered from before."""
        assert not self.buf, f"plaintext after the 220 to STARTTLS: {bytes(self.buf)!r}"
        self.sock = context.wrap_socket(
            self.sock, server_hostname=server_hostname or self.address[0]
        )

    def at_eof(self) -> bool:
        """True when the server closed the connection (after what was buffered)."""
        if self.buf:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def extensions(reply: Reply) -> set[str]:
    """The EHLO keywords (upper-case, without parameters) of an EHLO reply."""
    return {line.split(" ", 1)[0].upper() for line in reply.lines[1:]}


# --- TLS and AUTH material -------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """A test CA and a server certificate for mx.test and the loopback listeners."""

    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def make_tls(directory: Path) -> TLSFiles:
    """Generate the CA and the server certificate into files under `directory`."""
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test", "127.0.0.1", "127.0.0.3", "127.0.0.4")
    cert_path = directory / "server-cert.pem"
    key_path = directory / "server-key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    return TLSFiles(ca, cert_path, key_path)


def users_file(directory: Path, users: dict[str, str]) -> Path:
    """A users file made with `leafmail.auth.hash_password` (USER:HASH lines)."""
    path = directory / "users"
    lines = [f"{user}:{hash_password(password)}" for user, password in users.items()]
    path.write_text("# test users\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit status if `proc` ends within `timeout` seconds, else None."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
