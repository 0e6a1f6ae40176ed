"""leafmail's SMTP service alone: CPU per message of the engine, the session and receive.

`bench.smtp_alone` gives each process's CPU per message, but a worker's figure mixes the
SMTP dialogue with the spool's commit (threads, fsync, renames), the hand-off from the
supervisor and the file system of the day. This runs only the part that reads and
answers the client: `ReceiveService` with `policy_for` of the default config (checks in
this process, as without a check pool) on a netserver listener (event-loop mode, uvloop)
in this process, driven by smtp-source (a new connection per message, as in
`smtp_bench`). The committer encodes the spool file, as the real one does, and answers at
once without touching the disk: the commit is not what this measures. The service has
the workers' settings (`leafmail.smtpd`): the default minimum data rate and a log.

The figure to compare is user time per message, or, deterministic on a loaded machine,
instructions per message under callgrind (the difference of two runs, which cancels the
start-up)::

    python -m bench.smtp_service_cpu --messages 3000 [--sessions 20] [--size 10240]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m bench.smtp_service_cpu --messages 100   # then 600; (Ir600 - Ir100) / 500

For an A/B against another tree, put its ``src`` first: ``PYTHONPATH=<tree>/src``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time

from leafmail.config import Config
from leafmail.envelope import Envelope
from leafmail.policy import policy_for
from leafmail.receive import ReceiveService
from leafmail.spool import GroupCommitter, encode, new_id
from netserver import CallbackHandler, Server
from netserver.connlog import ServerLog
from netserver.server import RunOptions

from .smtp_peers import SMTP_SOURCE


class EncodeOnly(GroupCommitter):
    """The spool file is encoded as for a commit, and nothing is written."""

    def __init__(self) -> None:  # no spool, no threads: nothing to open or close
        pass

    async def commit(self, envelope: Envelope, data: bytes, qid: str | None = None) -> str:
        encode(envelope, data)
        return qid or new_id()


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def measure(runs: list[int], sessions: int, size: int) -> list[str]:
    """Serve on port 0 and run smtp-source once per entry of `runs` (that many messages)."""
    config = Config()
    smtp = config.smtp.server_config("bench.test")
    log = ServerLog(open(os.devnull, "w"))  # noqa: SIM115 (open while the server runs)
    # As a worker builds it (leafmail.smtpd): the default minimum data rate arms a timer
    # for each message's data, and the service has a log.
    service = ReceiveService(
        smtp,
        EncodeOnly(),
        policy_for(config),
        log=log,
        min_data_rate=config.smtp.min_data_rate,
        data_rate_grace=config.smtp.data_rate_grace,
    )
    ready = asyncio.Event()
    options = RunOptions(loop="uvloop", signals=False, on_ready=lambda _ends: ready.set())
    handler = CallbackHandler(service.session)
    server = Server(handler, "127.0.0.1:0", mode="async", log=log, options=options)
    serving = asyncio.create_task(server.serve())
    lines: list[str] = []
    try:
        await ready.wait()
        port = server.addresses[0].port
        for messages in runs:
            argv = [str(SMTP_SOURCE), "-s", str(sessions), "-m", str(messages), "-l", str(size)]
            argv += ["-f", "a@src.test", "-t", "b@example.test", f"127.0.0.1:{port}"]
            (user0, sys0), start = _cpu(), time.perf_counter()
            client = await asyncio.create_subprocess_exec(*argv)
            if await client.wait() != 0:
                raise SystemExit(f"smtp-source exited {client.returncode}")
            (user1, sys1), seconds = _cpu(), time.perf_counter() - start
            lines.append(
                f"{messages} messages: user {(user1 - user0) / messages * 1e6:,.0f} "
                f"sys {(sys1 - sys0) / messages * 1e6:,.0f} µs/msg, "
                f"{messages / seconds:,.0f} msg/s"
            )
    finally:
        server.stop()
        await serving
        log.stream.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.smtp_service_cpu", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--messages", default="3000", help="messages per run, comma-separated")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=10240, help="octets per message")
    args = p.parse_args(argv)
    runs = [int(n) for n in args.messages.split(",")]
    import uvloop

    for line in uvloop.run(measure(runs, args.sessions, args.size)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
