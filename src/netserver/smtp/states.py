"""The engine's states, the commands it knows, and the two tables that drive it.

`TRANSITIONS` is the one table of state changes: (state, step) -> next state; a step
missing from it is a bug in the engine, never a client error. `ALLOWED` is the guard:
the states in which each command may be used; a command outside them gets 503. The
third table, the dispatch from `Verb` to its handler, lives with the handlers in
`netserver.smtp.protocol`.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

__all__ = ["ALLOWED", "TRANSITIONS", "State", "Step", "Verb"]


class _Token(Enum):
    """An enum hashed by identity: its members are looked up in the tables below a few
    dozen times a message, and `Enum.__hash__` is a Python call that hashes the name.
    Members are singletons compared by identity, so the identity hash is consistent."""

    __hash__ = object.__hash__


class State(_Token):
    """Where the session is.  Each state has its reader (see `ServerProtocol._read`)."""

    REFUSED = "refused"  # greeted with 554: only QUIT is accepted (RFC 5321 3.1)
    CONNECTED = "connected"  # greeted, no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # sender accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading a DATA body
    BDAT = "bdat"  # reading a BDAT chunk
    CHUNKS = "chunks"  # between the chunks of a BDAT transaction
    AUTH = "auth"  # a SASL exchange, or its verdict, is under way
    TLS = "tls"  # 220 to STARTTLS queued; waiting for the handshake
    CLOSED = "closed"


class Verb(_Token):
    """The commands this server knows."""

    HELO = "HELO"
    EHLO = "EHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    VRFY = "VRFY"
    EXPN = "EXPN"
    HELP = "HELP"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"


class Step(_Token):
    """What makes the state change; the keys of `TRANSITIONS` with the state."""

    HELLO = "hello"  # HELO/EHLO accepted (also resets a transaction)
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # RCPT accepted
    DATA = "data"  # DATA accepted: 354
    CHUNK = "chunk"  # a BDAT chunk is to be read
    CHUNK_DONE = "chunk done"  # a BDAT chunk other than the last was read
    END = "end"  # the message was decided, or failed
    RESET = "reset"  # RSET, or a refused DATA/BDAT ending the transaction
    AUTH = "auth"  # AUTH begins an exchange
    AUTH_DONE = "auth done"  # the exchange ended, whatever its outcome
    STARTTLS = "starttls"  # 220 to STARTTLS
    TLS_UP = "tls up"  # handshake done
    CLOSE = "close"  # QUIT or 421


_S = State
_COMMAND_STATES: Final = frozenset({_S.CONNECTED, _S.READY, _S.MAIL, _S.RCPT, _S.CHUNKS})

TRANSITIONS: Final[dict[tuple[State, Step], State]] = {
    **{(state, Step.HELLO): _S.READY for state in _COMMAND_STATES},
    (_S.READY, Step.MAIL): _S.MAIL,
    (_S.MAIL, Step.RCPT): _S.RCPT,
    (_S.RCPT, Step.RCPT): _S.RCPT,
    (_S.RCPT, Step.DATA): _S.DATA,
    (_S.RCPT, Step.CHUNK): _S.BDAT,
    (_S.CHUNKS, Step.CHUNK): _S.BDAT,
    (_S.BDAT, Step.CHUNK_DONE): _S.CHUNKS,
    (_S.DATA, Step.END): _S.READY,
    (_S.BDAT, Step.END): _S.READY,
    (_S.CONNECTED, Step.RESET): _S.CONNECTED,
    (_S.READY, Step.RESET): _S.READY,
    (_S.MAIL, Step.RESET): _S.READY,
    (_S.RCPT, Step.RESET): _S.READY,
    (_S.CHUNKS, Step.RESET): _S.READY,
    (_S.READY, Step.AUTH): _S.AUTH,
    (_S.AUTH, Step.AUTH_DONE): _S.READY,
    (_S.READY, Step.STARTTLS): _S.TLS,
    (_S.TLS, Step.TLS_UP): _S.CONNECTED,
    **{(state, Step.CLOSE): _S.CLOSED for state in State if state is not _S.CLOSED},
}

_ANY_TIME: Final = _COMMAND_STATES  # RFC 5321 4.1.4: NOOP, HELP, VRFY, RSET any time
ALLOWED: Final[dict[Verb, frozenset[State]]] = {
    Verb.HELO: _COMMAND_STATES,
    Verb.EHLO: _COMMAND_STATES,
    Verb.MAIL: frozenset({_S.READY}),
    Verb.RCPT: frozenset({_S.MAIL, _S.RCPT}),
    Verb.DATA: frozenset({_S.RCPT}),
    Verb.BDAT: frozenset({_S.RCPT, _S.CHUNKS}),
    Verb.RSET: _ANY_TIME,
    Verb.NOOP: _ANY_TIME,
    Verb.VRFY: _ANY_TIME,
    Verb.EXPN: _ANY_TIME,
    Verb.HELP: _ANY_TIME,
    Verb.QUIT: _COMMAND_STATES | {_S.REFUSED},
    Verb.STARTTLS: frozenset({_S.READY}),
    Verb.AUTH: frozenset({_S.READY}),
}
