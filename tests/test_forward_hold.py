"""A forwarded copy left in hold/ by a killed queue runner, and the operator's hold/release.

The runner runs in a child process on a real spool, with real alias expansion and the
copy for bob going to an aiosmtpd smarthost on loopback. The child stops itself
(SIGSTOP) at one of the recorded steps of a forward (leafmail.expansion) and is then
SIGKILLed there, so the spool is exactly what a crash at that step leaves. Then the
operator's `leafmail release` / `leafmail hold` (the real CLI) and later runs must give
bob exactly the one copy the operator's choice allows: never two, never a held copy sent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FakeClock
from leafmail_fixtures import (
    CLI_TIMEOUT,
    LeafmailFactory,
    clean_env,
    leafmail_command,
    leafmail_servers,
)
from lifecycle_handlers import wait_until
from smarthost import Smarthost, delivery_counts
from test_expansion import BOB, HOST, MESSAGE, POLICY, SENDER, config_for, in_spool, runner_for
from test_expansion import tmp_path as tmp_path  # the fixture (a directory VIRTUAL may use)

from leafmail.envelope import Envelope, Recipient
from leafmail.forwards import settle_held
from leafmail.message import attempt, unfreeze
from leafmail.spool import Spool
from leafmail.states import QueueState
from leafmail.status import TargetState

pytestmark = pytest.mark.slow


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def stop_here() -> None:
    """Stop this process before the calling thread runs another line: a SIGSTOP aimed at
    the thread itself (one aimed at the process may be taken by another thread, while
    this one goes on a little: the rename it was about to make would happen)."""
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


class StoppingSpool(Spool):
    """A real spool whose process stops itself at one step of a forward, to be killed."""

    def __init__(self, root: Path, step: str) -> None:
        super().__init__(root)
        self.step = step

    def commit(self, *args: object, **kwargs: object) -> str:
        qid = super().commit(*args, **kwargs)  # type: ignore[arg-type]
        if self.step == "committed" and kwargs.get("state") == QueueState.HOLD:
            stop_here()  # STAGED recorded, the copy in hold/
        return qid

    def move(self, qid: str, src: QueueState, dst: QueueState) -> None:
        release = (src, dst) == (QueueState.HOLD, QueueState.QUEUE)
        if self.step == "recorded" and release:
            stop_here()  # FORWARDED recorded, not yet released
        super().move(qid, src, dst)
        if self.step == "released" and release:
            stop_here()  # released, and the mark not yet DELIVERED


def killed_mid_forward(tmp_path: Path, sink: Smarthost, step: str) -> tuple[Spool, str, str]:
    """A message to team (alias: bob) whose runner was SIGKILLed at `step`: the spool,
    the message's id and its forwarded copy's."""
    config = config_for(tmp_path, sink, f"team: {BOB}\n")
    spool = Spool(tmp_path / "spool")
    qid = spool.commit(Envelope(SENDER, (Recipient(f"team@{HOST}"),)), MESSAGE)
    pid = os.fork()
    if pid == 0:  # the queue runner that crashes
        try:
            stopping = StoppingSpool(tmp_path / "spool", step)
            asyncio.run(runner_for(config, stopping, FakeClock()).run_once(force=True))
        finally:
            os._exit(1)  # never reached when the kill comes at the step
    _pid, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "the runner finished instead of stopping at the step"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    (copy,) = [other for other in in_spool(spool) if other != qid]
    assert spool.find(qid) == QueueState.QUEUE
    return spool, qid, copy


def queue_tool(tmp_path: Path, spool: Spool, *args: str) -> str:
    done = subprocess.run(
        leafmail_command(*args, "--spool", str(spool.root)),
        env=clean_env(tmp_path),
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def mark_of(spool: Spool, qid: str) -> tuple[TargetState, str]:
    (mark,) = unfreeze(spool, qid).status.recipients[0].targets
    return mark.state, mark.qid


@pytest.mark.parametrize("step", ["committed", "recorded"])
def test_released_by_the_operator_after_a_crash_bob_gets_one_copy(
    sink: Smarthost, tmp_path: Path, step: str
) -> None:
    """`leafmail release ALL` settles the parent's record first: the copy it releases is
    recorded as forwarded, so delivering it before the parent's retry makes no second."""
    spool, qid, copy = killed_mid_forward(tmp_path, sink, step)
    assert spool.find(copy) == QueueState.HOLD
    assert f"{copy}: released" in queue_tool(tmp_path, spool, "release", "ALL")
    assert spool.find(copy) == QueueState.QUEUE
    assert mark_of(spool, qid) == (TargetState.DELIVERED, copy)
    # The runner happens to take the copy before the parent's retry.
    config = config_for(tmp_path, sink, f"team: {BOB}\n")
    runner = runner_for(config, spool, FakeClock())

    async def copy_first_then_retries() -> None:  # one loop: the agent keeps its session
        await attempt(spool, copy, runner.agent, POLICY, hostname=HOST, now=0.0)
        for _ in range(2):
            await runner.run_once(force=True)

    asyncio.run(copy_first_then_retries())
    assert delivery_counts(sink) == {BOB: 1}
    assert in_spool(spool) == []


@pytest.mark.parametrize(
    ("step", "said"),
    [("released", "held"), ("recorded", "already held"), ("committed", "already held")],
)
def test_held_by_the_operator_after_a_crash_the_copy_stays_held(
    sink: Smarthost, tmp_path: Path, step: str, said: str
) -> None:
    """A copy the operator holds is not released behind their back by the parent's
    recovery: the hold settles the record first (a copy in hold/ stays there, never
    passing through the queue), then holds the copy for good."""
    spool, qid, copy = killed_mid_forward(tmp_path, sink, step)
    assert f"{copy}: {said}" in queue_tool(tmp_path, spool, "hold", copy)
    assert mark_of(spool, qid) == (TargetState.DELIVERED, copy)
    config = config_for(tmp_path, sink, f"team: {BOB}\n")
    asyncio.run(runner_for(config, spool, FakeClock()).run_once(force=True))
    assert delivery_counts(sink) == {}
    assert in_spool(spool) == [copy]  # the parent is done; the held copy waits
    assert spool.find(copy) == QueueState.HOLD


@pytest.mark.parametrize("step", ["committed", "recorded", "released"])
def test_deleted_by_the_operator_after_a_crash_the_copy_is_not_made_again(
    sink: Smarthost, tmp_path: Path, step: str
) -> None:
    spool, _qid, copy = killed_mid_forward(tmp_path, sink, step)
    assert f"{copy}: deleted" in queue_tool(tmp_path, spool, "delete", copy)
    config = config_for(tmp_path, sink, f"team: {BOB}\n")
    for _ in range(2):
        asyncio.run(runner_for(config, spool, FakeClock()).run_once(force=True))
    assert delivery_counts(sink) == {}
    assert in_spool(spool) == []


@pytest.mark.parametrize("step", ["committed", "recorded"])
def test_at_start_the_queue_manager_releases_what_the_crash_left_in_hold(
    sink: Smarthost, tmp_path: Path, step: str
) -> None:
    """Not at the parent's next retry, which may be hours away."""
    spool, qid, copy = killed_mid_forward(tmp_path, sink, step)
    assert spool.find(copy) == QueueState.HOLD
    assert settle_held(spool) == 1
    assert spool.find(copy) == QueueState.QUEUE
    assert mark_of(spool, qid) == (TargetState.DELIVERED, copy)
    assert settle_held(spool) == 0  # settled once: an operator's later hold would stay


def test_a_starting_daemon_releases_what_the_crash_left_in_hold(
    sink: Smarthost, tmp_path: Path, servers: LeafmailFactory
) -> None:
    """`leafmail serve` on that spool (offline: the copy then waits in queue/ for a flush)."""
    spool, qid, copy = killed_mid_forward(tmp_path, sink, "committed")
    daemon = servers.spawn(
        ["--spool", str(spool.root), "--listen", "127.0.0.1:0"], spool_path=spool.root
    )
    assert wait_until(lambda: "released forwarded copies a crash left in hold/" in daemon.log())
    assert spool.find(copy) == QueueState.QUEUE
    assert mark_of(spool, qid) == (TargetState.DELIVERED, copy)
