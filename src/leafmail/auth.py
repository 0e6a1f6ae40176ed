"""SMTP AUTH credentials: a users file of salted scrypt hashes, never plaintext.

Each line is ``USER:scrypt$N$r$p$SALT$HASH`` (SALT and HASH base64); blank lines and
``#`` comments are ignored. ``leafmail passwd USER`` prints such a line. Verification
costs the same for unknown users as for known ones, so response time does not reveal
which accounts exist; callers run it in a thread because scrypt is deliberately slow.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from netserver.errors import ConfigError

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The stored form of a password."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    b64 = base64.b64encode
    return f"{SCHEME}${N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


@functools.cache
def _dummy() -> str:
    """A hash to check unknown users against, so they cost as much as known ones."""
    return hash_password("", salt=bytes(16))


def _check(stored: str, password: str) -> bool:
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != SCHEME:
        return False
    want = base64.b64decode(digest)
    got = hashlib.scrypt(
        password.encode(),
        salt=base64.b64decode(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=len(want) or 32,
        maxmem=256 * 1024 * 1024,
    )
    return hmac.compare_digest(got, want)


@dataclass(frozen=True)
class Users:
    """The accounts allowed to authenticate."""

    hashes: dict[str, str]

    def verify(self, user: str, password: str) -> bool:
        """True when `password` is right for `user`; the same work when the user is unknown."""
        stored = self.hashes.get(user)
        ok = _check(stored or _dummy(), password)
        return ok and stored is not None


def load_users(path: str | os.PathLike[str]) -> Users:
    """Read a users file; ConfigError names the file and line of any bad entry."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read users file: {exc.strerror}") from None
    hashes: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        fields = stored.split("$")
        if not sep or not user or len(fields) != 6 or fields[0] != SCHEME:
            raise ConfigError(f"{path}:{lineno}: expected USER:scrypt$N$r$p$SALT$HASH")
        if not all(f.isdigit() for f in fields[1:4]):
            raise ConfigError(f"{path}:{lineno}: bad scrypt parameters")
        hashes[user] = stored
    return Users(hashes)
