"""Local delivery as a root-side service the unprivileged queue manager asks.

Local delivery switches to each recipient's uid before it opens a mailbox, so it needs
root; nothing else does. As Postfix's qmgr hands local recipients to its `local` (which
runs as root and becomes the user per delivery), the queue manager keeps the whole
queue (its locks, statuses and retries) and sends only the local recipients of a
message to this service, one Unix connection per delivery; the answer is one result
per recipient. One owner of the queue state means two processes never deliver the same
message at once, and every spool file is written by the daemon's user (forwarded copies
the service spools as root are given to the spool's owner, see `Spool.owner`).

The service listens on an abstract Unix socket the parent made before forking, and
serves only the daemon's own user (SO_PEERCRED). A request is a 4-byte length, the JSON
``{"envelope": ..., "rcpts": [...], "known": {index: {target: result}}}`` and then a
4-byte length and the message. The expansion record (`delivery.Expansions`: which alias
targets already got the message) stays with the queue manager, which owns the status:
``known`` carries the final results it holds, and the service sends back one JSON line
per change (``expanding``, ``record``) and per forwarded copy (``forward``, then the
copy's bytes; the queue manager spools it and answers ``{"qid": ...}``), then the last
line ``{"results": {index: [outcome, code, status, text, remote]}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from netserver.connlog import ServerLog
from netserver.modes.workers import WorkerApp

from .config import QueueConfig
from .delivery import Agent, Expansions, Handoff, Outcome, Result, all_results
from .delivery.router import build_agent
from .envelope import Envelope, EnvelopeError, load_json
from .expansion import NoRecord, RecordedExpansions
from .privsep import Inherited
from .spool import Spool
from .states import Route

_LENGTH = struct.Struct("!I")
HEADER_LIMIT = 16 * 1024 * 1024  # the envelope of a message with many recipients
DATA_SLACK = 1024 * 1024  # above max_message_size: our Received header and the like
REQUEST_TIMEOUT = 60.0  # reading a request; the delivery itself has its own deadlines


class LocalSocket:
    """The listening socket, made by the parent: an abstract name nobody can plant."""

    def __init__(self) -> None:
        self.name = b"\0leafmail-local-" + secrets.token_hex(8).encode()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.name)
        self.sock.listen(64)


class LocalService:
    """The root-side process: runs the local delivery agent for the queue manager.

    It is given the queue sections (for its agent) and smtp.max_message_size (the
    largest message it reads); the daemon replaces both on a reload.
    """

    def __init__(
        self,
        queue: QueueConfig,
        max_message_size: int,
        inherited: Inherited,
        listening: LocalSocket,
        client_uid: int,
    ) -> None:
        self.queue = queue
        self.max_message_size = max_message_size
        self.inherited = inherited
        self.listening = listening
        self.client_uid = client_uid
        self.log: ServerLog = inherited.log
        self.agent: Agent | None = None
        self._server: asyncio.AbstractServer | None = None

    def setup(self) -> WorkerApp:
        """In the new process (it stays root): the local agent, and nothing to read yet."""
        self.inherited.announcer.receiver.close()
        spool = Spool(self.inherited.spool_path, create=False)
        self.agent = build_agent(
            self.queue,
            spool,
            notify=self.inherited.announcer.announce,
            routes=frozenset({Route.LOCAL}),
        )
        return WorkerApp(start=self._start, close=self._close)

    async def _start(self) -> None:
        self._server = await asyncio.start_unix_server(self._client, sock=self.listening.sock)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            if sock is None or _peer_uid(sock) != self.client_uid:
                return  # only the queue manager may ask
            async with asyncio.timeout(REQUEST_TIMEOUT):
                envelope, rcpts, known, data = await self._request(reader)
            relay = RelayedExpansions(reader, writer, known)
            results = await self._deliver(envelope, data, rcpts, relay)
            writer.write(_line({"results": _encode_results(results)}))
            await writer.drain()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            self.log.info("local delivery request failed", error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _request(
        self, reader: asyncio.StreamReader
    ) -> tuple[Envelope, list[int], dict[int, dict[str, Result]], bytes]:
        (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if size > HEADER_LIMIT:
            raise ValueError("request header too large")
        envelope, rcpts, known = parse_request(load_json(await reader.readexactly(size), "request"))
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > self.max_message_size + DATA_SLACK:
            raise ValueError("message too large")
        return envelope, rcpts, known, await reader.readexactly(length)

    async def _deliver(
        self, envelope: Envelope, data: bytes, rcpts: list[int], relay: RelayedExpansions
    ) -> dict[int, Result]:
        if self.agent is None:
            return all_results(rcpts, Result.deferred("4.3.5", "local delivery is not configured"))
        return await self.agent.deliver(envelope, data, rcpts, relay)


class RelayedExpansions:
    """The service's `delivery.Expansions`: answers from what the queue manager sent,
    and tells it every change and forwarded copy (it keeps the record)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        known: dict[int, dict[str, Result]],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.known = known
        self._lock = asyncio.Lock()  # one forward's question and answer at a time

    def expanding(self, index: int, keys: Sequence[str]) -> None:
        self.writer.write(_line({"expanding": index, "keys": list(keys)}))

    def result(self, index: int, key: str) -> Result | None:
        return self.known.get(index, {}).get(key)

    def record(self, index: int, key: str, result: Result) -> None:
        self.writer.write(_line({"record": index, "key": key, "result": _encode(result)}))

    async def forward(
        self, index: int, keys: Sequence[str], envelope: Envelope, data: bytes
    ) -> str:
        async with self._lock:
            head = {"forward": index, "keys": list(keys), "envelope": envelope.to_json()}
            self.writer.write(_line({**head, "size": len(data)}) + data)
            await self.writer.drain()
            answer = json.loads(await self.reader.readline())
        if not isinstance(answer, dict) or not isinstance(answer.get("qid"), str):
            raise OSError(f"the queue manager could not spool the copy: {answer}")
        return str(answer["qid"])

    async def settled(self, results: Mapping[int, Result]) -> None:
        self.writer.write(_line({"settled": _encode_results(dict(results))}))


class LocalClient:
    """The queue manager's agent for the "local" route: asks the root-side service."""

    def __init__(self, name: bytes) -> None:
        self.name = name

    async def deliver(
        self,
        envelope: Envelope,
        data: bytes,
        rcpts: Sequence[int],
        expansions: Expansions | None = None,
    ) -> dict[int, Result]:
        record = expansions or NoRecord()
        request = {
            "envelope": envelope.to_json(),
            "rcpts": list(rcpts),
            "known": _known(record, rcpts),
        }
        head = json.dumps(request).encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self.name)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except OSError as exc:
            sock.close()
            return all_results(
                rcpts, Result.deferred("4.3.0", f"local delivery unavailable: {exc}")
            )
        try:
            writer.write(_LENGTH.pack(len(head)) + head + _LENGTH.pack(len(data)))
            writer.write(data)
            await writer.drain()
            reply = await _conversation(reader, writer, record)
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            return all_results(rcpts, Result.deferred("4.3.0", f"local delivery failed: {exc}"))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return _decode_results(reply, rcpts)

    async def close(self) -> None:
        """Nothing is kept open between deliveries."""


def _known(record: Expansions, rcpts: Sequence[int]) -> dict[str, dict[str, list[Any]]]:
    """The final results the record holds for these recipients' alias targets."""
    marks = record.marks if isinstance(record, RecordedExpansions) else {}
    known: dict[str, dict[str, list[Any]]] = {}
    for index in rcpts:
        for key in marks.get(index, {}):
            result = record.result(index, key)
            if result is not None:
                known.setdefault(str(index), {})[key] = _encode(result)
    return known


async def _conversation(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: Expansions
) -> bytes:
    """Apply the service's expansion lines to `record` until its results line."""
    while True:
        line = await reader.readline()
        if not line:
            return b""
        message = json.loads(line)
        if not isinstance(message, dict) or "results" in message:
            return line
        if "expanding" in message:
            record.expanding(int(message["expanding"]), [str(k) for k in message["keys"]])
        elif "record" in message:
            result = _result(message["result"])
            record.record(int(message["record"]), str(message["key"]), result)
        elif "settled" in message:
            await record.settled(_settled(message["settled"]))
        elif "forward" in message:
            copy = await reader.readexactly(int(message["size"]))
            envelope = Envelope.from_json(message["envelope"])
            keys = [str(k) for k in message["keys"]]
            try:
                qid = await record.forward(int(message["forward"]), keys, envelope, copy)
                writer.write(_line({"qid": qid}))
            except OSError as exc:
                writer.write(_line({"error": str(exc)}))
            await writer.drain()


def _settled(raw: Any) -> dict[int, Result]:
    """The results of a "settled" line (`RelayedExpansions.settled`); ValueError if it
    has another shape, which defers the whole delivery (never a wrong record)."""
    try:
        return {int(i): _result(value) for i, value in dict(raw).items()}
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"bad settled line: {exc}") from None


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _encode(result: Result) -> list[Any]:
    """A result as the wire carries it: every field, the handoff too (a forward's
    PASSED says the copy reports success itself, not the queue manager)."""
    fields = [result.outcome.value, result.code, result.status, result.text, result.remote]
    return [*fields, result.handoff.value, result.reply]


def parse_request(head: Any) -> tuple[Envelope, list[int], dict[int, dict[str, Result]]]:
    """The envelope, the recipients to deliver and the expansions known so far, from a
    request's decoded JSON header; ValueError for any other shape. Only the queue
    manager may ask (SO_PEERCRED), but a malformed value must end that one request with
    its log line, not escape the connection's task as an unhandled TypeError."""
    if not isinstance(head, dict) or not isinstance(head.get("rcpts"), list):
        raise ValueError("bad request")
    try:
        envelope = Envelope.from_json(head.get("envelope"))
    except EnvelopeError as exc:
        raise ValueError(str(exc)) from None
    try:
        rcpts = [int(i) for i in head["rcpts"] if 0 <= int(i) < len(envelope.recipients)]
        known = {
            int(i): {str(k): _result(v) for k, v in targets.items()}
            for i, targets in dict(head.get("known") or {}).items()
        }
    except (TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"bad request: {exc}") from None
    return envelope, rcpts, known


def _result(raw: Any) -> Result:
    """The result `_encode` wrote (ValueError, TypeError or KeyError if not one); one
    of five fields (a service started before the handoff was sent) is a final one."""
    outcome, code, status, text, remote, *more = raw
    handoff, reply = more or (Handoff.FINAL.value, "")
    return Result(
        Outcome(outcome),
        int(code),
        str(status),
        str(text),
        str(remote),
        Handoff(handoff),
        str(reply),
    )


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _encode_results(results: dict[int, Result]) -> dict[str, list[Any]]:
    return {str(i): _encode(r) for i, r in results.items()}


def _decode_results(reply: bytes, rcpts: Sequence[int]) -> dict[int, Result]:
    """The service's answer; anything missing or malformed defers (never lost)."""
    lost = Result.deferred("4.3.0", "local delivery gave no answer (it will be retried)")
    results = all_results(rcpts, lost)
    try:
        raw = json.loads(reply)["results"]
        for index in rcpts:
            results[index] = _result(raw[str(index)])
    except (ValueError, KeyError, TypeError):
        return results
    return results


def client_uid(inherited: Inherited) -> int:
    """The uid the queue manager runs as (the daemon's user, or ours)."""
    return inherited.identity.uid if inherited.identity is not None else os.getuid()
