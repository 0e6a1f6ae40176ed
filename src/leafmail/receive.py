"""leafmail's SMTP service: drives the sans-I/O protocol, runs the checks, spools.

One `ReceiveService` serves one kind of listener (plain SMTP, submission with AUTH
required, or implicit TLS). Each connection is an async netserver handler: bytes from
the socket go into `ServerProtocol`; each decision event runs the checks of its stage;
a complete message gets its Received header and is committed to the spool through the
group committer, and only when the commit returned does the client get its 250.
The service never delivers mail: it only commits to the spool, which the queue manager
(`leafmail.qmgr`) reads and delivers from; no import joins the two sides.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from netserver.admit.access import AccessPolicy
from netserver.callbacks import CallbackConnection
from netserver.connlog import ServerLog
from netserver.loopconn import LoopConnection
from netserver.smtp import (
    AuthRequest,
    DataStart,
    DecisionEvent,
    Helo,
    MailFrom,
    MessageReady,
    RcptTo,
    ServerConfig,
    ServerProtocol,
    Session,
    Transaction,
    received_protocol,
    replies,
)
from netserver.smtp.replies import Reply

from .auth import Users
from .checks import (
    Accept,
    AsyncCheck,
    Check,
    CheckContext,
    Stage,
    Tag,
    Verdict,
    is_trusted,
    merge_tags,
    run_async_checks,
    run_checks,
)
from .checks.headers import drop_fields
from .envelope import ClientInfo, Envelope, Recipient
from .session import OpenSessions, ReceiveSession
from .spool import GroupCommitter, SpoolError, new_id
from .throttle import AuthThrottle, blocked_reply
from .trace import received_header

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
SPOOL_FAILED = Reply(452, "4.3.1", "Insufficient system storage, try again later")
Failure = BaseException | None  # how a session's task ended


@dataclass
class Policy:
    """The checks to run at each stage: plain ones, then those that wait for DNS.

    The plain checks run first because they are cheap and a refusal from one of them
    saves the lookups. Every check that waits accepts a trusted client (authenticated,
    or in `trusted`, the relay networks) without looking, so for such a client none of
    them is even started: its MAIL is answered at once, with no task and no extra turn
    of the loop, which is most of the mail a relay for its own network takes.
    """

    stages: dict[Stage, list[Check]] = field(default_factory=dict)
    async_stages: dict[Stage, list[AsyncCheck]] = field(default_factory=dict)
    trusted: AccessPolicy | None = None  # None: no client skips the checks that wait

    def judge(self, stage: Stage, session: CheckContext) -> Verdict:
        """The plain checks' verdict (what a caller without an event loop can run)."""
        return run_checks(self.stages.get(stage, ()), session)

    def waits(self, stage: Stage, session: CheckContext) -> bool:
        """True if a check of `stage` waits for the network (the session needs a task)."""
        if not self.async_stages.get(stage):
            return False
        return self.trusted is None or not is_trusted(session, self.trusted)

    async def judge_async(self, stage: Stage, session: CheckContext) -> Verdict:
        """Every check of the stage; the tags of all of them when they all accept."""
        verdict = self.judge(stage, session)
        if not isinstance(verdict, Accept) or not self.waits(stage, session):
            return verdict
        waiting = self.async_stages[stage]
        later = await run_async_checks(waiting, session)
        if not isinstance(later, Accept):
            return later
        return merge_tags((verdict, later))


@dataclass
class ReceiveService:
    """The SMTP handler for one listener role, and what it shares with the others."""

    smtp: ServerConfig
    committer: GroupCommitter
    policy: Policy
    users: Users | None = None
    tls: ssl.SSLContext | None = None
    require_auth: bool = False
    on_spooled: Callable[[str], None] | None = None  # the queue runner's notify
    throttle: AuthThrottle | None = None  # AUTH failures per source (shared by roles)
    log: ServerLog | None = None
    min_data_rate: int = 0  # octets a second during DATA/BDAT (0: no minimum)
    data_rate_grace: float = 30.0
    # Open sessions, shared by the services of one worker (its committer reads it).
    sessions: OpenSessions = field(default_factory=OpenSessions)

    running: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    def session(self, conn: CallbackConnection) -> ReceiveSession:
        """The session on a new connection (netserver's callback handler form)."""
        return ReceiveSession(self, conn)

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        work: Coroutine[Any, Any, None],
        done: Callable[[Failure], None],
    ) -> None:
        """Run a session's `work` as a task on its connection's `loop`; `done` gets its
        exception, or None.

        The service keeps the task (the session keeps none) until it ends, so `settle`
        can wait for the commits under way before the spool is closed.
        """
        task = loop.create_task(work)
        self.running.add(task)
        task.add_done_callback(functools.partial(self._ended, done))

    def _ended(self, done: Callable[[Failure], None], task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        done(asyncio.CancelledError() if task.cancelled() else task.exception())

    async def settle(self) -> None:
        """Wait for the sessions' tasks under way (a commit, a check) to end."""
        while self.running:
            await asyncio.wait(list(self.running))

    def judge_now(self, stage: Stage, facts: CheckContext) -> Verdict | None:
        """The stage's verdict if no check of it waits for the network; else None."""
        if self.policy.waits(stage, facts):
            return None
        return self._kept(stage, self.policy.judge(stage, facts), facts)

    def decide_now(self, proto: ServerProtocol, facts: CheckContext, event: DecisionEvent) -> bool:
        """Answer `event` now if nothing has to wait; False when `decide` must (a task).

        HELO, MAIL, RCPT and DATA whose stages have only plain checks are answered here,
        on the loop's callback; a message (the commit), AUTH and the stages that wait
        for DNS are not.
        """
        waits = self.policy.waits
        match event:
            case Helo() if not waits(Stage.HELO, facts):
                facts.helo = event.name
                facts.forget_tags(Stage.HELO)
                self._decide(proto, self._now(Stage.HELO, facts))
            case MailFrom() if not waits(Stage.MAIL, facts):
                if self._mail_starts(proto, facts, event):
                    self._decide(proto, self._now(Stage.MAIL, facts))
            case RcptTo() if not waits(Stage.RCPT, facts):
                facts.recipient = event.recipient
                self._rcpt(proto, facts, event, self._now(Stage.RCPT, facts))
            case DataStart() if not waits(Stage.DATA, facts):
                self._decide(proto, self._now(Stage.DATA, facts))
            case _:
                return False
        return True

    def _now(self, stage: Stage, facts: CheckContext) -> Verdict:
        return self._kept(stage, self.policy.judge(stage, facts), facts)

    async def decide(
        self,
        conn: CallbackConnection,
        proto: ServerProtocol,
        facts: CheckContext,
        event: DecisionEvent,
    ) -> None:
        """Run the stage's checks for one decision event and answer it (in a task)."""
        match event:
            case Helo():
                facts.helo = event.name
                facts.forget_tags(Stage.HELO)
                self._decide(proto, await self.judge(Stage.HELO, facts))
            case MailFrom():
                if self._mail_starts(proto, facts, event):
                    self._decide(proto, await self.judge(Stage.MAIL, facts))
            case RcptTo():
                facts.recipient = event.recipient
                self._rcpt(proto, facts, event, await self.judge(Stage.RCPT, facts))
            case DataStart():
                self._decide(proto, await self.judge(Stage.DATA, facts))
            case MessageReady():
                await self._message(conn, proto, facts, event)
            case AuthRequest():
                await self._auth(proto, facts, event)
            case _:
                raise TypeError(f"unexpected decision {event!r}")

    async def judge(self, stage: Stage, facts: CheckContext) -> Verdict:
        """The stage's verdict; its tags are kept for the message (`_tagged`)."""
        return self._kept(stage, await self.policy.judge_async(stage, facts), facts)

    @staticmethod
    def _kept(stage: Stage, verdict: Verdict, facts: CheckContext) -> Verdict:
        if isinstance(verdict, Tag):
            facts.tags.setdefault(stage, []).append(verdict)
        return verdict

    def _rcpt(self, proto: ServerProtocol, facts: CheckContext, event: RcptTo, v: Verdict) -> None:
        if isinstance(v, Accept):
            facts.recipients += (event.recipient,)
        self._decide(proto, v)

    @staticmethod
    def _decide(proto: ServerProtocol, verdict: Verdict, ok: Reply | None = None) -> None:
        if isinstance(verdict, Accept):
            proto.accept(ok)
        else:
            proto.reject(verdict.reply)

    def _mail_starts(self, proto: ServerProtocol, facts: CheckContext, event: MailFrom) -> bool:
        """Begin a transaction's facts; False (and 530) if AUTH is required first."""
        if self.require_auth and facts.user is None:
            proto.reject(AUTH_REQUIRED)
            return False
        facts.sender = event.sender
        facts.params = event.params
        facts.recipients = ()
        facts.start_transaction()
        return True

    async def _auth(self, proto: ServerProtocol, facts: CheckContext, event: AuthRequest) -> None:
        users = self.users
        ok = False
        if users is not None and (not event.authzid or event.authzid == event.username):
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(None, users.verify, event.username, event.password)
        if ok:
            facts.user = event.username
            proto.accept()
            return
        # One line per failure, client first: contrib/fail2ban/leafmail.conf matches it.
        ip = facts.client_ip
        client = str(ip) if ip else None  # a unix-socket peer has no address
        self.note("auth failed", client=client, user=event.username, mechanism=event.mechanism)
        delay = self.throttle.failed(ip) if self.throttle and ip else 0.0
        if delay is None:
            self.note("auth blocked", client=client)
            proto.reject(blocked_reply(self.smtp.hostname))
            return
        if delay:
            await asyncio.sleep(delay)
        proto.reject(replies.AUTH_FAILED)

    def note(self, message: str, **fields: object) -> None:
        """One log line, if the service has a log."""
        if self.log is not None:
            self.log.info(message, **fields)

    async def _message(
        self,
        conn: CallbackConnection,
        proto: ServerProtocol,
        facts: CheckContext,
        event: MessageReady,
    ) -> None:
        facts.data = event.data
        verdict = await self.judge(Stage.END_OF_DATA, facts)
        facts.data = b""
        if not isinstance(verdict, Accept):
            proto.reject(verdict.reply)
            return
        added, data = _tagged(event.data, facts.all_tags())
        envelope = self._envelope(conn, event.session, event.envelope)
        qid = new_id()
        header = received_header(
            helo=event.session.helo,
            client_ip=envelope.client.ip,
            hostname=self.smtp.hostname,
            protocol=envelope.client.protocol,
            qid=qid,
            recipients=[r.address for r in envelope.recipients],
            tls=envelope.client.tls,
            utf8=envelope.smtputf8,
        )
        try:
            await self.committer.commit(envelope, added + header + data, qid=qid)
        except SpoolError as exc:
            if self.log is not None:  # the operator must hear of a failing spool
                self.log.error("message refused: the spool failed", qid=qid, reason=exc.strerror)
            proto.reject(SPOOL_FAILED)
            return
        proto.accept(replies.queued(qid))
        # The 250 goes out now, not when the session's task has ended (a loop turn later,
        # after the announcement below, which wakes the queue manager's process first).
        # Nothing else is pending: the session sent its replies before this task began.
        if not conn.is_lost:
            conn.write(proto.data_to_send())
        if self.on_spooled is not None:
            self.on_spooled(qid)

    def _envelope(self, conn: LoopConnection, session: Session, smtp: Transaction) -> Envelope:
        """The spool's envelope for this transaction."""
        params = smtp.params
        tls = _tls_text(conn)
        return Envelope(
            sender=str(smtp.sender) if smtp.sender else "",
            recipients=tuple(
                Recipient(
                    str(r.mailbox),
                    tuple(sorted(n.value for n in r.params.notify or ())),
                    f"{r.params.orcpt.addr_type};{r.params.orcpt.address}"
                    if r.params.orcpt
                    else None,
                )
                for r in smtp.recipients
            ),
            client=ClientInfo(
                ip=conn.peer.host or None,
                port=conn.peer.port,
                helo=session.helo,
                protocol=received_protocol(session, smtp),
                tls=tls,
                auth=session.auth_user,
            ),
            received=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            body=params.body.value if params.body else "7BIT",
            smtputf8=params.smtputf8,
            ret=params.ret.value if params.ret else None,
            envid=params.envid,
        )


def _tagged(data: bytes, tag: Accept) -> tuple[bytes, bytes]:
    """The header fields the checks add, and the message without those they drop."""
    if not isinstance(tag, Tag):
        return b"", data
    return b"".join(tag.fields), drop_fields(data, tag.drop)


def _tls_text(conn: LoopConnection) -> str | None:
    obj = conn.get_extra_info("ssl_object")
    if obj is None:
        return None
    cipher = obj.cipher()
    return f"{obj.version()} {cipher[0] if cipher else ''}".strip()
