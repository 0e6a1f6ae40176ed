"""The daemon's side of its control socket (`leafmail.control` has the protocol and the
client): `ControlServer` answers flush and wake requests, `UnixListener` is a Unix
stream socket of the daemon's in the spool (the submission socket uses it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from netserver.connlog import ServerLog

from .control import answers, socket_name
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
