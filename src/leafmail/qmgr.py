"""The queue manager process of `leafmail serve`: the queue runner, remote delivery, control.

It runs apart from the smtpd workers, unprivileged, so session load cannot starve
delivery and delivery's parsing of remote replies never runs as root (Postfix's qmgr
and smtp). New mail is announced on a datagram socket (`privsep.Announcer`); `leafmail
flush` and `wake` reach it through the control socket in the spool, which it serves.
It also publishes the queue size for the workers' in-flow delay (`smtpd.Backlog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from typing import Any

from netserver.modes.workers import WorkerApp

from .config import PickupConfig, QueueConfig, SubmitConfig
from .controlserver import ControlServer, Respond
from .forwards import settle_held
from .localsvc import LocalClient
from .pickup import PickupServer
from .privsep import Inherited, become
from .queue import QueueRunner, build_runner
from .spool import GroupCommitter, Spool
from .states import DeliveryMode, QueueState, Route
from .submitrate import SubmitRate

BACKLOG_INTERVAL = 0.5  # seconds between counts of queue/ for the in-flow delay


class Qmgr:
    """Everything the queue manager process runs; `setup` builds it in that process.

    It is given the sections it needs: `queue` for its runners, `submit` and `pickup`
    for the local submission socket (the daemon replaces them on a reload).
    """

    def __init__(
        self,
        queue: QueueConfig,
        submit: SubmitConfig,
        pickup: PickupConfig,
        inherited: Inherited,
        local: LocalClient,
    ) -> None:
        self.queue = queue
        self.submit = submit
        self.pickup_config = pickup
        self.local = local
        self.inherited = inherited
        self.announcer = inherited.announcer
        self.log = inherited.log
        self.runner: QueueRunner | None = None
        self.auto: QueueRunner | None = None
        self.control: ControlServer | None = None
        self.pickup: PickupServer | None = None
        self.committer: GroupCommitter | None = None
        self._stopping = asyncio.Event()

    def setup(self) -> WorkerApp:
        """In the new process: build the runners (CA and password files are read as
        root), drop privileges, then serve."""
        self.announcer.sender.close()
        spool = Spool(self.inherited.spool_path, create=False)
        queue = self.queue
        # `runner` does flushes; `auto` delivers by itself. Offline, only local delivery
        # goes by itself. They share one pass lock: a flush never overlaps a pass.
        self.runner = build_runner(queue, spool, log=self.log, local=self.local)
        self.auto = self.runner
        if queue.delivery.effective_mode is DeliveryMode.OFFLINE:
            self.auto = None
            if queue.local.enabled and self.runner is not None:
                local_only = frozenset({Route.LOCAL})
                self.auto = build_runner(
                    queue, spool, routes=local_only, log=self.log, local=self.local
                )
                if self.auto is not None:
                    self.auto.share_passes_with(self.runner)
        pickup_wanted = self.pickup_config.enabled
        if pickup_wanted is None:  # by default when the daemon started as root
            pickup_wanted = os.geteuid() == 0
        become(self.inherited.identity)
        self.control = ControlServer(spool.control_path, self._control, self.log)
        if pickup_wanted:
            # Local users' submissions (leafmail.pickup): bytes from anyone on the host,
            # so served here, unprivileged, with a group committer of its own.
            self.committer = GroupCommitter(spool)
            reachable = dataclasses.replace(self.submit, spool=self.inherited.spool_path)
            notify = self.auto.notify if self.auto is not None else None
            # Per uid; not root, nor our own user (after `become`, the daemon's), who
            # may write the spool without the socket anyway.
            limits = self.pickup_config
            rate = SubmitRate(
                limits.message_rate_limit, limits.rate_time_unit, exempt={0, os.geteuid()}
            )
            self.pickup = PickupServer(
                reachable, self.committer, self.log, on_spooled=notify, rate=rate
            )
        self._queue_dir = str(spool.path(QueueState.QUEUE, "0" * 24).parent)
        return WorkerApp(start=self._start, run=self._run, close=self._close)

    async def _start(self) -> None:
        assert self.control is not None
        await self.control.start()
        if self.pickup is not None:
            await self.pickup.start()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.announcer.receiver.fileno(), self._announced)

    def _announced(self) -> None:
        for qid in self.announcer.receive():
            if self.auto is not None:
                self.auto.notify(qid)

    async def _run(self) -> None:
        tasks = [
            asyncio.ensure_future(self._count_backlog()),
            asyncio.ensure_future(self._settle_held()),
        ]
        if self.auto is not None:
            tasks.append(asyncio.ensure_future(self.auto.serve(self._stopping)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _settle_held(self) -> None:
        """Forwarded copies a crash left in hold/ go out now, not at their parent's next
        retry (leafmail.forwards). File work, so in a thread, beside the runner: each
        parent is settled under its lock, which an attempt of it holds too."""
        spool = Spool(self.inherited.spool_path, create=False)
        try:
            released = await asyncio.to_thread(settle_held, spool)
        except OSError as exc:  # the parents' next attempts settle them instead
            self.log.error("cannot settle forwarded copies in hold/", error=str(exc))
            return
        if released:
            self.log.info("released forwarded copies a crash left in hold/", count=released)

    async def _count_backlog(self) -> None:
        """Publish how many messages wait in queue/ (offline they wait on purpose: 0)."""
        if self.queue.delivery.effective_mode is DeliveryMode.OFFLINE:
            await self._stopping.wait()  # the queue manager lives on, for flush and pickup
            return
        while True:
            with contextlib.suppress(OSError):
                self.inherited.backlog.set(len(os.listdir(self._queue_dir)))
            await asyncio.sleep(BACKLOG_INTERVAL)

    async def _close(self) -> None:
        self._stopping.set()
        if self.control is not None:
            await self.control.close()
        if self.pickup is not None:
            await self.pickup.close()
        if self.committer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.committer.close)

    async def _control(self, command: str, reply: Respond) -> None:
        """Serve one control request (leafmail.control)."""
        if self.runner is None:
            reply({"error": "no smarthost configured (delivery.smarthost)"})
            return
        if command == "wake":
            (self.auto or self.runner).notify_scan()
            reply({"done": True})
            return

        def progress(done: Any) -> None:
            reply({"qid": done.qid, "verdict": done.verdict.value, "error": done.error})

        summary = await self.runner.run_once(
            force=True, progress=progress, on_total=lambda n: reply({"total": n})
        )
        reply(
            {
                "done": True,
                "deferred": summary.deferred,
                "counts": dict(summary.counts),
                "link_error": summary.link_error,
            }
        )
