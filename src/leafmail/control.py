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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from netserver.connlog import ServerLog

from .envelope import EnvelopeError, load_json

REQUEST_LIMIT = 4096
REQUEST_TIMEOUT = 10.0

Respond = Callable[[dict[str, Any]], None]
ControlHandler = Callable[[str, Respond], Awaitable[None]]


class ControlServer:
    """Serves control requests on a Unix socket for as long as the daemon runs."""

    def __init__(self, path: Path, handler: ControlHandler, log: ServerLog) -> None:
        self.path = path
        self.handler = handler
        self.log = log
        self._listener = UnixListener(path)

    async def start(self) -> bool:
        """Listen; False (logged) if another daemon owns the socket or the path is unusable."""
        return await self._listener.open(
            self._client, limit=REQUEST_LIMIT, log=self.log, what="control socket"
        )

    async def close(self) -> None:
        await self._listener.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def reply(obj: dict[str, Any]) -> None:
            if writer.is_closing():  # the client went away; the work goes on regardless
                return
            writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                line = await reader.readline()
            command = _command(line)
            if command is None:
                reply({"error": 'bad request: expected {"command": "flush"|"wake"}'})
            else:
                await self.handler(command, reply)
            await writer.drain()
        except (TimeoutError, ValueError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


Client = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class UnixListener:
    """A Unix stream socket of the daemon's at a path in the spool, and its removal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def open(
        self, client: Client, *, limit: int, log: ServerLog, what: str, mode: int = 0o600
    ) -> bool:
        """Listen with this mode; False (logged) if another daemon answers there or the
        path is unusable. A stale socket left by a crash is replaced.

        The socket is created 0600 (umask) and only then opened up to `mode`, so it is
        never reachable by others before it is meant to be.
        """
        path = self.path
        if path.exists() or path.is_symlink():
            if answers(path):
                log.info(f"another leafmail runs on this spool; no {what}", path=str(path))
                return False
            with contextlib.suppress(OSError):
                path.unlink()
        old_umask = os.umask(0o177)
        try:
            with socket_name(path) as name:
                self._server = await asyncio.start_unix_server(client, name, limit=limit)
                if mode != 0o600:
                    os.chmod(name, mode)
        except OSError as exc:
            log.info(f"cannot create the {what}", path=str(path), error=str(exc))
            return False
        finally:
            os.umask(old_umask)
        return True

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._server = None


def _command(line: bytes) -> str | None:
    try:
        request = load_json(line, "request")
    except EnvelopeError:
        return None
    command = request.get("command") if isinstance(request, dict) else None
    return command if command in ("flush", "wake") else None


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
