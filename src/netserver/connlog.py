"""The server's log: one line per connection, as text or JSON.

A line carries the peer, mode, duration, bytes each way and how the connection ended,
which is what an operator greps for; refusals and server events get lines of their own.

Text lines are ``PROGRAM: EVENT key=value ...`` (the program is "netserver" unless the
application names itself, as leafmail does), with no time stamp: journald and syslog add
their own, as they do for Postfix. JSON lines carry a ``time`` in RFC 3339 (UTC, in
milliseconds), because they usually go to a file or a collector that does not.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from .endpoint import Endpoint


@dataclass(slots=True)
class ConnRecord:
    """The facts about one connection, filled in as it goes."""

    peer: Endpoint
    local: Endpoint
    mode: str
    started: float = field(default_factory=time.monotonic)
    bytes_in: int | None = None
    bytes_out: int | None = None
    status: str = "ok"
    # Confirmed host names for TCPREMOTEHOST / TCPLOCALHOST, when known (see tcpd.envnames).
    remote_host: str | None = None
    local_host: str | None = None


class ServerLog:
    """Writes log lines to a stream (stderr by default); ``json_lines=True`` for JSON.

    `program` starts each text line and is the ``program`` of each JSON line.
    ``connections=False`` (``netserver serve --quiet``, ``run --quiet``, a service's
    ``quiet``) drops the line of each connection that was served, as tcpserver without
    ``-v`` prints nothing per connection: in an exec spawner that line was a quarter of the
    Python run per connection (bench/RESULTS.md).
    Refusals, errors and server events are still written: they are rare, and an operator
    needs them.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        json_lines: bool = False,
        program: str = "netserver",
        connections: bool = True,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.json_lines = json_lines
        self.program = program
        self.connections = connections

    def without_connections(self) -> ServerLog:
        """The same log (stream, format, program) without the line per connection: a
        ``netserver run`` service with ``quiet = true`` gets it."""
        return ServerLog(
            self.stream, json_lines=self.json_lines, program=self.program, connections=False
        )

    def _emit(self, event: str, fields: dict[str, object]) -> None:
        if self.json_lines:
            head = {"time": rfc3339(time.time()), "program": self.program, "event": event}
            line = json.dumps({**head, **fields}, separators=(",", ":"))
        else:
            parts = [f"{key}={_text(value)}" for key, value in fields.items()]
            line = f"{self.program}: {event} " + " ".join(parts)
        self._write(line)

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def connection(self, record: ConnRecord) -> None:
        """The line written when a connection ends (none when `connections` is off)."""
        if not self.connections:
            return
        duration = round(time.monotonic() - record.started, 6)
        if not self.json_lines:  # the line `_emit` writes, without its dict and loop
            self._write(
                f"{self.program}: conn peer={_end(record.peer)} local={_end(record.local)} "
                f"mode={_text(record.mode)} duration={duration} in={_count(record.bytes_in)} "
                f"out={_count(record.bytes_out)} status={_text(record.status)}"
            )
            return
        self._emit(
            "conn",
            {
                "peer": str(record.peer),
                "local": str(record.local),
                "mode": record.mode,
                "duration": duration,
                "in": record.bytes_in,
                "out": record.bytes_out,
                "status": record.status,
            },
        )

    def refused(self, peer: Endpoint, reason: str) -> None:
        """A client turned away before any handler ran."""
        self._emit("refused", {"peer": str(peer), "reason": reason})

    def event(self, name: str, **fields: object) -> None:
        """An event with a line format of its own (``delivery qid=... result=...``),
        for what an operator greps for by name rather than by message text."""
        self._emit(name, fields)

    def info(self, message: str, **fields: object) -> None:
        """A server event (start, stop, reload)."""
        self._emit("info", {"msg": message, **fields})

    def error(self, message: str, **fields: object) -> None:
        """Something went wrong in the server itself."""
        self._emit("error", {"msg": message, **fields})


def rfc3339(when: float) -> str:
    """A Unix time as RFC 3339 in UTC with milliseconds: 2026-12-06T19:00:19.123Z."""
    stamp = datetime.fromtimestamp(when, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


_QUOTE = re.compile(r'[ "=\\]')  # a value holding one of these is written quoted


def _end(end: Endpoint) -> str:
    """An endpoint as `_text` writes it. An IP one needs no quotes (digits, dots, colons,
    brackets) unless it has an IPv6 zone ("%" and then any text at all), so only a
    unix path or a zoned address goes through the check."""
    text = str(end)
    return text if end.ip is not None and "%" not in text else _text(text)


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _text(value: object) -> str:
    if value is None:
        return "-"
    if type(value) is int or type(value) is float:
        return str(value)  # digits, a sign, a dot, an exponent, inf, nan: never quoted
    text = str(value)
    if not text or _QUOTE.search(text) or not text.isprintable():
        return json.dumps(text)
    return text
