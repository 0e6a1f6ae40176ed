"""netserver.smtp: a sans-I/O ESMTP server protocol core.

`ServerProtocol` turns received bytes into events and queues reply bytes; it does no
I/O itself (see `netserver.smtp.protocol` for the contract).  Addresses and parameters
are parsed by `netserver.smtp.addresses`, replies are `Reply` values from
`netserver.smtp.replies`.
"""

from .addresses import (
    Body,
    Mailbox,
    MailParameters,
    Notify,
    OriginalRecipient,
    RcptParameters,
    Ret,
    xtext_decode,
    xtext_encode,
)
from .protocol import (
    AcceptedRecipient,
    AuthRequest,
    Closed,
    DataStart,
    DecisionEvent,
    Event,
    Helo,
    LocalProtocolError,
    MailFrom,
    MessageReady,
    RcptTo,
    ServerConfig,
    ServerProtocol,
    Session,
    StartTLS,
    State,
    Transaction,
    received_protocol,
)
from .readers import BareNewline
from .replies import RemoteProtocolError, Reply

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
