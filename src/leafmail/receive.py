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
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from netserver.aio import AsyncConnection, ServerStopping
from netserver.connlog import ServerLog
from netserver.smtp import (
    AuthRequest,
    DataStart,
    DecisionEvent,
    Event,
    Helo,
    MailFrom,
    MessageReady,
    RcptTo,
    ServerConfig,
    ServerProtocol,
    Session,
    StartTLS,
    Transaction,
    received_protocol,
    replies,
)
from netserver.smtp.replies import Reply
from netserver.smtp.states import State

from .auth import Users
from .checks import (
    Accept,
    AsyncCheck,
    Check,
    CheckContext,
    Stage,
    Tag,
    Verdict,
    merge_tags,
    run_async_checks,
    run_checks,
)
from .checks.headers import drop_fields
from .datarate import DataRate, too_slow
from .envelope import ClientInfo, Envelope, Recipient
from .spool import GroupCommitter, SpoolError, new_id
from .throttle import AuthThrottle, blocked_reply
from .trace import received_header

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
SPOOL_FAILED = Reply(452, "4.3.1", "Insufficient system storage, try again later")
READ_SIZE = 65536
_DATA_STATES = frozenset({State.DATA, State.BDAT, State.CHUNKS})


@dataclass
class Policy:
    """The checks to run at each stage: plain ones, then those that wait for DNS.

    The plain checks run first because they are cheap and a refusal from one of them
    saves the lookups.
    """

    stages: dict[Stage, list[Check]] = field(default_factory=dict)
    async_stages: dict[Stage, list[AsyncCheck]] = field(default_factory=dict)

    def judge(self, stage: Stage, session: CheckContext) -> Verdict:
        """The plain checks' verdict (what a caller without an event loop can run)."""
        return run_checks(self.stages.get(stage, ()), session)

    async def judge_async(self, stage: Stage, session: CheckContext) -> Verdict:
        """Every check of the stage; the tags of all of them when they all accept."""
        verdict = self.judge(stage, session)
        waiting = self.async_stages.get(stage, ())
        if not waiting or not isinstance(verdict, Accept):
            return verdict
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

    async def handle(self, conn: AsyncConnection) -> None:
        """Serve one SMTP session on `conn` until QUIT, 421 or the client leaves."""
        encrypted = conn.get_extra_info("ssl_object") is not None
        facts = CheckContext(conn.peer.ip, tls=encrypted)
        verdict = await self._judge(Stage.CONNECT, facts)
        # A refused client is greeted with the refusal: 554 (then only QUIT) or 421.
        greeting = None if isinstance(verdict, Accept) else verdict.reply
        ip = conn.peer.ip
        if greeting is None and self.throttle and ip and self.throttle.is_blocked(ip):
            greeting = blocked_reply(self.smtp.hostname)
            self._log("auth blocked", client=str(ip))
        proto = ServerProtocol(self.smtp, greeting, tls=encrypted)
        conn.write(proto.data_to_send())
        conn.interrupt_on_stop = True
        rate = DataRate(self.min_data_rate, self.data_rate_grace)
        while not proto.closed:
            rate.track(proto.state in _DATA_STATES)
            try:
                limit = rate.remaining()
                # Awaited here, not through a helper: an idle session keeps every frame
                # of its await chain, so a helper would cost memory per session.
                data = await (conn.read(READ_SIZE) if limit is None else _read(conn, limit))
            except TimeoutError:
                proto.close(too_slow(self.smtp.hostname))
                conn.write(proto.data_to_send())
                break
            except ServerStopping:
                if proto.envelope is None:  # between transactions: say goodbye now
                    proto.close(replies.shutting_down(self.smtp.hostname))
                    conn.write(proto.data_to_send())
                    break
                continue  # a transaction is under way: let it finish within the grace time
            if not data:
                return
            rate.add(len(data))
            events = proto.receive_data(data)
            while True:
                decided = await self._dispatch(conn, proto, facts, events)
                out = proto.data_to_send()  # replies with no event (NOOP, errors) too
                if out:
                    conn.write(out)
                if not decided:
                    break
                events = proto.resume()
            if conn.stop_requested and proto.envelope is None and not proto.closed:
                # The server is stopping and the transaction under way has ended.
                proto.close(replies.shutting_down(self.smtp.hostname))
                conn.write(proto.data_to_send())
            await conn.drain()
        await conn.close()

    async def _dispatch(
        self,
        conn: AsyncConnection,
        proto: ServerProtocol,
        facts: CheckContext,
        events: Sequence[Event],
    ) -> bool:
        """Act on a batch of events; True if a decision was made (so `resume`)."""
        for event in events:
            if isinstance(event, StartTLS):
                await self._start_tls(conn, proto)
                facts.reset_for_tls()
            elif isinstance(event, DecisionEvent):
                await self._decision(conn, proto, facts, event)
                return True  # a decision is always the last event of a batch
        return False

    async def _decision(
        self,
        conn: AsyncConnection,
        proto: ServerProtocol,
        facts: CheckContext,
        event: DecisionEvent,
    ) -> None:
        """Run the stage's checks for one decision event and answer it."""
        match event:
            case Helo():
                facts.helo = event.name
                facts.tags.pop(Stage.HELO, None)
                self._decide(proto, await self._judge(Stage.HELO, facts))
            case MailFrom():
                await self._mail(proto, facts, event)
            case RcptTo():
                facts.recipient = event.recipient
                verdict = await self._judge(Stage.RCPT, facts)
                if isinstance(verdict, Accept):
                    facts.recipients.append(event.recipient)
                self._decide(proto, verdict)
            case DataStart():
                self._decide(proto, await self._judge(Stage.DATA, facts))
            case MessageReady():
                await self._message(conn, proto, facts, event)
            case AuthRequest():
                await self._auth(proto, facts, event)
            case _:
                raise TypeError(f"unexpected decision {event!r}")

    async def _judge(self, stage: Stage, facts: CheckContext) -> Verdict:
        """The stage's verdict; its tags are kept for the message (`_tagged`)."""
        verdict = await self.policy.judge_async(stage, facts)
        if isinstance(verdict, Tag):
            facts.tags.setdefault(stage, []).append(verdict)
        return verdict

    @staticmethod
    def _decide(proto: ServerProtocol, verdict: Verdict, ok: Reply | None = None) -> None:
        if isinstance(verdict, Accept):
            proto.accept(ok)
        else:
            proto.reject(verdict.reply)

    async def _mail(self, proto: ServerProtocol, facts: CheckContext, event: MailFrom) -> None:
        if self.require_auth and facts.user is None:
            proto.reject(AUTH_REQUIRED)
            return
        facts.sender = event.sender
        facts.params = event.params
        facts.recipients = []
        facts.start_transaction()
        self._decide(proto, await self._judge(Stage.MAIL, facts))

    async def _start_tls(self, conn: AsyncConnection, proto: ServerProtocol) -> None:
        assert self.tls is not None
        conn.write(proto.data_to_send())
        await conn.start_tls(self.tls)
        proto.tls_started()

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
        self._log("auth failed", client=client, user=event.username, mechanism=event.mechanism)
        delay = self.throttle.failed(ip) if self.throttle and ip else 0.0
        if delay is None:
            self._log("auth blocked", client=client)
            proto.reject(blocked_reply(self.smtp.hostname))
            return
        if delay:
            await asyncio.sleep(delay)
        proto.reject(replies.AUTH_FAILED)

    def _log(self, message: str, **fields: object) -> None:
        if self.log is not None:
            self.log.info(message, **fields)

    async def _message(
        self, conn: AsyncConnection, proto: ServerProtocol, facts: CheckContext, event: MessageReady
    ) -> None:
        facts.data = event.data
        verdict = await self._judge(Stage.END_OF_DATA, facts)
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
        except SpoolError:
            proto.reject(SPOOL_FAILED)
            return
        proto.accept(replies.queued(qid))
        if self.on_spooled is not None:
            self.on_spooled(qid)

    def _envelope(self, conn: AsyncConnection, session: Session, smtp: Transaction) -> Envelope:
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


async def _read(conn: AsyncConnection, limit: float) -> bytes:
    """The next bytes from the client; TimeoutError past `limit` seconds."""
    if limit <= 0:
        raise TimeoutError
    async with asyncio.timeout(limit):
        return await conn.read(READ_SIZE)


def _tagged(data: bytes, tag: Accept) -> tuple[bytes, bytes]:
    """The header fields the checks add, and the message without those they drop."""
    if not isinstance(tag, Tag):
        return b"", data
    return b"".join(tag.fields), drop_fields(data, tag.drop)


def _tls_text(conn: AsyncConnection) -> str | None:
    obj = conn.get_extra_info("ssl_object")
    if obj is None:
        return None
    cipher = obj.cipher()
    return f"{obj.version()} {cipher[0] if cipher else ''}".strip()
