"""Streams that bind a connection to a handler's stdin and stdout.

The 1998 module handed the handler STDIN/STDOUT and read lines without bound. Here:

* `BinaryReader.readline` never buffers more than `max_line` bytes: a peer that sends an
  endless line gets `LineTooLong` (the connection is then cut), so memory stays flat;
* reads and writes go through the socket's timeout, which is the idle timeout;
* before a read blocks, the paired writer is flushed, as a terminal's stdio does, so a
  handler may ``print()`` a prompt and ``input()`` the answer without calling flush;
* `ThreadStdio` lets each thread of thread mode see its own connection as
  ``sys.stdin``/``sys.stdout`` while other threads keep the process's real ones.
"""

from __future__ import annotations

import codecs
import io
import socket
import sys
import threading
from collections.abc import Callable
from typing import TextIO

DEFAULT_MAX_LINE = 65536
CHUNK = 65536
WRITE_BUFFER = 65536


class LineTooLong(ValueError):
    """A line exceeded the server's bound; the connection is closed after this."""


class BinaryReader(io.RawIOBase):
    """Buffered, line-bounded reads from a socket; counts the bytes received."""

    def __init__(
        self,
        sock: socket.socket,
        max_line: int = DEFAULT_MAX_LINE,
        before_wait: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._sock = sock
        self._buf = bytearray()
        self._eof = False
        self.max_line = max_line
        self.before_wait = before_wait
        self.bytes_in = 0

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def _fill(self) -> bool:
        """Receive one chunk into the buffer; False at end of stream."""
        if self._eof:
            return False
        if self.before_wait is not None:
            self.before_wait()
        data = self._sock.recv(CHUNK)
        if not data:
            self._eof = True
            return False
        self.bytes_in += len(data)
        self._buf += data
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def readline(self, size: int | None = -1) -> bytes:
        """Return one line with its LF; raise LineTooLong past `max_line` bytes."""
        limit = self.max_line if size is None or size < 0 else min(size, self.max_line)
        start = 0
        while True:
            idx = self._buf.find(b"\n", start)
            if idx >= 0 and idx < limit:
                return self._take(idx + 1)
            if len(self._buf) >= limit:
                if size is not None and 0 <= size <= self.max_line:
                    return self._take(size)
                raise LineTooLong(f"line longer than {self.max_line} bytes")
            start = len(self._buf)
            if not self._fill():
                return self._take(len(self._buf))

    def read(self, size: int | None = -1) -> bytes:
        """Read up to `size` bytes (all until EOF when negative); at least one unless EOF."""
        if size == 0:
            return b""
        if size is None or size < 0:
            while self._fill():
                pass
            return self._take(len(self._buf))
        if not self._buf:
            self._fill()
        return self._take(size)

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class BinaryWriter(io.RawIOBase):
    """Buffered writes to a socket, flushed at 64 KiB, on flush() and before reads."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._buf = bytearray()
        self.bytes_out = 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._buf += data
        if len(self._buf) >= WRITE_BUFFER:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf and not self.closed:
            self._sock.sendall(self._buf)
            self.bytes_out += len(self._buf)
            self._buf.clear()


class TextReader(io.TextIOBase):
    """UTF-8 text over a BinaryReader; CRLF and LF both end a line and read as "\\n".

    Undecodable bytes become surrogates (``surrogateescape``), so a handler that echoes
    them through `TextWriter` sends the same bytes back. `read(n)` counts characters and
    never splits one; it may be mixed freely with `readline`.
    """

    encoding = "utf-8"
    errors = "surrogateescape"

    def __init__(self, raw: BinaryReader) -> None:
        super().__init__()
        self.raw = raw
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._text = ""  # decoded by read(n) but not yet returned

    @property
    def buffer(self) -> BinaryReader:
        """The binary stream underneath, as with sys.stdin.buffer."""
        return self.raw

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.raw.fileno()

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        if self._text:
            head, sep, tail = self._text.partition("\n")
            if sep:
                self._text = tail
                return head + sep
            self._text = ""
            return head + self.readline(size)
        held, _flag = self._decoder.getstate()
        self._decoder.reset()
        data = held + self.raw.readline(size)
        if data.endswith(b"\r\n"):
            data = data[:-2] + b"\n"
        return data.decode("utf-8", "surrogateescape")

    def read(self, size: int | None = -1) -> str:
        if size is None or size < 0:
            return "".join(iter(self.readline, ""))
        while len(self._text) < size or self._text.endswith("\r"):
            chunk = self.raw.read(CHUNK)
            self._text += self._decoder.decode(chunk, final=not chunk)
            if not chunk:
                break
            self._text = self._text.replace("\r\n", "\n")
        out, self._text = self._text[:size], self._text[size:]
        return out


class TextWriter(io.TextIOBase):
    """UTF-8 text onto a BinaryWriter; written as given (no newline translation)."""

    def __init__(self, raw: BinaryWriter) -> None:
        super().__init__()
        self.raw = raw

    encoding = "utf-8"
    errors = "surrogateescape"

    @property
    def buffer(self) -> BinaryWriter:
        """The binary stream underneath, as with sys.stdout.buffer."""
        return self.raw

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, text: str) -> int:
        self.raw.write(text.encode("utf-8", "surrogateescape"))
        return len(text)

    def flush(self) -> None:
        self.raw.flush()


class _Delegate(io.TextIOBase):
    """A sys.stdin/sys.stdout stand-in that forwards to the calling thread's stream."""

    def __init__(self, local: threading.local, name: str, fallback: TextIO) -> None:
        super().__init__()
        self._local = local
        self._name = name
        self.fallback = fallback

    def current(self) -> TextIO:
        stream: TextIO | None = getattr(self._local, self._name, None)
        return stream if stream is not None else self.fallback

    encoding = "utf-8"

    def readable(self) -> bool:
        return self.current().readable()

    def writable(self) -> bool:
        return self.current().writable()

    def fileno(self) -> int:
        return self.current().fileno()

    def isatty(self) -> bool:
        return self.current().isatty()

    def read(self, size: int | None = -1) -> str:
        return self.current().read(-1 if size is None else size)

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        return self.current().readline(-1 if size is None else size)

    def write(self, text: str) -> int:
        return self.current().write(text)

    def flush(self) -> None:
        self.current().flush()

    @property
    def buffer(self) -> object:
        """The calling thread's binary stream."""
        return self.current().buffer

    def close(self) -> None:
        """Close the calling thread's stream only; the stand-in itself stays usable."""
        stream: TextIO | None = getattr(self._local, self._name, None)
        if stream is not None:
            stream.close()

    @property
    def closed(self) -> bool:
        return self.current().closed


class ThreadStdio:
    """Installs per-thread sys.stdin/sys.stdout for thread mode, and removes them."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._stdin: _Delegate | None = None
        self._stdout: _Delegate | None = None

    def install(self) -> None:
        """Replace sys.stdin/sys.stdout with per-thread delegates (idempotent)."""
        if self._stdin is None:
            self._stdin = _Delegate(self._local, "stdin", sys.stdin)
            self._stdout = _Delegate(self._local, "stdout", sys.stdout)
            sys.stdin = self._stdin
            sys.stdout = self._stdout

    def uninstall(self) -> None:
        """Put back the streams that were there before `install`."""
        if self._stdin is not None and self._stdout is not None:
            sys.stdin = self._stdin.fallback
            sys.stdout = self._stdout.fallback
            self._stdin = self._stdout = None

    def bind(self, stdin: TextIO | None, stdout: TextIO | None) -> None:
        """Make the calling thread see these streams (None: the process's own)."""
        self._local.stdin = stdin
        self._local.stdout = stdout
