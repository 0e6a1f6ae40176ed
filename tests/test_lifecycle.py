"""Signals: graceful stop within the grace period, forced stop, and reloading access rules.

Each test runs ``netserver serve`` as a process, talks to it over loopback and signals
it. Waiting is for observable events only: a reply, a closed connection, a log line,
the process's exit.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import READY_TIMEOUT, ROOT, RunningServer, ServerFactory
from lifecycle_handlers import (
    HANDLER_ENV,
    closed_by_peer,
    connect,
    log_count,
    round_trip,
    serve_args,
    served,
    wait_until,
)

MODES = ["fork", "prefork", "thread", "async"]
EXIT_WAIT = 20.0  # a bound on a hang: each wait ends when the server exits
# The most a stop that must not wait may take on a loaded machine: well below each test's
# grace period (what waiting would cost), far above what stopping takes on a quiet one.
PROMPT = 8.0


def wait_for_log(server: RunningServer, text: str, count: int = 1) -> None:
    assert wait_until(lambda: log_count(server.log, text) >= count), server.log()


def refused_at_connect(address: tuple[str, int]) -> bool:
    try:
        connect(address).close()
    except ConnectionRefusedError:
        return True
    return False


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize(
    ("mode", "sig"),
    [
        *((mode, signal.SIGTERM) for mode in MODES),
        ("fork", signal.SIGINT),
        ("async", signal.SIGINT),
    ],
)
def test_stop_lets_a_running_conversation_finish(
    netserver_proc: ServerFactory, mode: str, sig: int
) -> None:
    server = netserver_proc(serve_args(mode, "--grace", "30"), env=HANDLER_ENV)
    with connect(server.host_port) as sock:
        assert round_trip(sock, b"hello\n") == b"hello\n"
        server.signal(sig)
        wait_for_log(server, "stopping: waiting for connections")
        assert refused_at_connect(server.host_port), "still accepting after the stop signal"
        assert round_trip(sock, b"still there?\n") == b"still there?\n"
        assert server.proc.poll() is None, "exited before its client was done"
    started = time.monotonic()
    assert server.proc.wait(EXIT_WAIT) == 0
    assert time.monotonic() - started < PROMPT, "waited for the grace period, not the client"
    log = server.log()
    assert "status=ok" in log
    assert log.rstrip().endswith("msg=stopped")
    assert "grace period over" not in log


@pytest.mark.parametrize("mode", MODES)
def test_an_idle_server_stops_at_once(netserver_proc: ServerFactory, mode: str) -> None:
    server = netserver_proc(serve_args(mode, "--grace", "30"), env=HANDLER_ENV)
    assert served(server.host_port)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(EXIT_WAIT) == 0
    assert time.monotonic() - started < PROMPT


@pytest.mark.parametrize("mode", MODES)
def test_a_handler_that_outlives_the_grace_period_is_ended(
    netserver_proc: ServerFactory, mode: str
) -> None:
    server = netserver_proc(serve_args(mode, "--grace", "0.5"), env=HANDLER_ENV)
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert closed_by_peer(sock, 8.0), "connection not ended after the grace period"
        ended = time.monotonic() - started
        assert server.proc.wait(EXIT_WAIT) == 0
    assert 0.4 <= ended < 4.0
    log = server.log()
    assert "grace period over" in log
    assert "still running at exit" not in log
    assert log.rstrip().endswith("msg=stopped")


@pytest.mark.parametrize("mode", MODES)
def test_a_second_signal_ends_connections_at_once(netserver_proc: ServerFactory, mode: str) -> None:
    server = netserver_proc(serve_args(mode, "--grace", "60"), env=HANDLER_ENV)
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        server.signal(signal.SIGTERM)
        wait_for_log(server, "stopping: waiting for connections")
        assert round_trip(sock, b"after one\n") == b"after one\n"
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert closed_by_peer(sock, EXIT_WAIT)
        assert server.proc.wait(EXIT_WAIT) == 0
    assert time.monotonic() - started < PROMPT
    assert "second stop signal" in server.log()


def test_a_command_is_ended_after_the_grace_period(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--grace", "0.5", "--", "/bin/cat"])
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        server.signal(signal.SIGTERM)
        assert closed_by_peer(sock, 8.0)
        assert server.proc.wait(EXIT_WAIT) == 0
    assert "status=terminated" in server.log()


# --------------------------------------------------------------------------- --ready-fd


@pytest.mark.parametrize(
    "mode",
    [
        "fork",
        "prefork",
        "thread",
        "async",
    ],
)
def test_ready_fd_is_closed_after_the_ready_line(mode: str) -> None:
    """The help says 'write READY ADDR ... to this descriptor and close it'.

    A supervisor that reads the pipe to its end (``addr=$(...)`` in a shell) relies on
    the close; a copy of the descriptor left in any process keeps it waiting forever.
    """
    read_fd, write_fd = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "netserver.cli",
        "serve",
        "--ready-fd",
        str(write_fd),
        *serve_args(mode),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(write_fd,),
        env={**os.environ, **HANDLER_ENV},
    )
    os.close(write_fd)
    data = b""
    eof = False
    try:
        while not eof:
            # Start-up may be slow on a busy machine; the close follows the line at once.
            wait = 2.0 if data else READY_TIMEOUT
            ready, _, _ = select.select([read_fd], [], [], wait)
            if not ready:
                break
            chunk = os.read(read_fd, 4096)
            data += chunk
            eof = not chunk
    finally:
        os.close(read_fd)
        proc.terminate()
        proc.wait(EXIT_WAIT)
    assert data.startswith(b"READY 127.0.0.1:")
    assert eof, "no EOF on the ready pipe"


# --------------------------------------------------------------------------- SIGHUP


def write_rules(path: Path, text: str) -> None:
    """Replace the rules file the way an editor or config tool does: write, rename."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


@pytest.mark.parametrize("mode", MODES)
def test_sighup_reloads_the_access_file(
    netserver_proc: ServerFactory, tmp_path: Path, mode: str
) -> None:
    rules = tmp_path / "access.rules"
    write_rules(rules, "allow 127.0.0.1\n")
    server = netserver_proc(serve_args(mode, "--access-file", str(rules)), env=HANDLER_ENV)
    assert served(server.host_port)
    assert not served(server.host_port, source="127.0.0.2")
    with connect(server.host_port) as kept:
        assert round_trip(kept, b"before\n") == b"before\n"
        write_rules(rules, "deny 127.0.0.1\n")
        server.signal(signal.SIGHUP)
        wait_for_log(server, "access rules reloaded")
        assert not served(server.host_port)
        assert served(server.host_port, source="127.0.0.2")
        assert round_trip(kept, b"after\n") == b"after\n", "open connection was cut"
        write_rules(rules, "allow 127.0.0.1\n")
        server.signal(signal.SIGHUP)
        wait_for_log(server, "access rules reloaded", count=2)
        assert served(server.host_port)
    assert 'reason="matched deny rule 127.0.0.1"' in server.log()
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        ("allow 127.0.0.1\npermit 127.0.0.2\n", "access.rules:2"),
        ("deny 127.0.0.1/33\n", "prefix length"),
        ("deny 10.0.0.1/8\n", "host bits set"),
        (None, "cannot read access file"),
    ],
)
def test_a_broken_access_file_keeps_the_old_rules(
    netserver_proc: ServerFactory, tmp_path: Path, broken: str | None, error: str
) -> None:
    rules = tmp_path / "access.rules"
    write_rules(rules, "allow 127.0.0.1\n")
    server = netserver_proc(
        serve_args("thread", "--access-file", str(rules), "--deny", "127.0.0.3"),
        env=HANDLER_ENV,
    )
    if broken is None:
        rules.unlink()
    else:
        write_rules(rules, broken)
    server.signal(signal.SIGHUP)
    wait_for_log(server, "reload failed, keeping the previous rules")
    log = server.log()
    assert error in log
    assert "access rules reloaded" not in log
    assert served(server.host_port)
    assert not served(server.host_port, source="127.0.0.2")
    assert not served(server.host_port, source="127.0.0.3")
    assert server.proc.poll() is None


def test_reload_keeps_the_command_line_rules(netserver_proc: ServerFactory, tmp_path: Path) -> None:
    rules = tmp_path / "access.rules"
    write_rules(rules, "allow 127.0.0.0/8\n")
    server = netserver_proc(
        serve_args("async", "--access-file", str(rules), "--deny", "127.0.0.3"),
        env=HANDLER_ENV,
    )
    assert not served(server.host_port, source="127.0.0.3")
    write_rules(rules, "allow 127.0.0.3\n")
    server.signal(signal.SIGHUP)
    wait_for_log(server, "access rules reloaded")
    assert "deny 127.0.0.3; allow 127.0.0.3" in server.log()
    assert not served(server.host_port, source="127.0.0.3")
    assert not served(server.host_port)
