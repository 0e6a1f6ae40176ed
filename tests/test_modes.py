"""Every mode with every handler form it supports, over real sockets.

fork, prefork and thread run stdio and connection handlers; async runs async handlers;
a command runs in every mode. Servers run as real processes (`netserver_proc`, ready
by their READY line), except the Python-API tests at the end, which run in-process.
"""

from __future__ import annotations

import asyncio
import io
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, RunningServer, ServerFactory
from netclient import TIMEOUT, Client, exchange, split_address

import netserver
from netserver.connlog import ServerLog

if str(ROOT) not in sys.path:  # the examples package lives at the project root
    sys.path.insert(0, str(ROOT))
import examples.echo

SYNC_MODES = ("fork", "prefork", "thread")
PROCESS_MODES = ("fork", "prefork")
TEST_ENV = {"PYTHONPATH": str(ROOT / "tests")}


def start(
    netserver_proc: ServerFactory, handler: str, mode: str, *extra: str, listen: str = "127.0.0.1:0"
) -> RunningServer:
    """A server for `handler` (MODULE:CALLABLE) in `mode`, tests/ importable."""
    args = ["--listen", listen, "--mode", mode, "--handler", handler, *extra]
    return netserver_proc(args, env=TEST_ENV)


def conn_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("netserver: conn ")]


def binary_payload(copies: int) -> bytes:
    """Lines of every byte value, CRLF and LF endings, an empty line, an unended tail."""
    every_byte = bytes(range(256)).replace(b"\n", b"")
    block = every_byte + b"\r\n" + b"\x00\xff\xfe bare\rCR\n" + b"plain text\n" + b"\r\n"
    return block * copies + b"tail without newline"


def round_trip(address: str, payload: bytes) -> bytes:
    """Send `payload` from a thread while reading, so neither side's buffer deadlocks."""
    with Client(address) as client:

        def send() -> None:
            client.send(payload)
            client.shut_write()

        sender = threading.Thread(target=send)
        sender.start()
        try:
            return client.read_all()
        finally:
            sender.join(TIMEOUT)


# -- bytes round trip in every mode and form ---------------------------------------------


@pytest.mark.parametrize(
    ("mode", "handler"),
    [
        ("fork", "examples.echo:binary"),
        ("prefork", "examples.echo:binary"),
        ("thread", "examples.echo:binary"),
        ("async", "examples.echo:async_main"),
    ],
)
def test_python_handler_round_trips_bytes(
    netserver_proc: ServerFactory, mode: str, handler: str
) -> None:
    server = start(netserver_proc, handler, mode)
    payload = binary_payload(1200)  # ~330 KB: more than one socket buffer and read chunk
    assert round_trip(server.addresses[0], payload) == payload
    assert server.stop() == 0
    (line,) = conn_lines(server.log())
    assert f"mode={mode}" in line
    assert f"in={len(payload)} out={len(payload)} status=ok" in line


@pytest.mark.parametrize("mode", ("fork", "prefork", "thread", "async"))
def test_command_round_trips_bytes_in_every_mode(netserver_proc: ServerFactory, mode: str) -> None:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--mode", mode, "--", "cat"])
    payload = binary_payload(200)
    assert round_trip(server.addresses[0], payload) == payload
    assert server.stop() == 0
    (line,) = conn_lines(server.log())
    assert f"mode={mode}" in line
    assert "status=ok" in line


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_stdio_handler_reads_text_lines(netserver_proc: ServerFactory, mode: str) -> None:
    """sys.stdin gives CRLF lines as LF; undecodable bytes survive the round trip."""
    server = start(netserver_proc, "examples.echo:main", mode)
    sent = "héllo\r\n".encode() + b"\xff\xfe not utf-8\n" + b"\r\n" + b"last"
    assert exchange(server.addresses[0], sent) == (
        "héllo\n".encode() + b"\xff\xfe not utf-8\n" + b"\n" + b"last"
    )


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_stdio_prompt_and_answer_with_input(netserver_proc: ServerFactory, mode: str) -> None:
    """input("prompt") sends the prompt before it waits; no flush() in the handler."""
    server = start(netserver_proc, "handlers_for_tests:ask", mode)
    with Client(server.addresses[0]) as client:
        assert client.read_until(b"? ") == b"name? "
        client.send(b"Ada\r\n")
        assert client.read_until(b"? ") == b"hello, Ada!\ncolour? "
        client.send(b"green\n")
        assert client.read_all() == b"Ada likes green\n"


def test_connection_and_stdio_handlers_refuse_wrong_modes() -> None:
    """Each form names the modes it can run in; the rest are refused at construction."""
    for handler in (examples.echo.main, examples.echo.binary):
        with pytest.raises(netserver.ConfigError, match="async"):
            netserver.Server(handler, mode="async")
    for mode in SYNC_MODES:
        with pytest.raises(netserver.ConfigError, match="cannot run in"):
            netserver.Server(examples.echo.async_main, mode=mode)
    assert netserver.Server(examples.echo.async_main).mode_name == "async"
    assert netserver.Server(examples.echo.main).mode_name == "fork"


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_stdio_handler_binary_buffers(netserver_proc: ServerFactory, mode: str) -> None:
    server = start(netserver_proc, "handlers_for_tests:binary_stdio", mode)
    assert exchange(server.addresses[0], b"\xff raw\r\n") == b"\xff raw\r\n"


@pytest.mark.parametrize(
    "mode",
    [
        "fork",
        "prefork",
        "thread",
    ],
)
def test_closing_stdio_affects_only_that_connection(
    netserver_proc: ServerFactory, mode: str
) -> None:
    server = start(netserver_proc, "handlers_for_tests:close_streams", mode)
    assert exchange(server.addresses[0], b"a\nclose\n") == b"a\nclosing\n"
    assert exchange(server.addresses[0], b"b\nclose\n") == b"b\nclosing\n"


# -- process modes: the socket is fd 0 and fd 1 ----------------------------------------


@pytest.mark.parametrize("mode", PROCESS_MODES)
def test_subprocess_of_stdio_handler_inherits_socket(
    netserver_proc: ServerFactory, mode: str
) -> None:
    server = start(netserver_proc, "handlers_for_tests:child_echo", mode)
    assert exchange(server.addresses[0]) == b"from-child\n"
    server2 = start(netserver_proc, "handlers_for_tests:child_reads", mode)
    with Client(server2.addresses[0]) as client:
        client.send(b"ping\n")
        assert client.read_all() == b"child got ping\n"


@pytest.mark.parametrize("mode", PROCESS_MODES)
def test_process_handler_has_default_sigpipe(netserver_proc: ServerFactory, mode: str) -> None:
    server = start(netserver_proc, "handlers_for_tests:sigpipe", mode)
    assert exchange(server.addresses[0]) == b"SIGPIPE default\n"


# -- handler outcomes in the log --------------------------------------------------------


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_handler_exception_is_logged_and_server_goes_on(
    netserver_proc: ServerFactory, mode: str
) -> None:
    server = start(netserver_proc, "handlers_for_tests:fail", mode)
    for _ in range(2):
        exchange(server.addresses[0])
    assert server.stop() == 0
    log = server.log()
    assert log.count("RuntimeError: handler failed on purpose") == 2
    lines = conn_lines(log)
    assert len(lines) == 2
    assert all("status=error" in line for line in lines)


@pytest.mark.parametrize(
    "mode",
    [
        "fork",
        "prefork",
        "thread",
    ],
)
def test_output_before_an_exception_reaches_the_client(
    netserver_proc: ServerFactory, mode: str
) -> None:
    server = start(netserver_proc, "handlers_for_tests:fail", mode)
    assert exchange(server.addresses[0]) == b"about to fail\n"


def test_sys_exit_in_thread_mode_ends_only_that_connection(netserver_proc: ServerFactory) -> None:
    server = start(netserver_proc, "handlers_for_tests:exit_3", "thread")
    for _ in range(2):
        assert exchange(server.addresses[0]) == b"bye\n"
    assert server.proc.poll() is None
    assert server.stop() == 0
    lines = conn_lines(server.log())
    assert len(lines) == 2
    assert all("status=exit-3" in line for line in lines)


# -- thread mode: per-thread stdin/stdout ------------------------------------------------


def test_thread_mode_clients_see_only_their_own_data(netserver_proc: ServerFactory) -> None:
    """Twenty clients held open at once, lines interleaved: each gets its own back."""
    server = start(netserver_proc, "examples.echo:main", "thread")
    clients = [Client(server.addresses[0]) for _ in range(20)]
    try:
        for round_no in range(3):
            for i, client in enumerate(clients):
                client.send(f"client {i} round {round_no}\n".encode())
            for i, client in enumerate(clients):
                assert client.read_line() == f"client {i} round {round_no}\n".encode()
        for i, client in enumerate(clients):
            client.send(f"bye {i}\n".encode())
            client.shut_write()
            assert client.read_all() == f"bye {i}\n".encode()
    finally:
        for client in clients:
            client.close()


# -- prefork pool ------------------------------------------------------------------------


def test_prefork_recycles_workers(netserver_proc: ServerFactory) -> None:
    server = start(
        netserver_proc,
        "handlers_for_tests:pid_then_echo",
        "prefork",
        "--recycle",
        "3",
        "--workers-min",
        "1",
        "--workers-max",
        "2",
    )
    pids: list[int] = []
    for n in range(10):
        with Client(server.addresses[0]) as client:
            pids.append(int(client.read_line()))
            client.send(f"request {n}\n".encode())
            assert client.read_all() == f"request {n}\n".encode()
    assert server.proc.pid not in pids
    assert max(pids.count(pid) for pid in pids) <= 3
    assert len(set(pids)) >= 4


def test_prefork_grows_under_load_then_queues(netserver_proc: ServerFactory) -> None:
    """min 1, max 3: three clients are served at once; a fourth waits for a free worker."""
    server = start(
        netserver_proc,
        "handlers_for_tests:pid_then_echo",
        "prefork",
        "--workers-min",
        "1",
        "--workers-max",
        "3",
    )
    clients = [Client(server.addresses[0]) for _ in range(4)]
    try:
        # Each worker greets before it blocks reading, so three greetings prove three
        # workers busy at the same time.
        pids = [int(client.read_line()) for client in clients[:3]]
        assert len(set(pids)) == 3
        clients[0].send(b"first\n")
        assert clients[0].read_all() == b"first\n"
        # The freed worker takes the queued client.
        assert int(clients[3].read_line()) == pids[0]
        for i, client in enumerate(clients[1:], start=1):
            client.send(f"line {i}\n".encode())
            assert client.read_all() == f"line {i}\n".encode()
    finally:
        for client in clients:
            client.close()


# -- listeners: IPv6, unix, dual stack -----------------------------------------------------


def test_ipv6_loopback(netserver_proc: ServerFactory) -> None:
    server = start(netserver_proc, "handlers_for_tests:peer", "fork", listen="[::1]:0")
    address = server.addresses[0]
    assert address.startswith("[::1]:")
    with Client(address) as client:
        client_port = client.sock.getsockname()[1]
        assert client.read_all() == f"[::1]:{client_port} {address}\n".encode()


def test_dual_stack_reports_plain_ipv4(netserver_proc: ServerFactory) -> None:
    """`:0` is one dual-stack socket; an IPv4 client is 127.0.0.1, not ::ffff:127.0.0.1."""
    server = start(netserver_proc, "handlers_for_tests:peer", "thread", listen=":0")
    address = server.addresses[0]
    _host, port = split_address(address)
    with Client(address, host="127.0.0.1") as client:
        client_port = client.sock.getsockname()[1]
        assert client.read_all() == f"127.0.0.1:{client_port} 127.0.0.1:{port}\n".encode()
    with Client(address, host="::1") as client:
        client_port = client.sock.getsockname()[1]
        assert client.read_all() == f"[::1]:{client_port} [::1]:{port}\n".encode()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to ~107 bytes."""
    with tempfile.TemporaryDirectory(prefix="ns-") as name:
        yield Path(name)


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_unix_socket_listener(netserver_proc: ServerFactory, short_dir: Path, mode: str) -> None:
    path = short_dir / "echo.sock"
    server = start(netserver_proc, "examples.echo:main", mode, listen=f"unix:{path}")
    assert server.addresses == [f"unix:{path}"]
    assert exchange(f"unix:{path}", b"over unix\r\n") == b"over unix\n"
    assert server.stop() == 0
    assert not path.exists()  # the server removes the socket file it created


# -- the Python API, in-process -----------------------------------------------------------


def run_in_thread(server: netserver.Server) -> threading.Thread:
    """`server.run()` on a background thread (no signal handlers there); wait for ready."""
    thread = threading.Thread(target=server.run, name="test-server")
    thread.start()
    assert server.ready.wait(TIMEOUT)
    return thread


def stop_thread(server: netserver.Server, thread: threading.Thread) -> None:
    server.stop()
    thread.join(TIMEOUT)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("handler", "mode", "sent", "expected"),
    [
        (examples.echo.main, "thread", b"text\r\n", b"text\n"),
        (examples.echo.binary, "thread", b"bytes\r\n", b"bytes\r\n"),
        (examples.echo.async_main, "async", b"async\r\n", b"async\r\n"),
    ],
)
def test_server_api_in_a_thread(
    handler: Callable[..., object], mode: str, sent: bytes, expected: bytes
) -> None:
    log = io.StringIO()
    stdout_before = sys.stdout
    server = netserver.Server(handler, "127.0.0.1:0", mode=mode, log=ServerLog(log))
    (endpoint,) = server.bind()
    assert endpoint.port != 0
    thread = run_in_thread(server)
    try:
        assert server.addresses == [endpoint]
        results: list[bytes] = []

        def client(n: int) -> None:
            results.append(exchange(str(endpoint), sent * n))

        clients = [threading.Thread(target=client, args=(n,)) for n in range(1, 6)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(TIMEOUT)
        assert sorted(results) == [expected * n for n in range(1, 6)]
    finally:
        stop_thread(server, thread)
    assert sys.stdout is stdout_before  # thread mode put the process's stdout back
    assert len(re.findall(r"^netserver: conn .*status=ok$", log.getvalue(), re.M)) == 5


def test_server_api_serve_on_own_loop() -> None:
    """`await server.serve()` on a loop the caller owns; stop() ends it."""

    async def scenario() -> bytes:
        server = netserver.Server(
            examples.echo.async_main, "127.0.0.1:0", log=ServerLog(io.StringIO())
        )
        (endpoint,) = server.bind()  # listening now: a connect waits in the backlog
        task = asyncio.create_task(server.serve())
        reader, writer = await asyncio.open_connection(str(endpoint.ip), endpoint.port)
        writer.write(b"on my loop\n")
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        await writer.wait_closed()
        server.stop()
        await asyncio.wait_for(task, TIMEOUT)
        return line

    assert asyncio.run(scenario()) == b"on my loop\n"


def test_server_stop_before_run_is_not_lost() -> None:
    server = netserver.Server(examples.echo.binary, "127.0.0.1:0", log=ServerLog(io.StringIO()))
    server.stop()
    thread = threading.Thread(target=server.run, name="test-server")
    thread.start()
    thread.join(1.0)
    still_running = thread.is_alive()
    if still_running:  # clean up before failing: this stop() is honoured
        assert server.ready.wait(TIMEOUT)
        stop_thread(server, thread)
    assert not still_running
