"""netserver.smtp: a sans-I/O ESMTP server protocol core.

`ServerProtocol` (the engine, `protocol`) turns received bytes into `events` and queues
reply bytes; it does no I/O itself (see `netserver.smtp.protocol` for the contract). Its
`ServerConfig` is in `config`, its states and transition tables in `states`, the
session's machinery under the dialogue in `core`, the input readers in `readers`.
Paths are parsed by `addresses`, their parameters by `parameters`, replies are `Reply`
values from `netserver.smtp.replies`.

The client role is here too, sans I/O as well: `replyreader` reads a server's replies
incrementally and bounded, `client.ClientProtocol` pairs them with the commands sent and
keeps the pipelining and STARTTLS rules, and `mailexchange.MailExchange` decides the
commands of one mail transaction. They are imported from their modules, not from this
package, so a server process never loads them. The names here are imported on first
use (`netserver.lazy`): a program that needs only `addresses` or `replies` does not
load the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import exports

if TYPE_CHECKING:
    from .addresses import Mailbox
    from .config import ServerConfig
    from .core import LocalProtocolError
    from .events import (
        AcceptedRecipient,
        AuthRequest,
        Closed,
        DataStart,
        DecisionEvent,
        Event,
        Helo,
        MailFrom,
        MessageReady,
        RcptTo,
        Session,
        StartTLS,
        Transaction,
        received_protocol,
    )
    from .parameters import (
        Body,
        MailParameters,
        Notify,
        OriginalRecipient,
        RcptParameters,
        Ret,
        xtext_decode,
        xtext_encode,
    )
    from .protocol import ServerProtocol
    from .readers import BareNewline
    from .replies import RemoteProtocolError, Reply
    from .states import State

__all__ = [
    "AcceptedRecipient",
    "AuthRequest",
    "BareNewline",
    "Body",
    "Closed",
    "DataStart",
    "DecisionEvent",
    "Event",
    "Helo",
    "LocalProtocolError",
    "MailFrom",
    "MailParameters",
    "Mailbox",
    "MessageReady",
    "Notify",
    "OriginalRecipient",
    "RcptParameters",
    "RcptTo",
    "RemoteProtocolError",
    "Reply",
    "Ret",
    "ServerConfig",
    "ServerProtocol",
    "Session",
    "StartTLS",
    "State",
    "Transaction",
    "received_protocol",
    "xtext_decode",
    "xtext_encode",
]

# Each public name's home module, for `__getattr__` (the same as the imports above).
_HOMES: dict[str, str] = {
    "Mailbox": ".addresses",
    "ServerConfig": ".config",
    "LocalProtocolError": ".core",
    "AcceptedRecipient": ".events",
    "AuthRequest": ".events",
    "Closed": ".events",
    "DataStart": ".events",
    "DecisionEvent": ".events",
    "Event": ".events",
    "Helo": ".events",
    "MailFrom": ".events",
    "MessageReady": ".events",
    "RcptTo": ".events",
    "Session": ".events",
    "StartTLS": ".events",
    "Transaction": ".events",
    "received_protocol": ".events",
    "Body": ".parameters",
    "MailParameters": ".parameters",
    "Notify": ".parameters",
    "OriginalRecipient": ".parameters",
    "RcptParameters": ".parameters",
    "Ret": ".parameters",
    "xtext_decode": ".parameters",
    "xtext_encode": ".parameters",
    "ServerProtocol": ".protocol",
    "BareNewline": ".readers",
    "RemoteProtocolError": ".replies",
    "Reply": ".replies",
    "State": ".states",
}

__getattr__ = exports(__name__, _HOMES, globals())
