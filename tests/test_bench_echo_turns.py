"""bench.echo_load in turns: one server at a time, in rotating order, each turn drained.

Two real echo servers on loopback (`bench.echo_server.Echo`, which records who got each
read) are measured by `run_sliced` in very short turns; the reads must come in blocks,
one server's after the other's, in the order the turns rotate, every request answered
before the next turn, and each server's measurement must count only its own requests.
"""

from __future__ import annotations

import asyncio
import functools
import os

from bench.echo_load import REQUEST, run_sliced
from bench.echo_server import Echo


class Recorded(Echo):
    """The bare echo, noting which server each read came to and how many requests."""

    def __init__(self, name: int, log: list[int], received: list[int]) -> None:
        self.name = name
        self.log = log
        self.received = received

    def data_received(self, data: bytes) -> None:
        if not self.log or self.log[-1] != self.name:
            self.log.append(self.name)
        self.received[self.name] += len(data) // len(REQUEST)
        super().data_received(data)


def test_turns_measure_one_server_at_a_time_in_rotating_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        log: list[int] = []
        received = [0, 0]
        servers = [
            await loop.create_server(functools.partial(Recorded, i, log, received), "127.0.0.1", 0)
            for i in range(2)
        ]
        try:
            targets: list[tuple[int, int | None]] = [
                (s.sockets[0].getsockname()[1], os.getpid()) for s in servers
            ]
            # 3 turns each: server order 0 1, then 1 0, then 0 1.
            results = await run_sliced(targets, 4, 2, 0.0, 0.06, 0.02)
        finally:
            for server in servers:
                server.close()
        assert log == [0, 1, 0, 1]
        for i, result in enumerate(results):
            assert 0 < result.ops <= received[i]
            # (this process is server and client: its CPU, to the nanosecond, is > 0)
            assert result.server_cpu is not None and 0 < result.server_cpu < 1.0
            assert 0.05 <= result.elapsed < 1.0
            assert result.errors == 0

    asyncio.run(main())
