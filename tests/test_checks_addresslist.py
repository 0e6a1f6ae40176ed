"""Address fields parsed in bounded parts (leafmail.checks.addresslist, issue 12.6).

The cost: a hostile 100 KB To: (the default max_header_size) is answered without the
parser seeing more than `PART_SIZE` characters at a time, counted by wrapping the
header registry the check uses. The verdicts: cutting a long field into parts gives
the whole field's verdict (validity, and the address count of a valid field),
checked by hypothesis on fields made of the tokens that change how commas are read,
with part sizes so small that most commas are cuts.
"""

from __future__ import annotations

from collections.abc import Iterator
from email.headerregistry import HeaderRegistry
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_checks_rfc5322 import GOOD_HEADER, RELAY, session

from leafmail.checks import Reject, Tag
from leafmail.checks import rfc5322 as rfc5322_module
from leafmail.checks.addresslist import PART_SIZE, address_parts
from leafmail.checks.headers import RawField
from leafmail.checks.rfc5322 import TAG_FIELD, problems, read_addresses, rfc5322_check

HEADER_LIMIT = 102400  # the default smtp.max_header_size


def folded(tokens: list[str], limit: int = HEADER_LIMIT) -> bytes:
    """A To: field of `tokens` folded at 70 octets, as long as fits in `limit`."""
    lines, line, size = [], "", 0
    for token in tokens:
        if line and len(line) + len(token) > 70:
            lines.append(line)
            size += len(line) + 3
            line = ""
        if size + len(line) + len(token) > limit - 2000:
            break
        line += (" " if line else "") + token
    return ("To: " + "\r\n ".join([*lines, line]) + "\r\n").encode()


def message(to: bytes) -> bytes:
    return to + GOOD_HEADER.replace(b"To: Bob <bob@example.test>\r\n", b"") + b"\r\nhi\r\n"


# Fields that took seconds before: one display name of 7,000 encoded words (0.7 s),
# "a.a.a." (11 s), "<><>" (10 s) and a quoted string of encoded words (1.2 s).
HOSTILE = {
    "encoded words": folded(["=?utf-8?q?a?="] * 10_000 + ["<v@mx.test>"]),
    "dots": folded(["a." * 30] * 2000 + ["a <v@mx.test>"]),
    "angles": folded(["<>" * 30] * 2000),
    "quoted": folded(['"=?utf-8?q?a?='] * 10_000 + ['" <v@mx.test>']),
}
MANY = folded(["Carol Example <carol@example.test>,"] * 5000 + ["d@example.test"])


class CountingRegistry:
    """The header registry, recording the length of every value it parses."""

    def __init__(self) -> None:
        self.registry = HeaderRegistry()
        self.lengths: list[int] = []

    def __call__(self, name: str, value: str) -> Any:
        self.lengths.append(len(value))
        return self.registry(name, value)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingRegistry]:
    counting = CountingRegistry()
    monkeypatch.setattr(rfc5322_module, "_REGISTRY", counting)
    yield counting


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_one_huge_address_is_reported_unparsed(name: str, registry: CountingRegistry) -> None:
    data = message(HOSTILE[name])
    assert len(data) > 90_000
    assert problems(data) == [f"To address over {PART_SIZE} characters"]
    assert max(registry.lengths) < 100  # only From was parsed, never the To:
    verdict = rfc5322_check("reject", RELAY)(session(data))
    assert isinstance(verdict, Reject)
    assert (verdict.reply.code, verdict.reply.enhanced) == (550, "5.6.0")
    reason = f"To address over {PART_SIZE} characters"
    assert verdict.reply.text == f"Message does not conform to RFC 5322: {reason}"
    tagged = rfc5322_check("tag", RELAY)(session(data))
    assert tagged == Tag((f"{TAG_FIELD}: fail ({reason})\r\n".encode(),))


def test_a_long_list_is_parsed_in_parts_of_bounded_length(registry: CountingRegistry) -> None:
    data = message(MANY)
    assert len(data) > 90_000
    assert problems(data) == []
    to_parts = [n for n in registry.lengths if n > 100]
    assert max(to_parts) <= PART_SIZE
    # Every character of the field is parsed once: linear work, not quadratic.
    assert len(MANY) - 4000 < sum(to_parts) <= len(MANY)
    field = RawField("To", MANY[:-2])
    assert read_addresses(field, utf8=False) == (MANY.count(b"@"), True)


def test_short_fields_are_parsed_whole() -> None:
    value = "a@example.test, b@example.test"
    assert address_parts(value, size=len(value)) == [value]


# --- cutting never changes the verdict ------------------------------------------------

TOKENS = [
    "a@example.test",
    "Bob <b@example.test>",
    '"Doe, J" <j@example.test>',
    "x@example.test (a, comment)",
    "(nested (c,) x)",
    "<@r1,@r2:u@example.test>",
    "u@[1.2.3.4,5]",
    "=?utf-8?q?Doe,_J?= <e@example.test>",
    "=?utf-8?q?a?=",
    "g: a@example.test, b@example.test;",
    "g:;",
    ":",
    ";",
    ",",
    '"',
    "(",
    ")",
    "<",
    ">",
    "[",
    "]",
    "\\",
    '\\"',
    "\\,",
    "=?",
    "?=",
    "@",
    ".",
    "  ",
    "bob",
    "j\u00f6rg@example.test",
]
REGISTRY = HeaderRegistry()


def whole_reading(value: str, utf8: bool) -> tuple[int, bool]:
    """The verdict the check gave before parts: the whole field parsed at once."""
    return read_addresses(RawField("To", f"To: {value}".encode()), utf8=utf8) or (-1, False)


ELEMENTS = st.lists(st.sampled_from(TOKENS), max_size=3).map(" ".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(ELEMENTS, max_size=8), st.booleans(), st.integers(8, 120))
def test_parts_give_the_whole_fields_verdict(elements: list[str], utf8: bool, size: int) -> None:
    value = ",".join(elements).strip()
    parts = address_parts(value, size)
    if parts is None:
        return
    assert "".join(parts).replace(",", "") == value.replace(",", "")  # nothing lost
    assert all(len(part) <= size for part in parts)
    count, valid = 0, True
    for part in parts:
        part_count, part_valid = whole_reading(part, utf8)
        count, valid = count + part_count, valid and part_valid
    try:
        REGISTRY("To", value)
    except Exception:
        # A bug of CPython's parser ("g:; ,g:;" raises AttributeError): the check reads
        # it as bad syntax, where parts may parse; not a verdict worth keeping.
        assume(False)
    whole_count, whole_valid = whole_reading(value, utf8)
    assert valid == whole_valid, parts
    if valid:  # what an invalid field counts is never used alone
        assert count == whole_count, parts
