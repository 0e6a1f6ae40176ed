"""CPU per message of the SMTP client path alone: `SmarthostAgent` into ``smtp-sink``.

The relay drain (`relay_bench`) measures the whole daemon; this measures only what the
delivery client costs (leafmail.delivery.wire and netserver.smtp's client engine), for
A/B decisions on that code. One process runs the agent with `--concurrency`
deliveries at a time on uvloop; ``smtp-sink`` (another process, not counted) takes the
messages. After a warm-up that opens every connection, it reports the process's own CPU
(user + system, getrusage) per message over `--messages` deliveries.

For figures that load does not move, count instructions at two sizes and take the
difference (start-up and imports cancel out):

    valgrind --tool=callgrind python -m bench.wire_cpu --messages 200
    valgrind --tool=callgrind python -m bench.wire_cpu --messages 1200
    # (total(1200) - total(200)) / 1000 = instructions per message

    python -m bench.wire_cpu [--messages 5000] [--concurrency 20] [--size 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from leafmail.delivery import Outcome
from leafmail.delivery.smarthost import SmarthostAgent, SmarthostSettings
from leafmail.envelope import ClientInfo, Envelope, Recipient

from .loops import loop_factory
from .relay_bench import Sink

ENVELOPE = Envelope(
    sender="a@src.test",
    recipients=(Recipient("b@example.test"),),
    client=ClientInfo("127.0.0.1", 1, "bench.test", "ESMTP"),
    received="2026-01-01T00:00:00Z",
)


def message(size: int) -> bytes:
    head = b"From: a@src.test\r\nTo: b@example.test\r\nSubject: bench\r\n\r\n"
    line = b"x" * 70 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def deliver(agent: SmarthostAgent, data: bytes, count: int, concurrency: int) -> None:
    """`count` deliveries, `concurrency` at a time; each must be delivered."""
    numbers = iter(range(count))

    async def worker() -> None:
        for _ in numbers:
            results = await agent.deliver(ENVELOPE, data, [0])
            if results[0].outcome is not Outcome.DELIVERED:
                raise RuntimeError(f"not delivered: {results[0].line}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(port: int, args: argparse.Namespace) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of `args.messages` deliveries after a warm-up."""
    settings = SmarthostSettings(host="127.0.0.1", port=port, helo="bench.test", tls="none")
    agent = SmarthostAgent(settings)
    data = message(args.size)
    try:
        await deliver(agent, data, args.concurrency * 5, args.concurrency)  # connections open
        cpu, wall = cpu_seconds(), time.perf_counter()
        await deliver(agent, data, args.messages, args.concurrency)
        return cpu_seconds() - cpu, time.perf_counter() - wall
    finally:
        await agent.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--size", type=int, default=1024, help="message size in bytes")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wire-cpu-") as scratch:
        sink = Sink(Path(scratch))
        try:
            with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
                cpu, wall = runner.run(measure(sink.port, args))
        finally:
            sink.close()
    per = cpu / args.messages * 1e6
    rate = args.messages / wall
    print(f"{args.messages} messages: {per:,.0f} µs CPU per message (client only), {rate:,.0f}/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
