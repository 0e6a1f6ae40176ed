"""RFC 5322 compliance, at end of data: is this a well-formed Internet message?

What is checked, and why each matters:

* exactly one From and one Date (RFC 5322 3.6), at most one of the other singleton
  fields: a second From is how a forged author hides behind a signed one;
* the address fields (From, Sender, Reply-To, To, Cc, Bcc) parse strictly, with
  `email.headerregistry` (obsolete syntax is accepted, as section 4 requires of
  readers; outright invalid syntax is not), From names at least one mailbox and a
  From with several mailboxes comes with a Sender; a long field is parsed in parts
  cut between addresses, and an address too long to parse in linear time is a
  problem of its own (leafmail.checks.addresslist);
* no line longer than 998 octets (2.1.1): the DATA reader already refuses longer
  lines, but a BDAT chunk has no line structure, so they can still arrive that way;
* no bare CR or LF, and no NUL (2.3): the SMTP readers refuse or replace bare ones
  (smtp.bare_lf), so this only fires for what got past them;
* no 8-bit octets unless the client declared them: BODY=8BITMIME (RFC 6152) for the
  body, SMTPUTF8 (RFC 6531/6532) for the header, which also covers the body.

Trusted clients (relay_networks, authenticated) are not checked: their mail comes
from our own programs and users, whose messages we deliver rather than judge.
"""

from __future__ import annotations

import email.utils
from email.errors import InvalidHeaderDefect, NonASCIILocalPartDefect
from email.headerregistry import AddressHeader, HeaderRegistry

from netserver.admit.access import AccessPolicy
from netserver.smtp.parameters import Body, MailParameters
from netserver.smtp.readers import has_bare_newline
from netserver.smtp.replies import Reply

from ..trace import MAX_LINE, header_section
from . import (
    ACCEPT,
    AsyncCheck,
    Check,
    CheckContext,
    Verdict,
    ascii_line,
    header_field,
    is_trusted,
    tag_or_reject,
)
from .addresslist import PART_SIZE, address_parts
from .headers import Header, RawField, parse_header
from .jobs import JobRunner, over_budget

TAG_FIELD = "X-Leafmail-RFC5322"
REQUIRED = ("from", "date")
SINGLETONS = (
    "from",
    "date",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "message-id",
    "in-reply-to",
    "references",
    "subject",
)
ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")
_REGISTRY = HeaderRegistry()


def rfc5322_check(mode: str, relay_networks: AccessPolicy) -> Check:
    """The end-of-data check for mode "tag" or "reject" ("off" installs nothing)."""

    def check(session: CheckContext) -> Verdict:
        if is_trusted(session, relay_networks):
            return ACCEPT
        return _verdict(mode, problems(session.data, session.params))

    return check


def rfc5322_pool_check(mode: str, relay_networks: AccessPolicy, pool: JobRunner) -> AsyncCheck:
    """`rfc5322_check` run in the check pool, within its CPU and time budget."""

    async def check(session: CheckContext) -> Verdict:
        if is_trusted(session, relay_networks):
            return ACCEPT
        params = session.params
        args = {
            "body": params.body.value if params and params.body else None,
            "smtputf8": bool(params and params.smtputf8),
        }
        answer = await pool.run("rfc5322", args, session.data)
        if answer is None:
            return over_budget(mode, TAG_FIELD)
        return _verdict(mode, [str(p) for p in answer["problems"]])

    return check


def _verdict(mode: str, found: list[str]) -> Verdict:
    if not found:
        return ACCEPT
    reasons = "; ".join(found)
    reply = Reply(550, "5.6.0", ascii_line(f"Message does not conform to RFC 5322: {reasons}"))
    return tag_or_reject(mode, header_field(TAG_FIELD, f"fail ({reasons})"), reply)


def problems(data: bytes, params: MailParameters | None = None) -> list[str]:
    """Every way `data` breaks the rules above, as short reasons; empty if none."""
    header = parse_header(data)
    utf8 = params is not None and params.smtputf8
    return [
        *count_problems(header),
        *syntax_problems(header, utf8=utf8),
        *line_problems(data, header),
        *eight_bit_problems(data, params),
    ]


def count_problems(header: Header) -> list[str]:
    """Missing required fields and repeated singletons (RFC 5322 3.6)."""
    found = []
    for key in SINGLETONS:
        count = len(header.named(key))
        if count == 0 and key in REQUIRED:
            found.append(f"no {_title(key)} field")
        elif count > 1:
            found.append(f"{count} {_title(key)} fields")
    return found


def syntax_problems(header: Header, *, utf8: bool) -> list[str]:
    """Address fields that do not parse, and a Date that is not a date."""
    found = []
    for field in header.fields:
        if field.key in ADDRESS_FIELDS:
            problem = address_problem(field, utf8=utf8)
            found.extend([problem] if problem else [])
        elif field.key == "date" and not date_ok(field.value):
            found.append("bad Date syntax")
    if header.malformed:
        found.append("malformed header line")
    froms = header.named("from")
    if len(froms) == 1 and _mailbox_count(froms[0], utf8=utf8) > 1 and not header.named("sender"):
        found.append("several From mailboxes without Sender")
    return found


def address_problem(field: RawField, *, utf8: bool) -> str | None:
    """What is wrong with an address field, or None: bad syntax, From/Sender without
    their mailboxes, or an address too long to parse (see `addresslist`)."""
    reading = read_addresses(field, utf8=utf8)
    if reading is None:
        return f"{_title(field.key)} address over {PART_SIZE} characters"
    count, valid = reading
    if field.key == "from":
        valid = valid and count >= 1
    elif field.key == "sender":
        valid = valid and count == 1
    return None if valid else f"bad {_title(field.key)} syntax"


def read_addresses(field: RawField, *, utf8: bool) -> tuple[int, bool] | None:
    """How many addresses the field holds and whether its syntax is valid, parsed in
    bounded parts; None when an address is too long to parse."""
    parts = address_parts(field.value)
    if parts is None:
        return None
    count, valid = 0, "\ufffd" not in field.value
    for part in parts:
        part_count, part_valid = _read_part(field.name, part, utf8=utf8)
        count, valid = count + part_count, valid and part_valid
    return count, valid


def _read_part(name: str, value: str, *, utf8: bool) -> tuple[int, bool]:
    try:
        parsed = _REGISTRY(name, value)
    except MemoryError:
        raise  # over the worker's memory budget: a temporary answer, not bad syntax
    except Exception:  # the email package may raise on odd input
        return 0, False
    if not isinstance(parsed, AddressHeader):
        return 0, False
    invalid = (
        isinstance(defect, InvalidHeaderDefect)
        # RFC 6532: UTF-8 local parts are fine under SMTPUTF8
        or (isinstance(defect, NonASCIILocalPartDefect) and not utf8)
        for defect in parsed.defects
    )
    return len(parsed.addresses), not any(invalid)


def date_ok(value: str) -> bool:
    """True when `value` is a date-time RFC 5322 3.3 (or its obsolete forms) allows."""
    try:
        email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return False
    return True


def line_problems(data: bytes, header: Header) -> list[str]:
    """Over-long lines, bare CR or LF, NUL octets."""
    found = []
    if max(map(len, data.split(b"\r\n")), default=0) > MAX_LINE:
        found.append(f"line longer than {MAX_LINE} octets")
    if has_bare_newline(data):
        found.append("bare CR or LF")
    if b"\0" in data:
        found.append("NUL octet")
    return found


def eight_bit_problems(data: bytes, params: MailParameters | None) -> list[str]:
    """8-bit octets the client did not announce with BODY=8BITMIME or SMTPUTF8."""
    if data.isascii():
        return []
    smtputf8 = params is not None and params.smtputf8
    eight_bit_mime = params is not None and params.body is Body.EIGHTBITMIME
    head = header_section(data)
    found = []
    if not head.isascii() and not smtputf8:
        found.append("8-bit header without SMTPUTF8")
    if not data[len(head) :].isascii() and not (eight_bit_mime or smtputf8):
        found.append("8-bit data without BODY=8BITMIME")
    return found


def _mailbox_count(field: RawField, *, utf8: bool) -> int:
    reading = read_addresses(field, utf8=utf8)
    return reading[0] if reading else 0


def _title(key: str) -> str:
    """ "reply-to" -> "Reply-To", "message-id" -> "Message-ID"."""
    return "-".join("ID" if part == "id" else part.capitalize() for part in key.split("-"))
