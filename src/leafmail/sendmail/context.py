"""What every sendmail mode needs: its config sections, and the local user who is submitting."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from ..config import SubmitConfig


@dataclass(frozen=True)
class Submitter:
    """The local user that runs this command, as the Received and From headers name it."""

    login: str
    uid: int
    gecos: str

    @classmethod
    def current(cls) -> Submitter:
        """From the password database by real uid, which the user cannot forge as they
        could $USER; $LOGNAME only for a uid with no entry (as in some containers)."""
        return cls.for_uid(os.getuid(), os.environ.get("LOGNAME"))

    @classmethod
    def for_uid(cls, uid: int, login_fallback: str | None = None) -> Submitter:
        """The user `uid` from the password database; without an entry (a container's
        uid), `login_fallback` or "uidN". The daemon passes no fallback: a submitter's
        environment is not evidence (leafmail.pickup)."""
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return cls(login_fallback or f"uid{uid}", uid, "")
        return cls(entry.pw_name, uid, entry.pw_gecos)

    def full_name(self, given: str | None) -> str:
        """-F, else $NAME, else the first GECOS field with BSD's "&" for the login."""
        if given is not None:
            return given
        if os.environ.get("NAME"):
            return os.environ["NAME"]
        return self.gecos.split(",", 1)[0].replace("&", self.login.capitalize())


@dataclass(frozen=True)
class Context:
    """What every mode needs: the submission sections (`Config.submit`), and who is
    submitting. The daemon's pickup socket builds one per request from the same sections."""

    config: SubmitConfig
    identity: Submitter
    # No config file and no LEAFMAIL_SPOOL: the spool is the XDG default nobody chose,
    # so mail is queued there only while a daemon serves it (`choose_submitter`).
    unconfigured: bool = False

    @property
    def hostname(self) -> str:
        return self.config.hostname

    @property
    def origin(self) -> str:
        """The domain bare names get: [sendmail] origin, else the hostname (myorigin)."""
        return self.config.sendmail.origin or self.config.hostname

    @property
    def masquerade_domains(self) -> tuple[str, ...]:
        return self.config.sendmail.masquerade_domains
