"""A sans-I/O ESMTP server: bytes in, events out; decisions in, reply bytes out.

`ServerProtocol` owns no socket, no clock and no event loop, so the fork, thread and
event-loop modes can all drive it.  The program that does the I/O (the *I/O layer*)
follows this contract:

1. Create ``ServerProtocol(config)``; the greeting is queued at once.
2. Send whatever `ServerProtocol.data_to_send` returns, whenever it is not empty.
3. Feed received bytes to `ServerProtocol.receive_data`; it returns a list of events.
4. Processing stops at the first `DecisionEvent`: `Helo`, `MailFrom`, `RcptTo`,
   `DataStart`, `MessageReady` or `AuthRequest`.  It is always the *last* event of
   the list and it is also `ServerProtocol.pending`.  Bytes that arrive meanwhile are
   only buffered.  The I/O layer runs its policy (which may take time: a DNS lookup,
   the spool's fsync before a 250), then calls `ServerProtocol.accept` (optionally
   with its own 2xx reply, e.g. ``replies.queued(queue_id)``) or
   `ServerProtocol.reject` with a 4xx/5xx reply.  A 421 closes the session.  A
   refused MAIL, RCPT or EHLO changes nothing else; a refused DATA/BDAT or message
   ends the transaction (as RSET would), so a pipelining client cannot carry on
   into a half-refused transaction.
5. Then it calls `ServerProtocol.resume`, which processes what was buffered and
   returns the next events, exactly like `receive_data`.

This is how PIPELINING (RFC 2920) stays correct: commands are handled strictly in the
order received, each gets exactly one reply, the replies are queued in that order,
and a command whose answer depends on the policy holds back every later command.
The I/O layer should stop reading from the socket while a decision is pending (the
buffer is not bounded then) and may send queued replies whenever it likes; RFC 2920
lets it wait until its input is drained.

Two events need no decision but stop processing too:

* `StartTLS`: the 220 is queued and the buffered plaintext after the STARTTLS line
  has been discarded (RFC 3207 4.2; the CVE-2011-0411 class of command injection).
  The I/O layer flushes the 220, performs the handshake and calls
  `ServerProtocol.tls_started`, which forgets everything learnt from the client
  (HELO name, transaction); the client must EHLO again, and STARTTLS is no longer
  offered.  Plaintext that `receive_data` gets before that is dropped.
* `Closed`: after QUIT (221) or a 421; send what is queued, then close.

States are the `State` enum.  `TRANSITIONS` is the one table of state changes, and
`ALLOWED` is the guard naming the states in which each command may be used; a
command outside them gets 503 (both in `states`; the events are in `events`, the
configuration in `config`).  The reader that cuts up the input is chosen by
state (commands, SASL responses, DATA body, BDAT chunk; see `readers`).
`ServerProtocol` is the SMTP dialogue; the state, buffers, queued replies and error
count it works through are its base, `core.ProtocolCore`.

Things that are the I/O layer's job, not this module's: prepending a Received header
to `MessageReady.data` (`received_protocol` gives the "with" keyword), counting
Received headers for loops, relay and authentication policy, timeouts (the
`ServerProtocol.read_timeout` hint says how long to wait, `ServerProtocol.close`
with `replies.timed_out` says goodbye).

Error accounting: every error reply caused by the client (syntax, sequence, unknown
command, bad line, bad message content, failed or cancelled AUTH) counts; when more
than ``max_errors`` have been counted the offending command is answered with 421 and
the session ends.  Policy rejections of MAIL/RCPT and the size and recipient limits
do not count: a policy that wants to end a session rejects with 421.  The one
exception is a client that goes on past ``max_recipients``: each such RCPT gets 452,
and past ``max_recipient_overshoot`` of them in one transaction each also counts as an
error (Postfix's smtpd_recipient_overshoot_limit), so the 452s are not without end.  Recipients
refused with a 5xx have a count of their own, ``max_refused_recipients`` per session:
past it the refusal becomes 421 and the session ends, so that one session cannot probe
addresses without end (a directory harvest; Postfix's smtpd_hard_error_limit counts
them among its errors).

Junk commands (NOOP, RSET, VRFY, HELP) are free up to ``max_junk_commands`` per
accepted message; past that each one also counts as an error, so a client that only
keeps its session alive, or probes addresses with RCPT and RSET, is closed at
``max_errors`` (Postfix's smtpd_junk_command_limit works the same way).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Final

from . import replies, sasl
from .addresses import parse_forward_path, parse_reverse_path, split_path
from .core import _TLS_SESSION, LocalProtocolError, ProtocolCore, _Item
from .events import (
    AcceptedRecipient,
    AuthRequest,
    DataStart,
    Event,
    Helo,
    MailFrom,
    MessageReady,
    RcptTo,
    StartTLS,
    Transaction,
)
from .parameters import mail_parameters, parse_parameters, rcpt_parameters
from .readers import (
    SASL_LINE_LIMIT,
    ChunkEnd,
    ChunkReader,
    CommandLine,
    CommandReader,
    DataError,
    DataReader,
    LineError,
    LineErrorKind,
    MessageEnd,
    MessageSink,
    apply_newline_policy,
    has_long_line,
)
from .replies import RemoteProtocolError, Reply
from .states import ALLOWED, State, Step, Verb

__all__ = ["ServerProtocol"]


_S = State
_VERBS: Final = {verb.value: verb for verb in Verb}
_HELLO: Final = frozenset({Verb.HELO, Verb.EHLO})
_IN_TRANSACTION: Final = frozenset({_S.MAIL, _S.RCPT, _S.CHUNKS})
# C0 controls, DEL and C1 controls; a command line has no use for any of them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
_PARAMS_NEED_EHLO = Reply(555, "5.5.4", "Parameters require EHLO")
_DATA_ERRORS: Final = {
    DataError.TOO_BIG: replies.MESSAGE_TOO_BIG,
    DataError.LINE_TOO_LONG: replies.DATA_LINE_TOO_LONG,
    DataError.BARE_NEWLINE: replies.BARE_NEWLINE_IN_DATA,
    DataError.NUL: replies.NUL_IN_DATA,
}


def _sequence_error(verb: Verb, state: State) -> Reply:
    """The 503 (or 554) for a command used outside its `ALLOWED` states."""
    if state is _S.REFUSED:
        return replies.bad_sequence("Service refused; only QUIT is accepted")
    if state is _S.CONNECTED:
        return replies.bad_sequence("Send HELO or EHLO first")
    if verb in (Verb.DATA, Verb.BDAT) and state is _S.MAIL:
        return _NO_RECIPIENTS  # RFC 5321 3.3 allows 554 "no valid recipients"
    if state is _S.CHUNKS:
        return replies.bad_sequence(f"{verb.value} not allowed during BDAT")
    if state in _IN_TRANSACTION:
        return replies.bad_sequence(f"{verb.value} not allowed during a mail transaction")
    return replies.bad_sequence(f"Send MAIL first; {verb.value} is out of sequence")


def _bdat_arguments(arg: str) -> tuple[int | None, bool, bool]:
    """Parse ``chunk-size [LAST]`` into (size or None, last, valid) (RFC 3030 2).

    The size is returned even when the rest is wrong, so the chunk can be skipped.
    """
    parts = arg.split(" ")
    size_text = parts[0]
    if not (size_text.isascii() and size_text.isdigit() and len(size_text) <= 20):
        return None, False, False
    size = int(size_text)
    if len(parts) == 1:
        return size, False, True
    valid = len(parts) == 2 and parts[1].upper() == "LAST"
    return size, valid, valid


@functools.lru_cache(maxsize=16)  # a few per server configuration: made once each
def _keywords(max_size: int, starttls: bool, auth: bool) -> tuple[str, ...]:
    """The EHLO keywords offered, in the order they are listed."""
    keywords = [
        f"SIZE {max_size}",
        "8BITMIME",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
        "DSN",
    ]
    if starttls:
        keywords.append("STARTTLS")
    if auth:
        keywords.append("AUTH " + " ".join(sasl.MECHANISMS))
    return tuple(keywords)


def _declares_smtputf8(param_text: str) -> bool:
    """True if SMTPUTF8 is among the MAIL parameters, which decides how to parse them."""
    return any(item.upper().partition("=")[0] == "SMTPUTF8" for item in param_text.split(" "))


# --- the protocol object -----------------------------------------------------------


class ServerProtocol(ProtocolCore):
    """One SMTP server session.  See the module docstring for the contract."""

    __slots__ = ()  # every slot is in ProtocolCore

    # --- public API (see also ProtocolCore) -------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the client; return the events they cause (see module doc)."""
        # Plaintext between STARTTLS and the handshake, and anything after the end,
        # is dropped unseen.
        if self._state not in (_S.TLS, _S.CLOSED):
            self._buffer += data
        return self.resume()

    def resume(self) -> list[Event]:
        """Process buffered input after a decision; same result as `receive_data`."""
        while self._pending is None:
            item = self._read()
            if item is None:
                break
            self._handle(item)
        events, self._events = self._events, None
        return [] if events is None else events

    def accept(self, reply: Reply | None = None) -> None:
        """Accept the pending decision, with the default reply or a given 2xx one."""
        if self._pending is not None and reply is not None:
            self._check_accept_reply(self._pending, reply)
        event = self._take_pending()
        match event:
            case Helo():
                self._accept_helo(event)
            case MailFrom():
                self._envelope = Transaction(event.sender, event.params)
                self._overshoot = 0
                self._step(Step.MAIL)
                self._send(reply or replies.MAIL_OK)
            case RcptTo():
                self._accept_rcpt(event, reply or replies.RCPT_OK)
            case DataStart():
                self._accept_data(event, reply or replies.START_DATA)
            case MessageReady():
                self._end_message()
                self._junk = 0  # a client doing real work may RSET between messages
                self._send(reply or replies.MESSAGE_ACCEPTED)
            case AuthRequest():
                self._session = replace(self._session, auth_user=event.username)
                self._end_auth()
                self._send(reply or replies.AUTH_OK)

    def reject(self, reply: Reply) -> None:
        """Refuse the pending decision with a 4xx/5xx reply; 421 ends the session."""
        if reply.code < 400:
            raise LocalProtocolError(f"reject() needs a 4xx or 5xx reply, not {reply.code}")
        event = self._take_pending()
        if isinstance(event, Helo):
            reply = reply.plain()
        match event:
            case DataStart():
                if event.chunking and self._chunk is not None:
                    self._commands.skip(self._chunk.remaining)
                self._reset_transaction()
            case MessageReady():
                self._end_message()
            case AuthRequest():
                self._end_auth()
                if not reply.closes:
                    self._fail(reply)  # failed logins count toward the error limit
                    return
            case RcptTo() if reply.code >= 500:
                reply = self._refused_recipient(reply)
            case _:
                pass
        if reply.closes:
            self._close(reply)
        else:
            self._send(reply)

    def _refused_recipient(self, reply: Reply) -> Reply:
        """`reply`, or the 421 that ends the session past max_refused_recipients."""
        self._refused += 1
        limit = self.config.max_refused_recipients
        if limit and self._refused > limit:
            return replies.too_many_errors(self.config.hostname)
        return reply

    def tls_started(self) -> None:
        """The handshake after STARTTLS succeeded: start over, as RFC 3207 4.2 says."""
        if self._state is not _S.TLS:
            raise LocalProtocolError("tls_started() without a STARTTLS in progress")
        self._session = _TLS_SESSION
        self._envelope = None
        self._buffer.clear()
        self._commands.reset()
        self._step(Step.TLS_UP)

    def _handle(self, item: _Item) -> None:
        match item:
            case CommandLine() if self._state is _S.AUTH:
                self._sasl_response(item.line)
            case CommandLine():
                self._command(item.line)
            case LineError():
                self._line_error(item)
            case MessageEnd():
                self._message_end(item)
            case ChunkEnd():
                self._chunk_end(item)

    def _line_error(self, error: LineError) -> None:
        if self._state is _S.AUTH:
            self._end_auth()
            if error.kind is LineErrorKind.TOO_LONG:
                self._fail(replies.AUTH_LINE_TOO_LONG)
                return
        if error.kind is LineErrorKind.TOO_LONG:
            self._fail(replies.LINE_TOO_LONG)
        else:
            self._fail(replies.BARE_NEWLINE_IN_COMMAND)

    # --- commands ----------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        """Decode, split and dispatch one command line, applying the `ALLOWED` guard."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(replies.BAD_UTF8)
            return
        if _CONTROL.search(text):
            self._fail(replies.CONTROL_CHARACTER)
            return
        word, _, arg = text.rstrip(" ").partition(" ")
        verb = _VERBS.get(word.upper())
        if verb is None:
            self._fail(replies.UNKNOWN_COMMAND)
            return
        if self._state not in ALLOWED[verb]:
            if verb is Verb.BDAT:
                self._skip_chunk(arg)  # the chunk follows regardless (RFC 3030 2)
            reply = _sequence_error(verb, self._state)
            self._fail(reply.plain() if verb in _HELLO else reply)
            return
        try:
            _HANDLERS[verb](self, arg.strip(" "))
        except RemoteProtocolError as exc:
            self._fail(exc.reply.plain() if verb in _HELLO else exc.reply)

    def _hello(self, arg: str, *, esmtp: bool) -> None:
        if not arg or " " in arg:
            raise RemoteProtocolError(
                replies.syntax_error(f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            )
        self._decide(Helo(arg, esmtp))

    def _helo(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def _ehlo(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def _accept_helo(self, event: Helo) -> None:
        self._session = replace(self._session, helo=event.name, esmtp=event.esmtp)
        self._reset_buffers()
        self._step(Step.HELLO)
        host = self.config.hostname
        if event.esmtp:
            self._send(replies.ehlo(host, event.name, self._extensions()))
        else:
            self._send(replies.helo(host, event.name))

    def _extensions(self) -> tuple[str, ...]:
        """The EHLO keywords for this session (STARTTLS and AUTH depend on it)."""
        return _keywords(
            self.config.max_message_size, self._starttls_offered(), self._auth_offered()
        )

    def _starttls_offered(self) -> bool:
        return self.config.tls_available and not self._session.tls

    def _auth_offered(self) -> bool:
        config = self.config
        return config.auth_enabled and (self._session.tls or config.auth_plaintext_allowed)

    def _mail(self, arg: str) -> None:
        if arg[:5].upper() != "FROM:":
            raise RemoteProtocolError(replies.syntax_error("Syntax: MAIL FROM:<address>"))
        # RFC 5321 has no space after the colon, but enough clients send one.
        path, param_text = split_path(arg[5:].lstrip(" "))
        raw = parse_parameters(param_text, utf8=_declares_smtputf8(param_text))
        if raw and not self._session.esmtp:
            raise RemoteProtocolError(_PARAMS_NEED_EHLO)
        params = mail_parameters(raw, allow_auth=self._auth_offered())
        sender = parse_reverse_path(path, utf8=params.smtputf8)
        if params.size is not None and params.size > self.config.max_message_size:
            self._send(replies.MESSAGE_TOO_BIG)  # a limit, not a client error
            return
        self._decide(MailFrom(sender, params))

    def _rcpt(self, arg: str) -> None:
        if arg[:3].upper() != "TO:":
            raise RemoteProtocolError(replies.syntax_error("Syntax: RCPT TO:<address>"))
        envelope = self._envelope
        utf8 = envelope is not None and envelope.params.smtputf8
        path, param_text = split_path(arg[3:].lstrip(" "))
        raw = parse_parameters(param_text, utf8=utf8)
        if raw and not self._session.esmtp:
            raise RemoteProtocolError(_PARAMS_NEED_EHLO)
        params = rcpt_parameters(raw, utf8=utf8)
        recipient = parse_forward_path(path, utf8=utf8)
        if envelope is not None and len(envelope.recipients) >= self.config.max_recipients:
            self._overshoot_reply()
            return
        self._decide(RcptTo(recipient, params))

    def _overshoot_reply(self) -> None:
        """452 to a RCPT past max_recipients (RFC 5321 4.5.3.1.10: the client sends the
        rest in a later transaction); past max_recipient_overshoot in one transaction each
        further one also counts as an error, so a client that never stops is closed at
        max_errors (Postfix's smtpd_recipient_overshoot_limit works the same way)."""
        self._overshoot += 1
        limit = self.config.max_recipient_overshoot
        if limit and self._overshoot > limit:
            self._fail(replies.TOO_MANY_RECIPIENTS)  # 421 once max_errors is passed
        else:
            self._send(replies.TOO_MANY_RECIPIENTS)

    def _accept_rcpt(self, event: RcptTo, reply: Reply) -> None:
        envelope = self._envelope
        if envelope is None:
            raise LocalProtocolError("RCPT accepted outside a transaction")
        recipient = AcceptedRecipient(event.recipient, event.params)
        self._envelope = replace(envelope, recipients=(*envelope.recipients, recipient))
        self._step(Step.RCPT)
        self._send(reply)

    def _data_command(self, arg: str) -> None:
        if arg:
            raise RemoteProtocolError(replies.syntax_error("Syntax: DATA"))
        self._decide(DataStart(chunking=False))

    def _bdat(self, arg: str) -> None:
        size, last, valid = _bdat_arguments(arg)
        if size is None or not valid:
            if size is not None:
                self._commands.skip(size)
            raise RemoteProtocolError(replies.syntax_error("Syntax: BDAT chunk-size [LAST]"))
        if self._state is _S.RCPT:
            self._sink = MessageSink(self.config.max_message_size)
            self._chunk = ChunkReader(self._sink, size, last)
            self._decide(DataStart(chunking=True))
            return
        if self._sink is None:
            raise LocalProtocolError("BDAT between chunks without a message")
        self._chunk = ChunkReader(self._sink, size, last)
        self._step(Step.CHUNK)

    def _skip_chunk(self, arg: str) -> None:
        size, _, _ = _bdat_arguments(arg)
        if size is not None:
            self._commands.skip(size)

    def _accept_data(self, event: DataStart, reply: Reply) -> None:
        if event.chunking:
            self._step(Step.CHUNK)
            return  # a BDAT chunk is answered once it has been read
        self._data = DataReader(self.config.bare_newline, self.config.max_message_size)
        self._step(Step.DATA)
        self._send(reply)

    def _message_end(self, end: MessageEnd) -> None:
        self._data = None
        if end.error is None:
            self._message_ready(end.data)
        else:
            self._message_failed(end.error)

    def _chunk_end(self, end: ChunkEnd) -> None:
        sink = self._sink
        if sink is None:
            raise LocalProtocolError("BDAT chunk without a message")
        if sink.error is not None:
            self._message_failed(sink.error)  # RFC 3030: later chunks get 503 until RSET
        elif not end.last:
            self._step(Step.CHUNK_DONE)
            self._send(replies.chunk_received(end.size))
        else:
            data = apply_newline_policy(sink.getvalue(), self.config.bare_newline)
            self._sink = None
            if data is None:
                self._message_failed(DataError.BARE_NEWLINE)
            elif has_long_line(data):
                # BINARYMIME is not offered, so BDAT carries text: the limit DATA has.
                self._message_failed(DataError.LINE_TOO_LONG)
            else:
                self._message_ready(data)

    def _message_ready(self, data: bytes) -> None:
        envelope = self._envelope
        if envelope is None or not envelope.recipients:
            raise LocalProtocolError("a message without recipients")
        self._decide(MessageReady(envelope, self._session, data))

    def _message_failed(self, error: DataError) -> None:
        self._end_message()
        reply = _DATA_ERRORS[error]
        if error is DataError.TOO_BIG:
            self._send(reply)  # a limit, not a client error
        else:
            self._fail(reply)

    def _end_message(self) -> None:
        self._reset_buffers()
        self._step(Step.END)

    def _reset_buffers(self) -> None:
        self._envelope = None
        self._data = self._chunk = self._sink = None

    def _reset_transaction(self) -> None:
        self._reset_buffers()
        self._step(Step.RESET)

    def _rset(self, arg: str) -> None:
        if arg:
            raise RemoteProtocolError(replies.syntax_error("Syntax: RSET"))
        self._reset_transaction()
        self._junk_reply(replies.RESET_OK)

    def _noop(self, arg: str) -> None:
        self._junk_reply(replies.OK)  # NOOP may carry a string, which is ignored

    def _junk_reply(self, reply: Reply) -> None:
        """Answer a junk command; past max_junk_commands it also counts as an error."""
        self._junk += 1
        limit = self.config.max_junk_commands
        if limit and self._junk > limit:
            self._fail(reply)  # the usual answer, or 421 once max_errors is passed
        else:
            self._send(reply)

    def _quit(self, arg: str) -> None:
        if arg:
            raise RemoteProtocolError(replies.syntax_error("Syntax: QUIT"))
        self._close(replies.closing(self.config.hostname))

    def _vrfy(self, arg: str) -> None:
        if not arg:
            raise RemoteProtocolError(replies.syntax_error("Syntax: VRFY address"))
        self._junk_reply(replies.VRFY_CANNOT)  # RFC 5321 3.5.3: 252, without disclosing

    def _expn(self, arg: str) -> None:
        # Mailing list expansion gives addresses away (RFC 5321 7.3); not offered.
        self._fail(replies.EXPN_DISABLED)

    def _help(self, arg: str) -> None:
        self._junk_reply(replies.help_commands(self._starttls_offered(), self._auth_offered()))

    def _starttls(self, arg: str) -> None:
        if arg:
            raise RemoteProtocolError(replies.syntax_error("Syntax: STARTTLS"))
        if not self.config.tls_available:
            raise RemoteProtocolError(replies.not_implemented("STARTTLS not available"))
        if self._session.tls:
            raise RemoteProtocolError(replies.bad_sequence("TLS already active"))
        if not self._session.esmtp:
            raise RemoteProtocolError(replies.bad_sequence("Send EHLO first"))
        self._send(replies.READY_FOR_TLS)
        # Whatever followed STARTTLS in the same read was sent in plaintext and must not
        # be executed as if it came over TLS (RFC 3207 4.2).
        discarded = len(self._buffer)
        self._buffer.clear()
        self._commands.reset()
        self._step(Step.STARTTLS)
        self._emit(StartTLS(discarded))

    # --- AUTH --------------------------------------------------------------------

    def _auth(self, arg: str) -> None:
        if not self._session.esmtp:
            raise RemoteProtocolError(replies.bad_sequence("Send EHLO first"))
        if not self.config.auth_enabled:
            raise RemoteProtocolError(replies.not_implemented("AUTH not available"))
        if not self._auth_offered():
            raise RemoteProtocolError(replies.AUTH_ENCRYPTION_REQUIRED)
        if self._session.auth_user is not None:
            raise RemoteProtocolError(replies.ALREADY_AUTHENTICATED)
        parts = arg.split(" ")
        if not arg or len(parts) > 2:
            raise RemoteProtocolError(
                replies.syntax_error("Syntax: AUTH mechanism [initial-response]")
            )
        mechanism = sasl.start(parts[0])
        if mechanism is None:
            raise RemoteProtocolError(replies.AUTH_UNKNOWN_MECHANISM)
        initial = None
        if len(parts) == 2:
            initial = b"" if parts[1] == "=" else sasl.decode_response(parts[1])
        step = mechanism.begin(initial)
        self._mechanism = mechanism
        self._sasl_lines = CommandReader(self.config.bare_newline, SASL_LINE_LIMIT)
        self._step(Step.AUTH)
        self._sasl_step(step)

    def _sasl_step(self, step: sasl.Challenge | sasl.Credentials) -> None:
        if isinstance(step, sasl.Challenge):
            self._send(replies.challenge(step.text))
        else:
            self._decide(AuthRequest(step.mechanism, step.authzid, step.username, step.password))

    def _sasl_response(self, line: bytes) -> None:
        """One client line during the exchange: base64, or ``*`` to cancel."""
        mechanism = self._mechanism
        text = line.decode("latin-1").strip(" ")
        if mechanism is None or text == "*":
            self._end_auth()
            self._fail(replies.AUTH_CANCELLED)
            return
        try:
            step = mechanism.respond(sasl.decode_response(text))
        except RemoteProtocolError as exc:
            self._end_auth()
            self._fail(exc.reply)
            return
        self._sasl_step(step)

    def _end_auth(self) -> None:
        self._mechanism = None
        self._sasl_lines = None
        self._step(Step.AUTH_DONE)


_HANDLERS: Final[dict[Verb, Callable[[ServerProtocol, str], None]]] = {
    Verb.HELO: ServerProtocol._helo,
    Verb.EHLO: ServerProtocol._ehlo,
    Verb.MAIL: ServerProtocol._mail,
    Verb.RCPT: ServerProtocol._rcpt,
    Verb.DATA: ServerProtocol._data_command,
    Verb.BDAT: ServerProtocol._bdat,
    Verb.RSET: ServerProtocol._rset,
    Verb.NOOP: ServerProtocol._noop,
    Verb.QUIT: ServerProtocol._quit,
    Verb.VRFY: ServerProtocol._vrfy,
    Verb.EXPN: ServerProtocol._expn,
    Verb.HELP: ServerProtocol._help,
    Verb.STARTTLS: ServerProtocol._starttls,
    Verb.AUTH: ServerProtocol._auth,
}
