"""What an smtpd worker makes itself, and what it shares with the parent (issue 12).

The policy and the check pool object are built by the parent before it forks, so the
workers share those pages; a worker that built them would copy every page the code
touched. A session is a callback object (`leafmail.session`), not a coroutine: an
idle one keeps no task and no frame (tests/test_idle_memory.py serves some).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

import leafmail.smtpd
from leafmail.config import Config, SmtpConfig
from leafmail.privsep import Announcer, Backlog, Inherited
from leafmail.receive import ReceiveService
from leafmail.smtpd import Smtpd, smtpd_settings
from leafmail.spool import Spool
from leafmail.throttle import SourceTable
from netserver.connlog import ServerLog
from netserver.modes.workers import WorkerApp


def _smtpd(tmp_path: Path, smtp: SmtpConfig | None = None) -> Smtpd:
    config = Config(spool=str(tmp_path / "spool"), hostname="mx.test", smtp=smtp or SmtpConfig())
    Spool(config.spool)
    log = ServerLog(io.StringIO(), program="leafmail")
    inherited = Inherited(config.spool, None, Announcer(), Backlog(), log, SourceTable())
    return Smtpd(smtpd_settings(config, None, None, log), inherited)


def _close(app: WorkerApp) -> None:
    """Close a worker's services as the worker does when it stops."""
    close = app.close
    assert close is not None

    async def closed() -> None:
        await close()

    asyncio.run(closed())


def test_a_worker_uses_the_policy_the_parent_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    smtpd = _smtpd(tmp_path)  # the parent's part

    def built_in_the_worker(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the worker built a policy or check pool of its own")

    monkeypatch.setattr(leafmail.smtpd, "policy_for", built_in_the_worker)
    monkeypatch.setattr(leafmail.smtpd, "check_pool", built_in_the_worker)
    app = smtpd.setup()  # the worker's part
    try:
        assert all(s.policy is smtpd.settings.policy for s in smtpd.services.values())
        assert all(isinstance(s, ReceiveService) for s in smtpd.services.values())
    finally:
        _close(app)


def test_a_worker_counts_its_sessions_for_its_committer(tmp_path: Path) -> None:
    """Every role's service of a worker counts into one `OpenSessions`, the one the
    worker's committer reads (its only open session commits on the loop)."""
    smtp = SmtpConfig(listen=("127.0.0.1:0",), submission_listen=("127.0.0.1:0",))
    smtpd = _smtpd(tmp_path, smtp)
    app = smtpd.setup()
    try:
        services = list(smtpd.services.values())
        assert len(services) == 2
        (committer,) = {id(s.committer): s.committer for s in services}.values()
        assert committer.sessions is not None
        assert all(s.sessions is committer.sessions for s in services)
    finally:
        _close(app)
