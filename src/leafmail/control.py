"""The daemon's control socket: how `leafmail flush` makes a running daemon deliver now.

A Unix stream socket in the spool directory (`Spool.control_path`), so only the spool's
owner can reach it (the spool is mode 0700). The protocol is one JSON request line and
JSON reply lines:

    -> {"command": "flush"}
    <- {"total": 12}
    <- {"qid": "...", "verdict": "delivered", "error": ""}     (one per message)
    <- {"done": true, "deferred": 0, "counts": {...}, "link_error": ""}

    -> {"command": "wake"}          (new mail was spooled by another process)
    <- {"done": true}

Errors are a line {"error": "..."}. Nothing from the socket is ever run or evaluated.

This module is the client side, plain blocking sockets, which `leafmail flush`, the
queue tools and `leafmail sendmail` use; the daemon's side (asyncio) is
`leafmail.controlserver`, so that a command run once a message does not load asyncio.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def socket_name(path: Path) -> Iterator[str]:
    """A name for `path` that fits in a Unix socket address (at most 107 bytes).

    A deep spool directory makes a longer path; then the socket is reached through a
    descriptor of its directory, /proc/self/fd/N/control, which is short and resolves
    to the same place for bind(2) and connect(2).
    """
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _connect(sock: socket.socket, path: Path) -> None:
    with socket_name(path) as name:
        sock.connect(name)


def answers(path: Path) -> bool:
    """True if a live daemon listens on `path` (a stale socket refuses the connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            _connect(sock, path)
        except OSError:
            return False
    return True


def request(
    path: Path, command: str, on_line: Callable[[dict[str, Any]], None]
) -> dict[str, Any] | None:
    """Send `command` to the daemon and pass each reply line to `on_line`.

    Returns the final line ({"done": ...} or {"error": ...}), or None when no daemon
    listens (then the caller does the work itself). A flush can take as long as the
    queue takes, so there is no overall timeout: the runner's deadlines bound it.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        try:
            _connect(sock, path)
        except OSError:  # no daemon (or an unusable path): the caller works alone
            return None
        sock.settimeout(None)
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for raw in lines:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    continue
                if "qid" in obj or "total" in obj:
                    on_line(obj)
                else:
                    return obj  # {"done": ...} or {"error": ...}
    finally:
        sock.close()
    return {"error": "the daemon closed the control connection early"}


def wake(path: Path) -> None:
    """Tell a running daemon that mail is waiting, so it delivers at once.

    No daemon, or one that answers oddly, is fine: its next queue scan finds the mail.
    """
    with contextlib.suppress(OSError, ValueError):
        request(path, "wake", lambda _line: None)
