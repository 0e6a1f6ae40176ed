"""An address field cut into parts that the email package parses in linear time.

CPython's header parser (`email._header_value_parser`) copies the rest of the value
for each token it takes, and splits the rest again for each RFC 2047 encoded word, so
one field costs time that grows with the square of its length. Measured on the bench
VM, a 100 KB To: costs 0.7 s of CPU when made of encoded words and 11 s when made of
``a.a.a.``, while any part of 2,048 characters or less costs at most ~10 µs a
character. A field longer than `PART_SIZE` is therefore cut at its list commas into
parts of at most `PART_SIZE` characters, each parsed on its own: the work is then
linear in the header's size.

A comma is cut at only when the parser is sure to see it as the end of an address
(RFC 5322 3.4 address-list): outside quoted strings, comments, domain literals, angle
brackets (obs-route has commas), encoded words (CPython reads ``=?..?=`` as one token
even with specials inside) and groups (a group's members belong to it). Where the
scan is unsure it does not cut, which is always safe: fewer cuts only make a part
longer. An address (or a whole group) longer than `PART_SIZE` is not parsed at all;
the caller reports it. Postfix bounds the same cost with ``header_address_token_limit``
and drops the tokens past it; leafmail never changes a message, so it reports instead.
"""

from __future__ import annotations

import re

# The longest part handed to the parser, in characters of the unfolded value. No
# mailbox needs this much: a path is at most 256 octets (RFC 5321 4.5.3.1.3) and a
# display name a few encoded words of at most 75 (RFC 2047 2).
PART_SIZE = 2048

_SPECIAL = re.compile(r'[\\"()<>\[\],:;]|=\?')
# What CPython takes as one encoded word where an atom starts: up to the first "?=".
_ENCODED_WORD = re.compile(r"=\?[^\s?]*\?[^\s?]*\?\S*?\?=")


def address_parts(value: str, size: int = PART_SIZE) -> list[str] | None:
    """`value` as address lists to parse one by one, each at most `size` characters:
    ``[value]`` itself when it is that short; None when one address is longer."""
    if len(value) <= size:
        return [value]
    parts: list[str] = []
    start = 0
    for cut in (*_list_commas(value), len(value)):
        if cut - start > size:
            return None
        if parts and len(parts[-1]) + 1 + (cut - start) <= size:
            parts[-1] += "," + value[start:cut]
        else:
            parts.append(value[start:cut])
        start = cut + 1
    return parts


def _list_commas(value: str) -> list[int]:
    """Where the commas between the addresses of `value` are (see the module doc)."""
    commas = []
    quote = literal = angle = group = False
    depth = 0  # of nested comments
    at = 0
    while (found := _SPECIAL.search(value, at)) is not None:
        char, at = found.group(), found.end()
        if char == "\\":
            at += 1 if quote or depth or literal else 0  # a quoted pair
        elif quote:
            quote = char != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(char, 0)
        elif literal:
            literal = char != "]"
        elif char == "=?":
            word = _ENCODED_WORD.match(value, found.start())
            at = word.end() if word else at
        elif char in '"([':
            quote, depth, literal = char == '"', int(char == "("), char == "["
        elif char in "<>":
            angle = char == "<"
        elif angle:
            continue  # obs-route: "<@a,@b:user@c>"
        elif char == ":":
            group = True
        elif char == ";":
            group = False
        elif char == "," and not group:
            commas.append(found.start())
    return commas
