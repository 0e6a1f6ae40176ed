"""The peers of the SMTP acceptance benchmark: a private Postfix instance and aiosmtpd.

How each peer is set up follows ``shared/BENCH-NOTES.md``, which recorded how the
reference figures in issue 3 were taken:

* **Postfix** runs as a private instance (``postfix -c DIR start``) in a scratch directory,
  accepting mail for ``example.test`` and handing it to the ``discard`` transport. What is
  measured is smtpd -> cleanup -> fsync'd queue file -> discard: the same durability
  promise leafmail makes. Its log goes to a file through ``postlogd`` (there is no syslog
  here), and that logging is part of its normal cost.
* **aiosmtpd** runs in its own process (``python -m bench.smtp_peers aiosmtpd ...``), on
  the default asyncio loop, exactly as its ``Controller`` would build it (the same
  ``SMTP`` keyword arguments, ``loop.create_server`` on 127.0.0.1), but in the main
  thread of a process of its own so that it competes with the other servers on equal
  terms. With ``--store DIR`` its handler writes each message to ``DIR/tmp``, fsyncs it,
  renames it into ``DIR/new`` and fsyncs ``DIR/new`` before answering 250, in a thread
  pool of 8 (BENCH-NOTES: that measured faster than doing it on the event loop). Without
  ``--store`` it answers 250 at once, which shows what its protocol path alone costs.

The Postfix package is installed on demand (``smtp-source``, the load generator, ships in
it) with debconf set to "Local only", and the system's own instance is kept stopped so
that nothing listens on port 25.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.smtp import SMTP

from .procs import ServerSpec, python_module

SMTP_SOURCE = Path("/usr/sbin/smtp-source")
POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
PRESEED = (
    "postfix postfix/main_mailer_type select Local only\n"
    "postfix postfix/mailname string bench.test\n"
)
HOSTNAME = "bench.test"
RELAY_DOMAIN = "example.test"
DRAIN_TIMEOUT = 120.0
POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


# --- the Postfix package ----------------------------------------------------------------


def ensure_postfix() -> None:
    """Install Postfix if smtp-source is missing, and keep the system instance stopped."""
    if not SMTP_SOURCE.exists():
        _install_postfix()
    stop_system_postfix()


def _install_postfix() -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"{SMTP_SOURCE} is missing; install the Debian package postfix as root")
    print("installing postfix (for smtp-source and the Postfix peer) ...", flush=True)
    subprocess.run(["debconf-set-selections"], input=PRESEED.encode(), check=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "postfix"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if not SMTP_SOURCE.exists():
        raise RuntimeError(f"postfix installed but {SMTP_SOURCE} is still missing")


def stop_system_postfix() -> None:
    """Stop the default instance if the package's install started it (port 25 stays shut)."""
    running = subprocess.run([POSTFIX, "status"], capture_output=True, check=False)
    if running.returncode == 0:
        print("stopping the system postfix instance", flush=True)
        subprocess.run([POSTFIX, "stop"], capture_output=True, check=False)
    if port_open(25):
        raise RuntimeError("something listens on 127.0.0.1:25; stop it before benchmarking")


def port_open(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:`port`."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
        return True
    return False


def free_port() -> int:
    """A port nothing listens on now (Postfix cannot bind port 0 and report the result)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- a private Postfix instance --------------------------------------------------------


@dataclass
class PostfixPeer:
    """A running private Postfix instance: its config dir, port and log file."""

    config_dir: Path
    queue_dir: Path
    log_path: Path
    port: int

    def master_pid(self) -> int:
        """The pid of the instance's master process (for RSS)."""
        text = (self.queue_dir / "pid" / "master.pid").read_text()
        return int(text.split()[0])

    def log_size(self) -> int:
        """Where the log ends now: `check_log` looks only past this point."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> list[str]:
        """The log lines written after `offset`."""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace").splitlines()

    def queued(self) -> int:
        """Files still in the queue (nothing should stay: everything is discarded)."""
        return sum(
            len(files) for name in POSTFIX_QUEUES for _, _, files in os.walk(self.queue_dir / name)
        )

    def wait_drained(self, offset: int, expected: int) -> tuple[int, list[str]]:
        """Wait until `expected` discards are logged past `offset` and the queue is empty.

        Returns the number of messages discarded and the log lines that show trouble
        (rejects, deferrals, bounces, warnings, fatals). Postfix answers 250 once the
        queue file is fsync'd and discards later, so the next run must wait for this or
        it would pay for the previous run's deliveries.
        """
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            lines = self.log_since(offset)
            sent = sum("status=sent" in line for line in lines)
            if (sent >= expected and self.queued() == 0) or time.monotonic() > deadline:
                return sent, [line for line in lines if _trouble(line)]
            time.sleep(0.2)


def _trouble(line: str) -> bool:
    words = (" reject: ", "status=deferred", "status=bounced", "warning:", "fatal:", "panic:")
    return any(word in line for word in words)


def _main_cf(root: Path) -> str:
    """main.cf: BENCH-NOTES' settings; everything else stays at Postfix's defaults.

    ``myhostname`` is set because the container's host name is not fully qualified (Postfix
    refuses to start then), ``maillog_file_prefixes`` because the log lives under /tmp, and
    ``meta_directory`` so that ``postfix check`` finds Debian's postfix-files.
    """
    return "\n".join(
        [
            "compatibility_level = 3.6",
            f"queue_directory = {root / 'queue'}",
            f"data_directory = {root / 'data'}",
            "meta_directory = /etc/postfix",
            f"myhostname = {HOSTNAME}",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mydestination =",
            f"relay_domains = {RELAY_DOMAIN}",
            f"transport_maps = inline:{{ {RELAY_DOMAIN}=discard: }}",
            "smtp_dns_support_level = disabled",
            f"maillog_file = {root / 'maillog'}",
            f"maillog_file_prefixes = {root}",
            "",
        ]
    )


def _master_cf(port: int) -> str:
    """Debian's master.cf with the port 25 listener replaced and postlog enabled."""
    out: list[str] = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if fields[:2] == ["smtp", "inet"] or (fields[:1] == ["#smtp"] and "inet" in fields):
            continue
        if fields[:1] == ["#postlog"]:
            line = line[1:]
        out.append(line)
    if not any(line.split()[:1] == ["postlog"] for line in out):
        out.append("postlog   unix-dgram n  -       n       -       1       postlogd")
    out.append(f"127.0.0.1:{port} inet n - n - 100 smtpd")
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def postfix_instance(
    scratch: Path, main_cf: Callable[[Path], str] | None = None
) -> Iterator[PostfixPeer]:
    """Start a private Postfix instance under `scratch`; stop it however the block ends.

    `main_cf(root)` gives its main.cf (default: the discarding receiver of BENCH-NOTES).
    """
    root = scratch / "postfix"
    for name in ("etc", "queue", "data"):
        (root / name).mkdir(parents=True, exist_ok=True)
    # mkdtemp makes scratch dirs 0700, which Postfix's own user could not enter; it
    # needs search permission only (and refuses directories others may write to).
    os.chmod(scratch, 0o711)  # noqa: S103 - search only, for the postfix user
    os.chmod(root, 0o711)  # noqa: S103
    shutil.chown(root / "data", "postfix", "postfix")
    port = free_port()
    etc = root / "etc"
    (etc / "main.cf").write_text((main_cf or _main_cf)(root))
    (etc / "master.cf").write_text(_master_cf(port))
    subprocess.run([POSTCONF, "-c", str(etc), "-F", "*/*/chroot = n"], check=True)
    peer = PostfixPeer(etc, root / "queue", root / "maillog", port)
    try:
        _postfix(etc, "start")
        _wait_listening(port, peer)
        yield peer
    finally:
        _postfix(etc, "stop")


def _postfix(etc: Path, command: str) -> None:
    done = subprocess.run(
        [POSTFIX, "-c", str(etc), command], capture_output=True, text=True, check=False
    )
    if done.returncode != 0 and command == "start":
        raise RuntimeError(f"postfix -c {etc} start failed:\n{done.stdout}{done.stderr}")


def _wait_listening(port: int, peer: PostfixPeer) -> None:
    """Postfix has no readiness pipe: poll its port until the master accepts."""
    deadline = time.monotonic() + 20.0
    while not port_open(port):
        if time.monotonic() > deadline:
            tail = "\n".join(peer.log_since(0)[-20:]) if peer.log_path.exists() else ""
            raise RuntimeError(f"postfix did not listen on 127.0.0.1:{port}:\n{tail}")
        time.sleep(0.05)


# --- the disk, the peer every durable server competes with ------------------------------


def disk_probe(scratch: Path, messages: int = 1000) -> dict[str, float]:
    """Per-second rates of the durable write itself, as BENCH-NOTES measured them.

    The notes found about 540/s for one writer doing create, write, fsync, rename,
    fsync of the directory, about 790/s with 8 to 32 writers, and 4,700/s for one
    fdatasync of a 4 KiB overwrite. The disk of the day decides what the fsync'd
    peers can reach, so the report quotes these beside the servers' figures.
    """
    root = scratch / "disk-probe"
    data = b"x" * 10240
    rates: dict[str, float] = {}
    for writers in (1, 8, 32):
        store_dir = root / str(writers)
        for name in ("tmp", "new"):
            (store_dir / name).mkdir(parents=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(writers) as pool:
            jobs = [
                pool.submit(store, store_dir, str(i), "a@src.test", ["b@example.test"], data)
                for i in range(messages)
            ]
            for job in jobs:
                job.result()
        rates[f"store, {writers} writer{'s' if writers > 1 else ''}"] = messages / (
            time.perf_counter() - start
        )
    fd = os.open(root / "overwrite", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"y" * 4096
        start = time.perf_counter()
        for _ in range(messages * 2):
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
        rates["fdatasync of a 4 KiB overwrite"] = messages * 2 / (time.perf_counter() - start)
    finally:
        os.close(fd)
        shutil.rmtree(root)
    return rates


# --- the servers started as processes (leafmail, aiosmtpd) ------------------------------

LEAFMAIL = Path(sys.executable).parent / "leafmail"


def leafmail_missing(
    command: str = "serve", flags: tuple[str, ...] = ("--spool", "--ready-fd")
) -> str | None:
    """Why `leafmail COMMAND` cannot be benchmarked here, or None if it can."""
    try:
        done = subprocess.run(
            [str(LEAFMAIL), command, "--help"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{LEAFMAIL} {command} --help: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"{LEAFMAIL} {command} --help exited {done.returncode}: {last}"
    lacking = [flag for flag in flags if flag not in done.stdout]
    if lacking:
        return f"{LEAFMAIL} {command} has no {' or '.join(lacking)} yet"
    return None


def leafmail_spec(spool: Path) -> ServerSpec:
    """``leafmail serve`` on 127.0.0.1 port 0, spooling into `spool`.

    It accepts any recipient from loopback (``relay_networks`` defaults to loopback), so
    smtp-source's ``b@example.test`` is relayed, i.e. spooled for delivery; no delivery
    is configured, so the spooled files stay in ``SPOOL/queue`` where they are counted.
    """
    return ServerSpec(
        "leafmail",
        lambda fd: [
            str(LEAFMAIL),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--spool",
            str(spool),
            "--hostname",
            HOSTNAME,
            "--ready-fd",
            str(fd),
        ],
    )


def aiosmtpd_spec(name: str, store_dir: Path | None) -> ServerSpec:
    """aiosmtpd in a process of its own: durable into `store_dir`, or storing nothing."""
    extra = ["--store", str(store_dir)] if store_dir else []
    return ServerSpec(
        name,
        lambda fd: python_module("bench.smtp_peers", "aiosmtpd", *extra, "--ready-fd", str(fd)),
    )


# --- aiosmtpd peers -------------------------------------------------------------------


class DurableHandler:
    """Writes each message to tmp/, fsyncs, renames into new/, fsyncs new/, then 250."""

    def __init__(self, root: Path, pool: ThreadPoolExecutor) -> None:
        self.root = root
        self.pool = pool
        self.names = itertools.count()
        for name in ("tmp", "new"):
            (root / name).mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        """aiosmtpd's DATA hook: store durably off the event loop, then accept."""
        name = f"{time.time_ns()}.{os.getpid()}.{next(self.names)}"
        mail_from = str(getattr(envelope, "mail_from", ""))
        rcpts = [str(rcpt) for rcpt in getattr(envelope, "rcpt_tos", [])]
        content = getattr(envelope, "content", b"")
        data = content.encode() if isinstance(content, str) else bytes(content)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.pool, store, self.root, name, mail_from, rcpts, data)
        return "250 OK"


def store(root: Path, name: str, mail_from: str, rcpts: list[str], data: bytes) -> None:
    """The Maildir-style durable write: file fsync'd, renamed, directory fsync'd."""
    head = f"X-Envelope-From: <{mail_from}>\r\n" + "".join(
        f"X-Envelope-To: <{rcpt}>\r\n" for rcpt in rcpts
    )
    tmp = root / "tmp" / name
    with open(tmp, "xb") as out:
        out.write(head.encode())
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, root / "new" / name)
    fd = os.open(root / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NoStoreHandler:
    """Accepts every message and stores nothing: aiosmtpd's protocol path alone."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        """aiosmtpd's DATA hook."""
        return "250 OK"


async def serve_aiosmtpd(store_dir: Path | None, ready_fd: int) -> None:
    """Serve on 127.0.0.1 port 0 until SIGTERM; announce ``READY 127.0.0.1:PORT``."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(8)
    handler: object = DurableHandler(store_dir, pool) if store_dir else NoStoreHandler()
    # What Controller(handler, server_hostname=HOSTNAME) passes to SMTP().
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=HOSTNAME, enable_SMTPUTF8=True), "127.0.0.1", 0
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    port = server.sockets[0].getsockname()[1]
    os.write(ready_fd, f"READY 127.0.0.1:{port}\n".encode())
    os.close(ready_fd)
    try:
        await stop.wait()
    finally:
        server.close()
        pool.shutdown(wait=True)


def main() -> None:
    """``python -m bench.smtp_peers aiosmtpd [--store DIR] --ready-fd N``."""
    parser = argparse.ArgumentParser(prog="python -m bench.smtp_peers")
    parser.add_argument("peer", choices=["aiosmtpd"])
    parser.add_argument("--store", type=Path, help="durable store directory (omit: no storage)")
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve_aiosmtpd(args.store, args.ready_fd))


if __name__ == "__main__":
    main()
