"""The smtpd worker processes of `leafmail serve`: SMTP sessions, checks and group commit.

The parent builds one `Smtpd` from the config and hands its `handle` to the servers of
every listener role; the servers pass each connection to a worker process (netserver's
`WorkerPool`). The policy (aliases, resolvers) and the check pool object are built
by the parent (`smtpd_settings`), so every worker shares them; the pool loads the code
its workers run there, while every file can still be read. `setup` runs in each new
worker, still as root: it drops privileges, then opens its own `GroupCommitter` and the
sessions' services. The check pool forks its workers only at its first job, after the
drop, so they run unprivileged; AUTH failures are counted in the table the parent made
before it forked, so all workers count together (`leafmail.throttle`).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from netserver.callbacks import CallbackConnection
from netserver.connlog import ServerLog
from netserver.modes.workers import WorkerApp

from .auth import Users
from .checks.pool import CheckPool
from .config import Config, SmtpConfig
from .envelope import Envelope
from .policy import check_pool, policy_for
from .privsep import Backlog, Inherited, become
from .receive import Policy, ReceiveService
from .session import OpenSessions, ReceiveSession
from .spool import GroupCommitter, Spool
from .throttle import auth_throttle

IN_FLOW_DELAY = 1.0  # Postfix's in_flow_delay: the most a reply waits for the queue to drain


@dataclass(frozen=True)
class Role:
    """A listener role: its name, addresses, and how its sessions behave."""

    name: str
    listen: tuple[str, ...]
    offer_tls: bool
    require_auth: bool
    implicit_tls: bool = False


def roles(smtp: SmtpConfig, *, has_tls: bool) -> list[Role]:
    """smtp, submission (AUTH required) and smtps (implicit TLS), those configured."""
    every = [
        Role("smtp", smtp.listen, offer_tls=has_tls, require_auth=False),
        Role("submission", smtp.submission_listen, offer_tls=has_tls, require_auth=True),
        Role("smtps", smtp.smtps_listen, offer_tls=False, require_auth=False, implicit_tls=True),
    ]
    return [role for role in every if role.listen]


class PacedCommitter(GroupCommitter):
    """A group committer that slows acceptance while the queue is over its threshold.

    As Postfix's in_flow_delay: when mail arrives faster than it leaves, the reply to
    each message waits (up to IN_FLOW_DELAY) instead of letting the backlog grow without
    end. The message is already durable; only the client's next message is slowed.
    """

    def __init__(
        self,
        spool: Spool,
        backlog: Backlog,
        threshold: int,
        log: ServerLog,
        sessions: OpenSessions | None = None,
    ) -> None:
        super().__init__(spool, sessions=sessions)
        self.backlog = backlog
        self.threshold = threshold
        self.log = log
        self.slowing = False

    async def commit(self, envelope: Envelope, data: bytes, qid: str | None = None) -> str:
        done = await super().commit(envelope, data, qid)
        queued = self.backlog.get()
        over = bool(self.threshold) and queued > self.threshold
        if over != self.slowing:  # one line per change, not per message
            self.slowing = over
            what = "queue over in_flow_queue: slowing acceptance" if over else "queue drained"
            self.log.info(what, queued=queued, threshold=self.threshold)
        if over:
            # From 0.1 s just over the threshold up to IN_FLOW_DELAY at twice it.
            await asyncio.sleep(min(IN_FLOW_DELAY, 0.1 + queued / self.threshold - 1.0))
        return done


@dataclass
class SmtpdSettings:
    """What the parent read (as root) for the workers; replaced whole on a reload.

    The policy and the check pool object are made here too, in the parent, before any
    worker is forked: the workers share them with it. A worker that ran that code
    itself would copy every page the code touched (about 1.5 MiB each); the pool's
    processes are started by each worker, at its first job, after the drop.
    """

    config: Config
    tls: ssl.SSLContext | None
    users: Users | None
    pool: CheckPool
    policy: Policy


def smtpd_settings(
    config: Config, tls: ssl.SSLContext | None, users: Users | None, log: ServerLog
) -> SmtpdSettings:
    """The workers' settings, with their check pool and policy built from `config`."""
    pool = check_pool(config.checks, log)
    return SmtpdSettings(config, tls, users, pool, policy_for(config, pool))


class Smtpd:
    """The SMTP side, one instance per worker process (built by `setup` after fork)."""

    def __init__(self, settings: SmtpdSettings, inherited: Inherited) -> None:
        self.settings = settings
        self.inherited = inherited
        self.services: dict[str, ReceiveService] = {}

    def session(self, role: str, conn: CallbackConnection) -> ReceiveSession:
        """The session on `conn`, served by this worker's service for `role`: an object
        the loop's callbacks drive, with no task while it waits (`leafmail.session`)."""
        return self.services[role].session(conn)

    def setup(self) -> WorkerApp:
        """In a new worker: prepare as root, drop privileges, then open the services."""
        inherited, settings = self.inherited, self.settings
        inherited.announcer.receiver.close()  # only the queue manager reads announcements
        pool, policy = settings.pool, settings.policy  # made by the parent (see above)
        become(inherited.identity)
        spool = Spool(inherited.spool_path, create=False)
        threshold = settings.config.process.in_flow_queue
        sessions = OpenSessions()  # every role's: the committer reads it
        committer = PacedCommitter(spool, inherited.backlog, threshold, inherited.log, sessions)
        self.services = self._services(settings, committer, policy, sessions)

        async def close() -> None:
            for service in self.services.values():
                await service.settle()  # commits under way end before the spool closes
            await pool.close()
            await asyncio.get_running_loop().run_in_executor(None, committer.close)

        return WorkerApp(close=close)

    def _services(
        self,
        settings: SmtpdSettings,
        committer: GroupCommitter,
        policy: Policy,
        sessions: OpenSessions,
    ) -> dict[str, ReceiveService]:
        """The services of each role (the place for per-worker, unprivileged objects)."""
        has_tls = settings.tls is not None
        # AUTH failures, counted in the parent's table: every worker counts together.
        config = settings.config
        throttle = auth_throttle(config.auth, config.relay_policy(), self.inherited.auth_failures)
        smtp = config.smtp
        return {
            role.name: ReceiveService(
                smtp.server_config(
                    config.hostname,
                    tls_available=role.offer_tls,
                    auth_enabled=settings.users is not None,
                ),
                committer,
                policy,
                users=settings.users,
                tls=settings.tls,
                require_auth=role.require_auth,
                on_spooled=self.inherited.announcer.announce,
                throttle=throttle,
                log=self.inherited.log,
                min_data_rate=smtp.min_data_rate,
                data_rate_grace=smtp.data_rate_grace,
                sessions=sessions,
            )
            for role in roles(smtp, has_tls=has_tls)
        }
