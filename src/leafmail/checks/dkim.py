"""DKIM with dkimpy (RFC 6376): every signature verified, the message never rewritten.

Each signature (at most `MAX_SIGNATURES`) gets an RFC 8601 result: pass; fail when
it could be checked and does not verify (a bad signature, a body hash mismatch);
permerror when it cannot be checked (malformed tags, no key, an unusable key);
temperror when the key lookup failed for now; "none" for an unsigned message. In
"reject" mode mail whose signatures failed, with none passing, is refused with 550
5.7.20 (RFC 7372); a signature nobody can check proves as little as none at all.

dkimpy is blocking: `verify_dkim` runs in a check pool worker process within its
budget (`leafmail.checks.pool`; in a thread when no pool is given), and fetches keys
through a ``dnsfunc`` over a synchronous dnspython resolver built from ``[dns]``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.util
import dns.exception
import dns.resolver

from netserver.smtp.replies import Reply

from . import Defer, Reject
from .headers import RawField, parse_header

DKIM_FAIL = Reply(550, "5.7.20", "No passing DKIM signature found")
DKIM_TEMPERROR = Reply(451, "4.4.3", "DKIM key lookup failed, try again later")
MAX_SIGNATURES = 5  # verify at most this many DKIM signatures per message (CPU, DNS)


# dkimpy logs every bad signature at ERROR: a sender could fill our log with them.
_DKIMPY_LOG = logging.getLogger("leafmail.checks.dkimpy")
_DKIMPY_LOG.addHandler(logging.NullHandler())
_DKIMPY_LOG.propagate = False


class _KeyLookupFailed(Exception):
    """The DNS could not say whether a DKIM key exists: a temporary error.

    Deliberately not a DKIMException, so dkimpy lets it through instead of turning
    it into a plain "signature does not verify".
    """


@dataclass
class _KeyLookup:
    """dkimpy's dnsfunc over our resolver; remembers what it found.

    dkimpy answers False both for a signature that does not verify and for a key it
    cannot use; the record kept here tells the two apart (`key_unusable`).
    """

    resolver: dns.resolver.Resolver
    name: bytes = b""
    record: bytes | None = None

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.name = name
        try:
            answer = self.resolver.resolve(name.decode("ascii"), "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.DNSException, UnicodeDecodeError) as exc:
            raise _KeyLookupFailed(str(exc)) from None
        for rdata in answer:
            self.record = b"".join(rdata.strings)
            return self.record
        return None

    @property
    def key_unusable(self) -> bool:
        """True when there was no key, or one dkimpy cannot parse."""
        if self.record is None:
            return True
        try:
            dkim.evaluate_pk(self.name, self.record)
        except Exception:  # KeyFormatError and friends
            return True
        return False


def verify_dkim(data: bytes, resolver: dns.resolver.Resolver, timeout: float) -> list[str]:
    """The RFC 8601 result of each DKIM signature (blocking: never on the event loop)."""
    signatures = parse_header(data).named("dkim-signature")
    if not signatures:
        return ["dkim=none"]
    try:
        verifier = dkim.DKIM(data, logger=_DKIMPY_LOG, timeout=timeout)
    except Exception:  # a message dkimpy cannot even parse
        return ["dkim=permerror"]
    return [
        _verify_one(verifier, index, field, resolver)
        for index, field in enumerate(signatures[:MAX_SIGNATURES])
    ]


def _verify_one(verifier: Any, index: int, field: RawField, resolver: dns.resolver.Resolver) -> str:
    """One signature's result. Only a signature that could be checked and did not
    verify (a bad signature, a body hash mismatch) is a fail; one that cannot be
    checked (malformed tags, no key, an unusable key) is a permerror."""
    keys = _KeyLookup(resolver)
    try:
        verifier.verify_headerprep(index)  # the tags alone, no DNS
    except Exception:  # malformed signature tags (or a dkimpy bug)
        return f"dkim=permerror{_signature_props(field)}"
    try:
        ok = bool(verifier.verify(index, dnsfunc=keys))
        result = "pass" if ok else "permerror" if keys.key_unusable else "fail"
    except _KeyLookupFailed:
        result = "temperror"
    except dkim.ValidationError:  # now only a body hash mismatch
        result = "fail"
    except Exception:  # an unusable key, or a dkimpy bug
        result = "permerror"
    return f"dkim={result}{_signature_props(field)}"


def _signature_props(field: RawField) -> str:
    """ " header.d=D header.s=S" from the signature's tags, as far as they parse."""
    try:
        tags = dkim.util.parse_tag_value(field.value.encode("utf-8"))
    except Exception:  # a signature too broken to name its domain
        return ""
    props = ""
    for tag, prop in ((b"d", "header.d"), (b"s", "header.s")):
        value = tags.get(tag)
        if isinstance(value, bytes) and re.fullmatch(rb"[A-Za-z0-9._-]+", value):
            props += f" {prop}={value.decode('ascii')}"
    return props


def dkim_refusal(mode: str, results: list[str]) -> Reject | Defer | None:
    """In "reject" mode: refuse mail whose signatures failed and none passed.

    A signature that cannot be checked at all (permerror: no key, unknown algorithm)
    proves as little as no signature, and unsigned mail is not refused either.
    """
    words = {r.split()[0] for r in results}
    if mode != "reject" or "dkim=pass" in words:
        return None
    if "dkim=temperror" in words:
        return Defer(DKIM_TEMPERROR)
    if "dkim=fail" in words:
        return Reject(DKIM_FAIL)
    return None
