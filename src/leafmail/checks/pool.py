"""The check pool: CPU-heavy per-message checks in worker processes, with a budget.

Header parsing, the RFC 5322 check, DKIM and SPF cost what the client makes them cost
(a To: field of 30,000 encoded words, a DKIM h= naming thousands of absent fields), so
they never run on the event loop, and never in a thread that cannot be stopped. Each
job goes to a worker process (`leafmail.checks.worker`) with a CPU budget (RLIMIT_CPU,
set by the worker before each job) and a wall-clock budget (kept here). A worker past
either budget is killed and reaped -- never abandoned -- and the next job starts a new
one; the job's answer is None, which each check turns into its temporary result
(a tag, or 451 under ``reject``).

The pool is one object the smtpd side owns: started lazily by the first job in the
event loop of the process that uses it, so it works the same in a single process and
in each of several smtpd processes (each owns its pool; the workers inherit that
process's unprivileged identity). Workers are started as ``python -I -m``: isolated
mode, so neither the working directory nor PYTHON* variables can shadow a module.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any

from netserver.connlog import ServerLog
from netserver.smtp.replies import Reply

from .wire import LENGTH_SIZE, decode, encode, frame, length_of

WORKER = (sys.executable, "-I", "-m", "leafmail.checks.worker")
START_TIMEOUT = 60.0  # a worker's imports, before its first job; not the job's budget
# What a check answers under "reject" when its job broke the budget: try again later.
OVER_BUDGET = Reply(451, "4.7.0", "Message checks exceeded their time budget, try again later")


@dataclass(eq=False)  # hashed by identity: kept in the busy set
class _Worker:
    proc: asyncio.subprocess.Process

    async def ask(self, request: bytes) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(request)
        await self.proc.stdin.drain()
        return await self.answer()

    async def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        head = await self.proc.stdout.readexactly(LENGTH_SIZE)
        return decode(await self.proc.stdout.readexactly(length_of(head)))

    async def kill(self) -> None:
        """Kill and reap: the process is gone when this returns."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


def dns_args(nameservers: tuple[str, ...], port: int, timeout: float) -> dict[str, Any]:
    """The [dns] settings as plain data, for jobs that build their own resolver."""
    return {"nameservers": list(nameservers), "port": port, "timeout": timeout}


@dataclass
class CheckPool:
    """At most `workers` processes; each job bounded by `cpu_limit` and `time_limit`."""

    workers: int = 2
    cpu_limit: float = 10.0
    time_limit: float = 30.0
    _idle: list[_Worker] = field(default_factory=list)
    _slots: asyncio.Semaphore | None = None
    _busy: set[_Worker] = field(default_factory=set)
    killed: int = 0  # workers killed over budget (for the log and the tests)
    log: ServerLog | None = None

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
                    self.log.info("check over budget", job=job, limit=why, pid=worker.proc.pid)
                return None
            except BaseException:  # cancelled mid-job: the worker's state is unknown
                await worker.kill()
                raise
            finally:
                self._busy.discard(worker)
            if answer.get("retire"):
                await worker.kill()  # it ends by itself (see worker.main); reap it now
                if self.log is not None:
                    self.log.info("check over budget", job=job, limit="memory", pid=worker.proc.pid)
            else:
                self._idle.append(worker)
        return None if "error" in answer else answer

    async def _take(self) -> _Worker | None:
        """An idle worker that is still alive, else a new one."""
        while self._idle:
            worker = self._idle.pop()
            if worker.proc.returncode is None:
                return worker
            await worker.kill()  # died while idle (killed from outside): reap it
        return await self._start()

    async def _start(self) -> _Worker | None:
        """A new worker once it said it is ready; None if it could not start."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *WORKER,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd="/",
            )
        except OSError:
            return None
        worker = _Worker(proc)
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
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
        for worker in [*idle, *self._busy]:
            try:
                async with asyncio.timeout(2.0):
                    await worker.proc.wait()
            except TimeoutError:
                await worker.kill()
