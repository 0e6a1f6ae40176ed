"""The server's log: one line per connection, as text or JSON.

A line carries the peer, mode, duration, bytes each way and how the connection ended,
which is what an operator greps for; refusals and server events get lines of their own.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
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
    # Confirmed host names for TCPREMOTEHOST / TCPLOCALHOST, when known (see tcpnames).
    remote_host: str | None = None
    local_host: str | None = None


class ServerLog:
    """Writes log lines to a stream (stderr by default); ``json=True`` for JSON lines."""

    def __init__(self, stream: TextIO | None = None, *, json_lines: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.json_lines = json_lines

    def _emit(self, event: str, fields: dict[str, object]) -> None:
        if self.json_lines:
            line = json.dumps({"event": event, **fields}, separators=(",", ":"))
        else:
            parts = [f"{key}={_text(value)}" for key, value in fields.items()]
            line = f"netserver: {event} " + " ".join(parts)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def connection(self, record: ConnRecord) -> None:
        """The line written when a connection ends."""
        self._emit(
            "conn",
            {
                "peer": str(record.peer),
                "local": str(record.local),
                "mode": record.mode,
                "duration": round(time.monotonic() - record.started, 6),
                "in": record.bytes_in,
                "out": record.bytes_out,
                "status": record.status,
            },
        )

    def refused(self, peer: Endpoint, reason: str) -> None:
        """A client turned away before any handler ran."""
        self._emit("refused", {"peer": str(peer), "reason": reason})

    def info(self, message: str, **fields: object) -> None:
        """A server event (start, stop, reload)."""
        self._emit("info", {"msg": message, **fields})

    def error(self, message: str, **fields: object) -> None:
        """Something went wrong in the server itself."""
        self._emit("error", {"msg": message, **fields})


def _text(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text
