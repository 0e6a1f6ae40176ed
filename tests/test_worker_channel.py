"""The supervisor's channel to its async workers, under the conditions a load makes.

A worker whose channel is full must not lose a connection or a report: the supervisor
hands the connection to the next least busy worker, and a worker waits for room for its
report. Real SOCK_SEQPACKET socket pairs and real descriptors; no process is forked.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

from netserver.accepted import Accepted
from netserver.children import receive_fds
from netserver.connlog import ConnRecord, ServerLog
from netserver.endpoint import Endpoint
from netserver.limits import Limits
from netserver.modes.handoff import decode_conn
from netserver.modes.worker import CONN, MAX_MSG, Worker, WorkerApp
from netserver.modes.workers import WorkerPool, _Live, _Proc

PEER = Endpoint.from_sockaddr(socket.AF_INET, ("192.0.2.9", 40000))
LOCAL = Endpoint.from_sockaddr(socket.AF_INET, ("192.0.2.1", 25))


def _channel() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


def _fill(chan: socket.socket) -> int:
    """Send until the kernel says the channel is full; how many messages went."""
    sent = 0
    while True:
        try:
            chan.send(b"x" * 512)
        except BlockingIOError:
            return sent
        sent += 1


def _pool() -> WorkerPool:
    loop = asyncio.new_event_loop()
    loop.close()
    return WorkerPool(2, log=ServerLog(io.StringIO()), limits=Limits(), loop_factory=lambda: loop)


def _ignore(_conn: Accepted) -> None:
    """A connection end the test does not look at."""


def _proc(pid: int, chan: socket.socket, busy: int) -> _Proc:
    proc = _Proc(pid, chan, 0, time.monotonic())
    for n in range(busy):  # connections it serves already (records only)
        held, _ = socket.socketpair()
        held.close()
        proc.conns[-1 - n] = _Live(
            Accepted(held, ConnRecord(PEER, LOCAL, "async")), _ignore, "smtp"
        )
    return proc


def test_a_connection_goes_to_the_least_busy_worker_and_past_a_full_channel() -> None:
    pool = _pool()
    busy_chan, busy_end = _channel()
    full_chan, full_end = _channel()
    idle_chan, idle_end = _channel()
    pool.procs = {1: _proc(1, busy_chan, 3), 2: _proc(2, full_chan, 0), 3: _proc(3, idle_chan, 1)}
    filled = _fill(full_chan)
    client, served = socket.socketpair()
    finished: list[Accepted] = []
    pool.dispatch(Accepted(served, ConnRecord(PEER, LOCAL, "async")), "smtp", finished.append)
    # The least busy (pid 2) is full: the next least busy (pid 3) has it, not pid 1.
    assert not pool.pending and set(pool.procs[3].conns) == {-1, 1}
    assert 1 not in pool.procs[1].conns and 1 not in pool.procs[2].conns
    message, fds = receive_fds(idle_end, MAX_MSG, 1)
    assert message[:1] == CONN and decode_conn(message[1:]) == (1, "smtp", PEER, LOCAL)
    with socket.socket(fileno=fds[0]) as passed:
        passed.sendall(b"through the worker")
        assert client.recv(64) == b"through the worker"
    assert served.fileno() == -1  # the supervisor's copy is closed
    assert len([full_end.recv(1024) for _ in range(filled)]) == filled
    for sock in (busy_chan, busy_end, full_chan, full_end, idle_chan, idle_end, client):
        sock.close()


def test_a_worker_report_waits_for_room_in_a_full_channel() -> None:
    chan, supervisor = _channel()
    worker = Worker(chan, WorkerApp(), {}, Limits(), ServerLog(io.StringIO()))
    filled = _fill(chan)
    received: list[bytes] = []

    def drain() -> None:
        while not received or received[-1] != b"the report":
            received.append(supervisor.recv(1024))

    reader = threading.Thread(target=drain)
    reader.start()
    worker._send(b"the report")  # blocks until the reader has made room
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert len(received) == filled + 1 and received[-1] == b"the report"
    assert chan.gettimeout() == 0.0  # back to non-blocking for the event loop
    chan.close()
    supervisor.close()
