"""One SMTP session, driven by the event loop's callbacks: no task while it waits.

Most of the time a session waits for its client, and at 10,000 idle sessions whatever
waiting costs is paid 10,000 times. A coroutine per session keeps a task, its frames and
a future alive all along (about 1.5 KB); this object is told of each chunk by the loop
(netserver's `Callbacks` form) and feeds it to the sans-I/O `ServerProtocol` at once.
Replies that need no waiting (EHLO, RSET, errors, and the MAIL, RCPT and DATA decisions
of stages whose checks are all plain) are answered right there. A task is made only for
what has to wait: checks that wait for DNS, the spool's commit before a 250, AUTH's
password check, the STARTTLS handshake. Bytes that arrive meanwhile are held, in order,
and fed once the task is done (reading pauses if they pile up), so pipelining (RFC 2920)
works as before: one reply per command, in order, later commands held back by a
pending decision.

The session also applies the minimum data rate (a timer only while message data is
read), a deadline for each command line (a timer only while a line is part-way in: see
`_watch_line`), and answers a server stop with 421 between transactions, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from netserver.callbacks import CallbackConnection, Callbacks
from netserver.smtp import Closed, DecisionEvent, Event, ServerProtocol, StartTLS, replies
from netserver.smtp.replies import Reply
from netserver.smtp.states import State

from .checks import Accept, CheckContext, Stage, Verdict
from .datarate import DataRate, too_slow
from .throttle import blocked_reply

if TYPE_CHECKING:
    from .receive import ReceiveService

HOLD_HIGH_WATER = 262144  # bytes held during a task before reading pauses
_DATA_STATES = frozenset({State.DATA, State.BDAT, State.CHUNKS})


class OpenSessions:
    """How many sessions a worker has open, over all its services (listener roles).

    Its group committer reads it (`GroupCommitter(sessions=...)`): the only session
    open can have its commit done on the loop, with nobody else to block. A session
    counts from its greeting until its connection is lost; one whose construction
    failed never counted.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count


class ReceiveSession(Callbacks):
    """The SMTP dialogue on one connection, for one `ReceiveService`."""

    __slots__ = (
        "busy",
        "eof",
        "facts",
        "held",
        "line_reads",
        "line_timer",
        "paused",
        "proto",
        "rate",
        "service",
        "timer",
    )

    def __init__(self, service: ReceiveService, conn: CallbackConnection) -> None:
        super().__init__(conn)
        self.service = service
        self.facts = CheckContext(conn.peer.ip, tls=conn.get_extra_info("ssl_object") is not None)
        self.proto: ServerProtocol | None = None  # made with the greeting
        self.busy = False  # a task is deciding; input is held meanwhile
        self.held: bytearray | None = None
        self.paused = False
        self.eof = False
        self.rate: DataRate | None = None  # only while message data is read
        self.timer: asyncio.TimerHandle | None = None
        self.line_timer: asyncio.TimerHandle | None = None  # only while a line is part-way in
        self.line_reads = 0  # proto.reads when line_timer was set
        verdict = service.judge_now(Stage.CONNECT, self.facts)
        if verdict is None:  # the connect stage waits for DNS
            self._spawn(self._greet_later())
        else:
            self._greet(verdict)
        service.sessions.count += 1  # last: `connection_lost` is called only if we got here

    # -- the loop's callbacks -------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.busy:
            self._hold(data)
            return
        proto = self.proto
        assert proto is not None
        if self.rate is not None:
            self.rate.add(len(data))
        self._run(proto.receive_data(data))

    def eof_received(self) -> None:
        if self.busy:
            self.eof = True  # after the task, as a read would have seen it
        else:
            self.conn.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection is gone. Before the session's end (no QUIT answered, no 421
        sent) the client cut it short, by a clean close too (RFC 5321 4.1.1.10 has it
        send QUIT first): logged so, as Postfix logs "lost connection". A TLS close
        without close_notify gets here with no EOF and no error, so this is the place."""
        proto = self.proto
        if self.conn.complete is None and (proto is None or not proto.closed):
            self.conn.complete = False
        self.service.sessions.count -= 1
        self._stop_timer()
        self._stop_line_timer()

    def stop_requested(self) -> None:
        proto = self.proto
        if not self.busy and proto is not None and proto.envelope is None and not proto.closed:
            self._goodbye(replies.shutting_down(self.service.smtp.hostname))
        # Otherwise a transaction (or a decision) is under way: `_run` says 421 once
        # it is over, within the server's grace time.

    # -- the dialogue ---------------------------------------------------------------------
    def _greet(self, verdict: Verdict) -> None:
        """Queue the greeting: 220, or the connect stage's refusal, or 421 if blocked."""
        service, conn = self.service, self.conn
        greeting: Reply | None = None if isinstance(verdict, Accept) else verdict.reply
        ip = conn.peer.ip
        throttle = service.throttle
        if greeting is None and throttle and ip and throttle.is_blocked(ip):
            greeting = blocked_reply(service.smtp.hostname)
            service.note("auth blocked", client=str(ip))
        self.proto = ServerProtocol(service.smtp, greeting, tls=self.facts.tls)
        conn.write(self.proto.data_to_send())
        if self.proto.closed:  # a 421 greeting closes the channel (RFC 5321 3.8)
            conn.close_lingering()
        elif conn.stop_requested:
            self.stop_requested()

    async def _greet_later(self) -> None:
        self._greet(await self.service.judge(Stage.CONNECT, self.facts))

    def _run(self, events: Sequence[Event]) -> None:
        """Answer a batch of events and what follows them, until input runs out or a
        task must wait; then send the replies gathered, in one write."""
        proto = self.proto
        assert proto is not None
        service, facts = self.service, self.facts
        while events:
            last = events[-1]  # a decision or STARTTLS is always the last event
            if isinstance(last, StartTLS):
                self._spawn(self._start_tls())
                return
            if not isinstance(last, DecisionEvent):
                break
            if not service.decide_now(proto, facts, last):
                self._flush()
                self._spawn(service.decide(self.conn, proto, facts, last))
                return
            events = proto.resume()
        self._flush()
        self._track_rate()
        self._watch_line()
        if proto.closed:
            self._end(events)
        elif self.conn.stop_requested and proto.envelope is None:
            self._goodbye(replies.shutting_down(service.smtp.hostname))

    async def _start_tls(self) -> None:
        """STARTTLS: the 220 in plaintext, the handshake, then the session starts over.

        Plaintext the client sent after the command is dropped unread (RFC 3207 4.2):
        it cannot be trusted to come from the party that will hold the session.
        """
        conn, proto, tls = self.conn, self.proto, self.service.tls
        assert proto is not None and tls is not None and conn.transport is not None
        self._flush()
        self.held = None
        await conn.tls_handshake(tls)
        proto.tls_started()
        self.facts.reset_for_tls()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task; input is held until it is done, then fed in order."""
        self.busy = True
        self.service.start(self.conn.loop, work, self._done)

    def _done(self, failure: BaseException | None) -> None:
        """The task ended: on failure end the connection, else carry on with the input."""
        self.busy = False
        conn, proto = self.conn, self.proto
        if failure is not None:
            conn.fail(failure)
            return
        if conn.is_lost or proto is None:
            return
        try:
            self._resume()
        except Exception as exc:
            conn.fail(exc)

    def _resume(self) -> None:
        proto = self.proto
        assert proto is not None
        self._run(proto.resume() if proto.pending is None else ())
        held = self.held
        if held and not self.busy:
            self.held = None
            self.data_received(bytes(held))
        if self.paused and not self.busy and self.conn.transport is not None:
            self.paused = False
            self.conn.transport.resume_reading()
        if self.eof and not self.busy:
            self.conn.close()

    def _hold(self, data: bytes) -> None:
        held = self.held
        if held is None:
            held = self.held = bytearray()
        held += data
        transport = self.conn.transport
        if len(held) > HOLD_HIGH_WATER and not self.paused and transport is not None:
            transport.pause_reading()
            self.paused = True

    def _flush(self) -> None:
        proto = self.proto
        assert proto is not None
        out = proto.data_to_send()
        if out and not self.conn.is_lost:
            self.conn.write(out)

    def _goodbye(self, reply: Reply) -> None:
        proto = self.proto
        assert proto is not None
        proto.close(reply)
        self._flush()
        self.conn.close_lingering()

    def _end(self, events: Sequence[Event]) -> None:
        """The protocol closed the session. After QUIT's 221 the client has said all it
        will: close. After a 421 (too many errors), or input after the session was over,
        it may still be sending, and closed at once with that input unread the
        connection is reset and the 421 may never be read: close lingering."""
        last = events[-1] if events else None
        if isinstance(last, Closed) and last.reply.code == 221:
            self.conn.complete = True  # logged as ended, whatever the client does next
            self.conn.close()
        else:
            self.conn.close_lingering()

    # -- the minimum data rate (Postfix's smtpd_min_data_rate) ----------------------------
    def _track_rate(self) -> None:
        """Start the clock when message data begins, forget it when the message ends."""
        proto, service = self.proto, self.service
        assert proto is not None
        # The octets of a refused BDAT chunk are read and dropped at the same pace.
        if (proto.state in _DATA_STATES or proto.skipping) and service.min_data_rate > 0:
            if self.rate is None:
                self.rate = DataRate(service.min_data_rate, service.data_rate_grace)
                self.rate.track(True)
            if self.timer is None:
                left = self.rate.remaining() or 0.0
                self.timer = self.conn.loop.call_later(max(left, 0.0), self._rate_due)
        elif self.rate is not None:
            self.rate = None
            self._stop_timer()

    def _rate_due(self) -> None:
        self.timer = None
        rate = self.rate
        if rate is None or self.busy or self.conn.is_lost:
            return  # `_track_rate` sets it again once the task is done
        left = rate.remaining()
        if left is not None and left > 0:
            self.timer = self.conn.loop.call_later(left, self._rate_due)
            return
        self._goodbye(too_slow(self.service.smtp.hostname))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- the deadline of a command line (Postfix's smtpd_per_record_deadline) -------------
    def _watch_line(self) -> None:
        """Give a command line that has begun `command_timeout` seconds to end.

        The idle timeout counts from the last octet, so alone it lets a client hold a
        session (and a slot of max_sessions_per_source) for ever with one octet every few
        minutes and never a CRLF, or inside an over-long line that is being dropped. The
        deadline counts from the first octet of the line part-way in and starts again
        once a line has ended; a session between lines or waiting on us has no timer, so
        an idle session costs nothing more. Message data has the minimum data rate.
        """
        proto = self.proto
        assert proto is not None
        if not proto.mid_line:
            if self.line_timer is not None:
                self._stop_line_timer()
            return
        reads = proto.reads
        if self.line_timer is not None and reads == self.line_reads:
            return  # the same line is still coming in: its deadline stands
        self._stop_line_timer()
        self.line_reads = reads
        self.line_timer = self.conn.loop.call_later(
            self.service.smtp.command_timeout, self._line_due
        )

    def _line_due(self) -> None:
        self.line_timer = None
        proto = self.proto
        if self.busy or self.conn.is_lost or proto is None or proto.closed:
            return  # after a task `_run` looks again
        if proto.mid_line:
            self._goodbye(replies.timed_out(self.service.smtp.hostname))

    def _stop_line_timer(self) -> None:
        if self.line_timer is not None:
            self.line_timer.cancel()
            self.line_timer = None
