"""The check pool: CPU-heavy per-message checks in worker processes, with a budget.

Header parsing, the RFC 5322 check, DKIM and SPF cost what the client makes them cost
(a To: field of 100,000 addresses, a DKIM h= naming thousands of absent fields), so
they never run on the event loop, and never in a thread that cannot be stopped. Each
job goes to a worker process (`leafmail.checks.worker`) with a CPU budget (RLIMIT_CPU,
set by the worker before each job) and a wall-clock budget (kept here). A worker past
either budget is killed and reaped -- never abandoned -- and the next job starts a new
one; the job's answer is None, which each check turns into its temporary result
(a tag, or 451 under ``reject``).

The pool is one object the smtpd side owns: started lazily by the first job in the
event loop of the process that uses it, so it works the same in a single process and
in each of several smtpd processes (each owns its pool; the workers inherit that
process's unprivileged identity). Workers are forked, not executed: the smtpd process
runs as the daemon's user, which may not be able to read the interpreter or the
checkout (a virtualenv under /root, say), and a fork needs neither. The child keeps
only its end of a socket pair (as fd 0 and 1) and stderr, so it holds no client
connection open, and runs `leafmail.checks.worker.main` until its input ends. The
worker module is imported by the process that forks the smtpd processes
(`preload`), before privileges are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from netserver.children import fork_with_channel, kill_and_reap, watch_child
from netserver.connlog import ServerLog

from .wire import LENGTH_SIZE, decode, encode, frame, length_of

WORKER_NAME = b"leafmail-check"  # the workers' /proc/PID/comm
_PR_SET_NAME = 15
START_TIMEOUT = 60.0  # a worker's imports, before its first job; not the job's budget


@dataclass(eq=False)  # hashed by identity: kept in the busy set
class _Worker:
    """A forked check worker, spoken to over a socket pair; reaped by the event loop."""

    pid: int
    ended: asyncio.Future[int]  # its exit code, set once it is reaped (watch_child)
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def ask(self, request: bytes) -> dict[str, Any]:
        self.writer.write(request)
        await self.writer.drain()
        return await self.answer()

    async def answer(self) -> dict[str, Any]:
        head = await self.reader.readexactly(LENGTH_SIZE)
        return decode(await self.reader.readexactly(length_of(head)))

    def alive(self) -> bool:
        return not self.ended.done()

    def close_input(self) -> None:
        """End of jobs: the worker's read finds the end and it exits by itself."""
        self.writer.close()

    async def kill(self) -> None:
        """Kill and reap: the process is gone when this returns."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        await self.wait()

    async def wait(self) -> None:
        """Until the process has ended and is reaped (a timeout around this leaves the
        watch in place: the future is shielded)."""
        await asyncio.shield(self.ended)
        self.writer.close()


def preload() -> None:
    """Import the worker's code now, while this process can still read it all."""
    from . import worker  # noqa: F401 (the import is the point)


def _child(end: socket.socket) -> None:
    """In the forked child: become a check worker on `end`; never returns."""
    status = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_NAME, WORKER_NAME, 0, 0, 0)
        os.dup2(end.fileno(), 0)
        os.dup2(end.fileno(), 1)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        from . import worker

        with open(0, "rb", closefd=False) as stdin, open(1, "wb", closefd=False) as stdout:
            status = worker.main(stdin, stdout)
    finally:
        os._exit(status)


def dns_args(nameservers: tuple[str, ...], port: int, timeout: float) -> dict[str, Any]:
    """The [dns] settings as plain data, for jobs that build their own resolver."""
    return {"nameservers": list(nameservers), "port": port, "timeout": timeout}


@dataclass
class CheckPool:
    """At most `workers` processes; each job bounded by `cpu_limit` and `time_limit`.

    It is the `checks.jobs.JobRunner` the pooled checks are given.
    """

    workers: int = 2
    cpu_limit: float = 10.0
    time_limit: float = 30.0
    _idle: list[_Worker] = field(default_factory=list)
    _slots: asyncio.Semaphore | None = None
    _busy: set[_Worker] = field(default_factory=set)
    killed: int = 0  # workers killed over budget (for the log and the tests)
    log: ServerLog | None = None

    def __post_init__(self) -> None:
        # Made before privileges are dropped (leafmail.smtpd): load what the forked
        # workers run while every file can still be read.
        preload()

    async def run(self, job: str, args: dict[str, Any], data: bytes) -> dict[str, Any] | None:
        """The job's answer, or None when it broke its budget or its worker died."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        request = frame(encode({"job": job, "cpu": self.cpu_limit, "args": args}), data)
        async with self._slots:
            worker = await self._take()
            if worker is None:
                return None
            self._busy.add(worker)
            try:
                async with asyncio.timeout(self.time_limit):
                    answer = await worker.ask(request)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.killed += 1
                await worker.kill()
                if self.log is not None:
                    why = "time" if isinstance(exc, TimeoutError) else "cpu or crash"
                    self.log.info("check over budget", job=job, limit=why, pid=worker.pid)
                return None
            except BaseException:  # cancelled mid-job: the worker's state is unknown
                await worker.kill()
                raise
            finally:
                self._busy.discard(worker)
            if answer.get("retire"):
                await worker.kill()  # it ends by itself (see worker.main); reap it now
                if self.log is not None:
                    self.log.info("check over budget", job=job, limit="memory", pid=worker.pid)
            else:
                self._idle.append(worker)
        return None if "error" in answer else answer

    async def _take(self) -> _Worker | None:
        """An idle worker that is still alive, else a new one."""
        while self._idle:
            worker = self._idle.pop()
            if worker.alive():
                return worker
            await worker.kill()  # died while idle (killed from outside): reap it
        return await self._start()

    async def _start(self) -> _Worker | None:
        """A new worker once it said it is ready; None if it could not start."""
        try:
            worker = await _fork_worker()
        except OSError:
            return None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await worker.answer()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError):
            await worker.kill()
            return None
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def close(self) -> None:
        """Stop every worker (idle ones by closing their input, busy ones by kill)."""
        idle, self._idle = self._idle, []
        for worker in idle:
            worker.close_input()
        for worker in [*idle, *self._busy]:
            try:
                async with asyncio.timeout(2.0):
                    await worker.wait()
            except TimeoutError:
                await worker.kill()


async def _fork_worker() -> _Worker:
    """Fork a check worker; the pool talks to it over the parent's end of a socket pair."""
    pid, mine = fork_with_channel()
    if pid == 0:
        _child(mine)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[int] = loop.create_future()
    try:
        watch_child(loop, pid, ended.set_result)
    except OSError:
        kill_and_reap(pid)
        mine.close()
        raise
    reader, writer = await asyncio.open_connection(sock=mine, limit=2**16)
    return _Worker(pid, ended, reader, writer)
