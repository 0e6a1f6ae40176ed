"""The server side of SASL PLAIN (RFC 4616) and LOGIN, as AUTH (RFC 4954) uses them.

Only the message exchange lives here: base64 decoding, the 334 challenges, and
turning the client's responses into `Credentials`.  Checking a password is the I/O
layer's business (it gets an ``AuthRequest`` event and answers accept or reject), so
this module never sees a user database and never compares secrets.

Base64 is decoded strictly (`base64.b64decode` with ``validate=True``): a response
with stray characters is an error (501 5.5.2), not something to guess at.  The
initial response ``=`` means "empty" (RFC 4954 4); a response line ``*`` cancels the
exchange (501); both are handled by the protocol before a response reaches here.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from .replies import AUTH_BAD_BASE64, RemoteProtocolError, syntax_error

__all__ = [
    "MECHANISMS",
    "Challenge",
    "Credentials",
    "Login",
    "Mechanism",
    "Plain",
    "decode_response",
    "start",
]

MECHANISMS = ("PLAIN", "LOGIN")


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 <text>`` and wait for a response line; ``text`` is already base64."""

    text: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client presented; the password is kept out of reprs and logs."""

    mechanism: str
    authzid: str
    username: str
    password: str = field(repr=False)


def decode_response(text: str) -> bytes:
    """Strict base64 decoding of a response; 501 5.5.2 if it is not base64."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise RemoteProtocolError(AUTH_BAD_BASE64) from None


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(syntax_error("Credentials are not UTF-8")) from None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("ascii")).decode("ascii")


class Plain:
    """PLAIN: one message, ``[authzid] NUL authcid NUL passwd`` (RFC 4616 2)."""

    name = "PLAIN"
    __slots__ = ()

    def begin(self, initial: bytes | None) -> Challenge | Credentials:
        # Without an initial response the server sends an empty challenge.
        return Challenge("") if initial is None else self.respond(initial)

    def respond(self, response: bytes) -> Challenge | Credentials:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise RemoteProtocolError(syntax_error("Malformed PLAIN response"))
        authzid, username, password = (_utf8(part) for part in parts)
        return Credentials(self.name, authzid, username, password)


class Login:
    """LOGIN: ask for the user name, then the password, each base64 encoded.

    Not an IETF standard, but what many clients (and Outlook) still offer first.
    """

    name = "LOGIN"
    __slots__ = ("_username",)

    def __init__(self) -> None:
        self._username: str | None = None

    def begin(self, initial: bytes | None) -> Challenge | Credentials:
        if initial is None:
            return Challenge(_b64("Username:"))
        return self.respond(initial)

    def respond(self, response: bytes) -> Challenge | Credentials:
        text = _utf8(response)
        if "\0" in text:
            raise RemoteProtocolError(syntax_error("NUL in LOGIN response"))
        if self._username is None:
            if not text:
                raise RemoteProtocolError(syntax_error("Empty user name"))
            self._username = text
            return Challenge(_b64("Password:"))
        return Credentials(self.name, "", self._username, text)


Mechanism = Plain | Login


def start(name: str) -> Mechanism | None:
    """A fresh exchange for the mechanism ``name`` (any case), None if not offered."""
    upper = name.upper()
    if upper == "PLAIN":
        return Plain()
    if upper == "LOGIN":
        return Login()
    return None
