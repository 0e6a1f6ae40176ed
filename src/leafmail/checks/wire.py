"""The check pool's wire format: length-prefixed JSON and raw bytes over a pipe.

A request is a JSON object (the job's name and its plain arguments) and the message's
octets; a reply is a JSON object. Each part is a 4-octet big-endian length and the
part. Nothing that can run code when decoded (no pickle) crosses the pipe.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

_LENGTH = struct.Struct(">I")
MAX_PART = 1 << 30


def frame(*parts: bytes) -> bytes:
    """The parts, each with its length in front."""
    return b"".join(_LENGTH.pack(len(part)) + part for part in parts)


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def decode(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("a check pool message must be a JSON object")
    return value


def read_part(stream: BinaryIO) -> bytes | None:
    """One part from a blocking stream (the worker's stdin); None at end of input."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_PART:
        raise ValueError("check pool part too large")
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def length_of(head: bytes) -> int:
    (size,) = _LENGTH.unpack(head)
    if size > MAX_PART:
        raise ValueError("check pool part too large")
    return int(size)


LENGTH_SIZE = _LENGTH.size
