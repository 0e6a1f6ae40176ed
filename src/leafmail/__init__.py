"""leafmail: a durable store-and-forward mail spooler built on netserver.

The Python API (README, "Python API"): `submit` a message into a spool (and wake the
daemon running on it), `list_queue`, `unfreeze` a queued message and `send` it through a
delivery agent such as `smarthost(...)`. The spool types are here for programs that work
on the spool directly.

The names are imported on first use (PEP 562), not with the package: every `leafmail`
command imports this package first, and `leafmail sendmail` (run by cron or git
send-email once per message) must not pay for the delivery agents at each start. Type
checkers read the imports under TYPE_CHECKING, which are the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from netserver.lazy import exports

if TYPE_CHECKING:
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

# Each public name's home module, for `__getattr__` (the same as the imports above).
_HOMES: dict[str, str] = {
    "list_queue": ".api",
    "smarthost": ".api",
    "submit": ".api",
    "Agent": ".delivery",
    "Outcome": ".delivery",
    "Result": ".delivery",
    "ClientInfo": ".envelope",
    "Envelope": ".envelope",
    "Recipient": ".envelope",
    "QueueEntry": ".listing",
    "Message": ".message",
    "UnknownMessage": ".message",
    "unfreeze": ".message",
    "CorruptMessage": ".spool",
    "GroupCommitter": ".spool",
    "Spool": ".spool",
    "SpooledMessage": ".spool",
}


__getattr__ = exports(__name__, _HOMES, globals())
