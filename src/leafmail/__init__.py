"""leafmail: a durable store-and-forward mail spooler built on netserver.

The Python API (README, "Python API"): `submit` a message into a spool (and wake the
daemon running on it), `list_queue`, `unfreeze` a queued message and `send` it through a
delivery agent such as `smarthost(...)`. The spool types are here for programs that work
on the spool directly.
"""

from .api import list_queue, smarthost, submit
from .delivery import Agent, Outcome, Result
from .envelope import ClientInfo, Envelope, Recipient
from .listing import QueueEntry
from .message import Message, UnknownMessage, unfreeze
from .spool import CorruptMessage, GroupCommitter, Spool, SpooledMessage

__all__ = [
    "Agent",
    "ClientInfo",
    "CorruptMessage",
    "Envelope",
    "GroupCommitter",
    "Message",
    "Outcome",
    "QueueEntry",
    "Recipient",
    "Result",
    "Spool",
    "SpooledMessage",
    "UnknownMessage",
    "list_queue",
    "smarthost",
    "submit",
    "unfreeze",
]
