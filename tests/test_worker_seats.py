"""The seats a new pool's workers will take, marked before the first one is forked.

Workers that accept on the listener themselves (modes.direct) leave the next client to
any seat marked as watching with fewer connections. The supervisor forks the workers one
after another, and the first may already be serving while it forks the next: CI saw the
first worker of two serve both clients, because the second seat was not marked yet. Here
the fork itself is replaced: at the first fork the pool's worker-to-be in the first seat,
with one client, must find itself the busier one, so it leaves the second client alone.
"""

from __future__ import annotations

import asyncio
import errno
import io
import ipaddress
import socket

import pytest

from netserver.accepted import FdRegistry
from netserver.aio import AsyncConnection
from netserver.connlog import ServerLog
from netserver.endpoint import Endpoint
from netserver.handlers import AsyncHandler
from netserver.limits import Limits
from netserver.modes import workers
from netserver.modes.direct import DirectService
from netserver.modes.shared import SharedLimits
from netserver.refusals import RefusalLines

CLIENT = Endpoint(ipaddress.ip_address("127.0.0.1"), 40000)


async def unused_handler(_conn: AsyncConnection) -> None:
    """No worker is forked here, so no connection reaches it."""


def test_every_seat_of_a_new_pool_is_watching_before_the_first_fork(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = workers.WorkerPool(
        2, log=ServerLog(io.StringIO()), limits=Limits(), loop_factory=asyncio.new_event_loop
    )
    table = SharedLimits(Limits(max_conns=2), pool.seats)
    direct = DirectService([], table, RefusalLines())
    pool.add_service("echo", AsyncHandler(unused_handler), None, FdRegistry(), direct)
    leaves_it: list[bool] = []

    def first_fork(_kind: int) -> tuple[int, socket.socket]:
        table.take_seat(0)  # as the first worker will: seats are handed out from 0
        assert isinstance(table.admit(CLIENT), int)  # it serves a first client
        leaves_it.append(table.busier())  # and is asked for the second one
        raise OSError(errno.EAGAIN, "no fork in this test")

    monkeypatch.setattr(workers, "fork_with_channel", first_fork)
    loop = asyncio.new_event_loop()
    try:
        pool.start(loop)
    finally:
        loop.close()
    assert leaves_it == [True]  # the second worker's seat was already marked
    assert not table.busier()  # the failed start gave both seats back: nobody watches
