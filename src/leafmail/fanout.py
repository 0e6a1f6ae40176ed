"""Listing a long queue on every core: forked workers list their share, the parent prints.

Reading and checking each message is CPU work (two small reads, a checksum, JSON), and
Postfix spreads its listing over two processes (showq reads the queue, postqueue formats
it). So `write_listing` forks one worker per CPU (at most `MAX_WORKERS`); worker k lists
the messages whose queue id ends in a hex digit d with d % N == k (the id's last digits
are random, so the shares are even), renders them, and sends them to the parent through
a pipe in frames of a few hundred entries. The parent copies whole frames to stdout as
they arrive, so the output starts at once and memory stays bounded: a worker blocks when
its pipe is full. Frames never interleave; the order between workers is arbitrary, as
the order of a directory already is.

A frame is a header (kind, payload length, entries, their total size) and the payload:
``C`` a chunk of rendered entries, ``E`` the worker's end (its entries: how many of the
worker's entries were junk, which the footer counts apart), ``X`` an error text.
"""

from __future__ import annotations

import contextlib
import gc
import os
import selectors
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from netserver.errors import UnavailableError

from .listing import (
    HEADER,
    JUNK,
    QueueEntry,
    Writer,
    footer,
    iter_queue,
    text_block,
    write_json,
    write_queue,
)
from .selection import Selection
from .spool import Spool

MAX_WORKERS = 4
CHUNK = 256  # entries per frame
_FRAME = struct.Struct("!cIIQ")
_ENCODING = ("utf-8", "surrogatepass")  # junk names may hold undecodable bytes


def default_workers() -> int:
    """One per CPU this process may run on, at most MAX_WORKERS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def write_listing(
    spool: Spool,
    selection: Selection,
    out: Writer,
    *,
    as_json: bool,
    workers: int,
    now: float | None = None,
) -> int:
    """List the selection to `out` as text or JSON; returns the number of entries."""
    now = time.time() if now is None else now
    if workers <= 1:
        entries = iter_queue(spool, selection, now)
        return write_json(entries, out) if as_json else write_queue(entries, out, now)
    out.flush()  # a forked child must not inherit buffered output
    gc.freeze()  # the children share the parent's objects instead of copying them on GC
    children: list[_Child] = []
    try:
        for k in range(workers):
            children.append(_spawn(spool, selection, k, workers, as_json, now, children))
        count, total = _merge(children, out, as_json)
    finally:
        _reap(children)
    if as_json:
        out.write("\n]\n" if count else "[]\n")
    else:
        junk = sum(child.junk for child in children)
        out.write(footer(count - junk, total, junk))
    return count


@dataclass
class _Child:
    pid: int
    fd: int
    buffer: bytearray = field(default_factory=bytearray)
    done: bool = False
    error: str = ""
    junk: int = 0  # how many of its entries were junk (told in its end frame)


def _spawn(
    spool: Spool,
    selection: Selection,
    k: int,
    n: int,
    as_json: bool,
    now: float,
    siblings: list[_Child],
) -> _Child:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        status = 1
        try:
            os.close(read_fd)
            for sibling in siblings:
                os.close(sibling.fd)  # or a dead parent would leave a sibling blocked
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            gc.disable()  # listing makes no cycles; collections would only cost time
            _work(write_fd, iter_queue(spool, selection, now, _share(k, n)), as_json, now)
            status = 0
        except BaseException as exc:  # report, never unwind into the parent's code
            with contextlib.suppress(BaseException):
                _send(write_fd, b"X", f"{type(exc).__name__}: {exc}".encode(*_ENCODING))
        finally:
            os._exit(status)
    os.close(write_fd)
    return _Child(pid, read_fd)


def _share(k: int, n: int) -> Callable[[str], bool]:
    """Worker k's part: ids whose last hex digit is k modulo n; junk ("") goes to 0."""
    return lambda qid: int(qid[-1], 16) % n == k if qid else k == 0


def _work(fd: int, entries: Iterator[QueueEntry], as_json: bool, now: float) -> None:
    pending: list[str] = []
    size = junk = 0
    for entry in entries:
        pending.append(entry.json() if as_json else text_block(entry, now))
        if entry.state == JUNK:
            junk += 1  # not a message: its size is no mail's
        else:
            size += entry.size
        if len(pending) >= CHUNK:
            _send_chunk(fd, pending, size, as_json)
            pending, size = [], 0
    if pending:
        _send_chunk(fd, pending, size, as_json)
    _send(fd, b"E", b"", junk)


def _send_chunk(fd: int, pending: list[str], size: int, as_json: bool) -> None:
    text = (",\n" if as_json else "").join(pending)
    _send(fd, b"C", text.encode(*_ENCODING), len(pending), size)


def _send(fd: int, kind: bytes, payload: bytes, entries: int = 0, size: int = 0) -> None:
    view = memoryview(_FRAME.pack(kind, len(payload), entries, size) + payload)
    while view:
        view = view[os.write(fd, view) :]


def _merge(children: list[_Child], out: Writer, as_json: bool) -> tuple[int, int]:
    """Copy whole frames to `out` as they arrive; (entries, total size) at the end."""
    count = total = 0
    with selectors.DefaultSelector() as selector:
        for child in children:
            selector.register(child.fd, selectors.EVENT_READ, child)
        while selector.get_map():
            for key, _ in selector.select():
                worker: _Child = key.data
                data = os.read(worker.fd, 1 << 16)
                if not data:
                    selector.unregister(worker.fd)
                    if not worker.done:
                        worker.error = worker.error or "a listing worker died"
                    continue
                worker.buffer += data
                for entries, size, text in _frames(worker):
                    if as_json:
                        out.write(("[\n" if not count else ",\n") + text)
                    else:
                        out.write((HEADER + "\n" if not count else "") + text)
                    count += entries
                    total += size
    errors = [child.error for child in children if child.error]
    if errors:
        raise UnavailableError(f"cannot list the spool: {errors[0]}")
    return count, total


def _frames(child: _Child) -> Iterator[tuple[int, int, str]]:
    """The complete chunk frames in the child's buffer; records its end or error."""
    while len(child.buffer) >= _FRAME.size:
        kind, length, entries, size = _FRAME.unpack_from(child.buffer)
        end = _FRAME.size + length
        if len(child.buffer) < end:
            return
        payload = bytes(child.buffer[_FRAME.size : end])
        del child.buffer[:end]
        if kind == b"C":
            yield entries, size, payload.decode(*_ENCODING)
        elif kind == b"E":
            child.done = True
            child.junk = entries
        else:
            child.error = payload.decode(*_ENCODING)


def _reap(children: list[_Child]) -> None:
    """Close the pipes and wait for every worker; one still running is killed."""
    for child in children:
        with contextlib.suppress(OSError):
            os.close(child.fd)
        if not child.done:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)
