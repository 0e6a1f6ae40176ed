"""The errors of `leafmail sendmail` that are its own: each carries its sysexits status."""

from __future__ import annotations

from netserver.errors import EX_DATAERR, EX_TEMPFAIL, NetserverError


class BadInput(NetserverError):
    """The message or an address is malformed (EX_DATAERR)."""

    exit_code = EX_DATAERR


class TryLater(NetserverError):
    """The spool could not take the message now (EX_TEMPFAIL); its text says if a copy
    stayed queued all the same (`leafmail.spool.Spool.take_back`)."""

    exit_code = EX_TEMPFAIL
