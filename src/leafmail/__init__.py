"""leafmail: a durable store-and-forward mail spooler built on netserver."""

from .envelope import ClientInfo, Envelope, Recipient
from .spool import CorruptMessage, GroupCommitter, Spool, SpooledMessage

__all__ = [
    "ClientInfo",
    "CorruptMessage",
    "Envelope",
    "GroupCommitter",
    "Recipient",
    "Spool",
    "SpooledMessage",
]
