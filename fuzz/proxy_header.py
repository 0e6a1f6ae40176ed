"""Fuzz the PROXY protocol v1/v2 header parser (`netserver.listen.proxy`).

Checked: `header_length` and `parse` raise nothing but `ProxyError`; a prefix of a
header never gets a different length than the whole (the reader peeks and re-asks as
bytes arrive); a parsed header reports its own length, and a v1 address never carries
a zone or anything but what inet_ntop writes.
"""

from __future__ import annotations

import atheris
from common import run

with atheris.instrument_imports():
    from netserver.listen.proxy import ProxyError, header_length, parse


def one_input(data: bytes) -> None:
    try:
        length = header_length(data)
    except ProxyError:
        return
    if length == 0:
        return
    for k in range(1, min(length, len(data))):
        try:
            assert header_length(data[:k]) in (0, length), f"prefix {k} of {length}"
        except ProxyError as exc:
            raise AssertionError(f"prefix {k} refused, the whole accepted: {exc}") from None
    if length > len(data):
        return
    try:
        info = parse(data[:length])
    except ProxyError:
        return
    assert info.length == length
    for end in (info.source, info.dest):
        if end is not None:
            text = str(end.ip)
            assert text.isascii() and "%" not in text and text.isprintable(), text
            assert end.port is None or 0 <= end.port <= 65535


if __name__ == "__main__":
    run(one_input)
