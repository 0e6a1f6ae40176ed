"""The callback handler form (`netserver.Callbacks`) in event-loop mode, over real sockets.

The handler object only sees bytes; what the framework owns must still hold: the log's
byte counts and status, the idle timeout, TLS, the PROXY protocol, a bound on what a
client that does not read can make the server buffer, errors logged, stop announced.
"""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT, RunningServer, ServerFactory
from lifecycle_handlers import closed_by_peer, connect, recv_line, round_trip, wait_until
from test_limits import IDLE, assert_idle_client_is_closed
from test_modes import binary_payload, conn_lines
from test_modes import round_trip as round_trip_bytes
from test_proxy_protocol import v2_tcp4
from test_tls_termination import Certs, certs, tls_connect  # noqa: F401 (certs: a fixture)
from test_tls_termination import recv_line as tls_recv_line

import netserver
from netserver.handlers import CallbackHandler, as_handler

if str(ROOT) not in sys.path:  # the examples package lives at the project root
    sys.path.insert(0, str(ROOT))
import examples.echo

TEST_ENV = {"PYTHONPATH": str(ROOT / "tests")}
ECHO = "examples.echo:Echo"


def serve(netserver_proc: ServerFactory, handler: str, *extra: str) -> RunningServer:
    return netserver_proc(
        ["--listen", "127.0.0.1:0", "--mode", "async", "--handler", handler, *extra],
        env=TEST_ENV,
    )


def test_a_callbacks_class_is_the_callback_form_and_runs_only_in_async_mode() -> None:
    assert as_handler(examples.echo.Echo) == CallbackHandler(examples.echo.Echo)
    assert netserver.Server(examples.echo.Echo).mode_name == "async"
    for mode in ("fork", "prefork", "thread"):
        with pytest.raises(netserver.ConfigError, match="CallbackHandler cannot run"):
            netserver.Server(examples.echo.Echo, mode=mode)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_echo_round_trips_bytes_and_the_log_counts_them(
    netserver_proc: ServerFactory, workers: str
) -> None:
    server = serve(netserver_proc, ECHO, "--workers", workers)
    payload = binary_payload(1200)  # ~330 KB: more than one socket buffer and read chunk
    assert round_trip_bytes(server.addresses[0], payload) == payload
    assert server.stop() == 0
    (line,) = conn_lines(server.log())
    assert "mode=async" in line
    assert f"in={len(payload)} out={len(payload)} status=ok" in line


def test_idle_timeout(netserver_proc: ServerFactory) -> None:
    server = serve(netserver_proc, ECHO, "--timeout", str(IDLE))
    assert_idle_client_is_closed(server)


def test_an_exception_in_a_callback_ends_only_that_connection(
    netserver_proc: ServerFactory,
) -> None:
    server = serve(netserver_proc, "handlers_for_tests:FailingCallbacks")
    for _ in range(2):  # the server goes on after the first failure
        with connect(server.host_port) as sock:
            sock.sendall(b"boom\n")
            assert closed_by_peer(sock)
    assert wait_until(lambda: len(conn_lines(server.log())) == 2)
    log = server.log()
    assert all(line.endswith("status=error") for line in conn_lines(log)), log
    assert "RuntimeError: callback failed on purpose" in log


def test_a_client_that_does_not_read_cannot_make_the_server_buffer_without_bound(
    netserver_proc: ServerFactory,
) -> None:
    """Once the answers back up, the server stops reading, so the client's sends block."""
    server = serve(netserver_proc, ECHO)
    limit = 256 << 20  # far more than every socket buffer on the path together
    chunk = b"x" * (1 << 20)
    sent = 0
    with connect(server.host_port) as sock:
        sock.settimeout(2.0)
        with pytest.raises(TimeoutError):
            while sent < limit:
                sent += sock.send(chunk)
    assert sent < limit


def test_stop_is_announced_to_the_handler(netserver_proc: ServerFactory) -> None:
    server = serve(netserver_proc, "handlers_for_tests:ByeOnStop")
    with connect(server.host_port) as sock:
        assert round_trip(sock) == b"ping\n"
        server.signal(15)
        assert recv_line(sock) == b"bye\n"
        assert closed_by_peer(sock)
    # The one SIGTERM above stops the server: wait for that exit. A second signal from
    # server.stop() could land after the loop has put back the default handler, and
    # the process would end by the signal (-15) instead of its own exit status.
    assert server.proc.wait(20) == 0
    assert conn_lines(server.log())[0].endswith("status=ok")


def test_tls_and_a_proxy_header(netserver_proc: ServerFactory, certs: Certs) -> None:  # noqa: F811
    server = serve(
        netserver_proc, "handlers_for_tests:ShowPeer", "--proxy-from", "127.0.0.1", *certs.flags()
    )
    header = v2_tcp4("192.0.2.7", "198.51.100.1", 5555, 443)
    with tls_connect(server, certs, prefix=header) as sock:
        assert tls_recv_line(sock) == b"192.0.2.7 5555\n"
        sock.sendall(b"over tls\n")
        assert tls_recv_line(sock) == b"over tls\n"
    assert wait_until(lambda: bool(conn_lines(server.log())))
    (line,) = conn_lines(server.log())
    assert "peer=192.0.2.7:5555" in line and line.endswith("status=ok")
