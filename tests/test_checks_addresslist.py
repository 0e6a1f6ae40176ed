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
from email import _encoded_words as encoded_words  # type: ignore[attr-defined]
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
    # Encoded-word look-alikes with specials inside: CPython takes the first two as
    # words only where a token begins, the others never (they do not decode).
    '=?utf-8?q?"?=',
    "=?utf-8?q?,?=",
    '=?a?="x?q?y?=',
    '=?utf-8?q?="x?=',
    "=?a?=:b@c?q?y?=",
    '"=?utf-8?q?a"@b.test,x?="',
    "b@=?utf-8?q?a?=",
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


# --- encoded words: read as CPython reads them -----------------------------------------

PAD = ", ".join(f"user{i}@example.org" for i in range(150))


def test_a_look_alike_word_that_does_not_decode_hides_no_quote() -> None:
    """'=?a?=' does not decode, so CPython reads the '"' after it as a quoted string
    holding the comma; a scan that took it for an encoded word saw no quotes, then an
    unclosed one, and gave a valid field's check a problem."""
    value = '=?a?="x?q?y?=, z" <a@b.example>, ' + PAD
    assert len(value) > PART_SIZE
    assert not REGISTRY("To", value).defects
    assert read_addresses(RawField("To", f"To: {value}".encode()), utf8=False) == (151, True)
    parts = address_parts(value)
    assert parts is not None and parts[0].startswith('=?a?="x?q?y?=, z" <a@b.example>')


def test_a_cut_inside_a_quoted_string_does_not_pass_an_invalid_field() -> None:
    """An encoded word inside quotes (a defect of its own) that hides the closing '"':
    a scan that ended the quotes there cut inside them into two parts each valid."""
    lead = ", ".join(f"user{i}@example.org" for i in range(80))
    tail = ", ".join(f"other{i}@example.org" for i in range(40))
    trick = '"=?utf-8?q?a"@b.example,x?=" <c@d.example>, '
    value = f'{lead}, {trick}{tail}, last" <z@y.example>'
    assert len(value) > PART_SIZE
    assert REGISTRY("To", value).defects  # invalid as a whole
    assert read_addresses(RawField("To", f"To: {value}".encode()), utf8=False) == (
        whole_reading(value, False)[0],
        False,
    )


def test_no_cut_right_after_an_encoded_word() -> None:
    """CPython finds an encoded word followed by a comma invalid ("missing trailing
    whitespace"); a part that ended with the word hid that (found by a fuzzer)."""
    word = "b@=?utf-8?q?a?="
    lead = "x" * (PART_SIZE - len(word) - len("@y.test, ") - 4) + "@y.test, " + word
    value = f"{lead},x@y.test, {PAD}"  # the comma after the word ends the first part
    assert PART_SIZE - 8 < len(lead) <= PART_SIZE
    assert REGISTRY("To", value).defects
    reading = read_addresses(RawField("To", f"To: {value}".encode()), utf8=False)
    assert reading == (153, False)


def test_an_encoded_word_with_a_comma_is_one_token() -> None:
    value = "=?utf-8?q?Doe,_J?= <j@example.test>, " + PAD
    parts = address_parts(value)
    assert parts is not None and parts[0].startswith("=?utf-8?q?Doe,_J?= <j@example.test>,")
    assert read_addresses(RawField("To", f"To: {value}".encode()), utf8=False) == (151, True)


LOOK_ALIKES = {
    "opens": "=?a?q?x " * 12_000 + "?=",
    "marks": "=?a?q?" * 15_000 + "x?=",
    "escapes": "=?a?=41 " * 12_000,
    "words": "=?utf-8?q?a,b?= " * 6_000 + ", x@example.test",
    "quoted": '"' + "=?utf-8?q?a?= " * 6_000 + '"',
}


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_encoded_words_are_decoded_in_linear_time(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every "=?" of a field may start a word: the text decoded in all stays within a
    small multiple of the field's length (it was never decoded more than once a
    stretch between two "?=")."""
    decoded: list[int] = []
    real = encoded_words.decode

    def counting(word: str) -> Any:
        decoded.append(len(word))
        return real(word)

    monkeypatch.setattr(encoded_words, "decode", counting)
    value = LOOK_ALIKES[name]
    address_parts(value)
    assert sum(decoded) <= 2 * len(value) + 4 * len(decoded)
