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
package, so a server process never loads them.
"""

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
