"""Unit tests of netserver.stdio over a socketpair: bounded lines, text, flushing."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest

from netserver.stdio import (
    CHUNK,
    WRITE_BUFFER,
    BinaryReader,
    BinaryWriter,
    LineTooLong,
    TextReader,
    TextWriter,
    ThreadStdio,
)

TIMEOUT = 5.0


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, client side), both with a timeout so no test can hang."""
    server, client = socket.socketpair()
    server.settimeout(TIMEOUT)
    client.settimeout(TIMEOUT)
    with server, client:
        yield server, client


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


# -- BinaryReader.readline: the line bound ------------------------------------------------


def test_readline_returns_lines_then_partial_then_empty(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.sendall(b"one\r\ntwo\n\nlast")
    client.shutdown(socket.SHUT_WR)
    reader = BinaryReader(server)
    assert [reader.readline() for _ in range(5)] == [b"one\r\n", b"two\n", b"\n", b"last", b""]
    assert reader.bytes_in == 14


def test_line_of_exactly_max_line_bytes_is_allowed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    reader = BinaryReader(server, max_line=100)
    line = b"x" * 99 + b"\n"  # 100 bytes with its LF
    client.sendall(line + line)
    assert reader.readline() == line
    assert reader.readline() == line


def test_line_one_byte_too_long_raises(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    reader = BinaryReader(server, max_line=100)
    client.sendall(b"x" * 100 + b"\n")
    with pytest.raises(LineTooLong):
        reader.readline()


def test_endless_line_raises_without_reading_it_all(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A peer streaming one endless line: the reader gives up after ~max_line bytes."""
    server, client = pair
    max_line = 4096
    reader = BinaryReader(server, max_line=max_line)
    stop = threading.Event()

    def flood() -> None:
        block = b"x" * 65536
        try:
            while not stop.is_set():
                client.sendall(block)
        except OSError:
            pass

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        with pytest.raises(LineTooLong):
            reader.readline()
    finally:
        stop.set()
        server.shutdown(socket.SHUT_RDWR)
        flooder.join(TIMEOUT)
    # Memory stays bounded: at most the limit plus one receive chunk was taken in.
    assert reader.bytes_in < max_line + CHUNK
    assert len(reader._buf) < max_line + CHUNK


def test_readline_size_smaller_than_bound_returns_part(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    reader = BinaryReader(server, max_line=100)
    client.sendall(b"abcdefgh\n")
    assert reader.readline(3) == b"abc"
    assert reader.readline() == b"defgh\n"


def test_read_sizes(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    reader = BinaryReader(server)
    client.sendall(b"line\nrest of it")
    client.shutdown(socket.SHUT_WR)
    assert reader.readline() == b"line\n"
    assert reader.read(4) == b"rest"
    assert reader.read() == b" of it"
    assert reader.read(10) == b""


def test_read_zero_returns_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _client = pair
    server.settimeout(0.2)
    assert BinaryReader(server).read(0) == b""


# -- TextReader / TextWriter ----------------------------------------------------------------


def test_text_reader_turns_crlf_into_lf(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"dos\r\nunix\nbare\rcr\n\r\nend\r")
    client.shutdown(socket.SHUT_WR)
    text = TextReader(BinaryReader(server))
    assert list(text) == ["dos\n", "unix\n", "bare\rcr\n", "\n", "end\r"]


def test_text_reader_read_all_turns_crlf_into_lf(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.sendall("a\r\nb\r\nç\n".encode())
    client.shutdown(socket.SHUT_WR)
    assert TextReader(BinaryReader(server)).read() == "a\nb\nç\n"


def test_text_reader_read_n_turns_crlf_into_lf(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.sendall(b"ab\r\n")
    client.shutdown(socket.SHUT_WR)
    text = TextReader(BinaryReader(server))
    assert text.read(10) == "ab\n"


def test_text_reader_read_n_keeps_characters_whole(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.sendall("é!".encode())
    client.shutdown(socket.SHUT_WR)
    text = TextReader(BinaryReader(server))
    assert text.read(1) == "é"


def test_surrogateescape_round_trip(pair: tuple[socket.socket, socket.socket]) -> None:
    """Bytes that are not UTF-8 read as surrogates and are written back unchanged."""
    server, client = pair
    raw = b"caf\xe9 \xff\xfe \xc3\xa9 \x80\n"
    client.sendall(raw)
    reader = TextReader(BinaryReader(server))
    writer = TextWriter(BinaryWriter(server))
    line = reader.readline()
    assert line == "caf\udce9 \udcff\udcfe é \udc80\n"
    writer.write(line)
    writer.flush()
    assert recv_exactly(client, len(raw)) == raw


def test_text_writer_does_not_translate_newlines(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    writer = TextWriter(BinaryWriter(server))
    print("a", "ü", sep="\r\n", file=writer)
    writer.flush()
    expected = "a\r\nü\n".encode()
    assert recv_exactly(client, len(expected)) == expected


# -- flushing -------------------------------------------------------------------------------


def test_writer_buffers_until_flush(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    writer = BinaryWriter(server)
    writer.write(b"held")
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(10)
    client.setblocking(True)
    assert writer.bytes_out == 0
    writer.flush()
    assert recv_exactly(client, 4) == b"held"
    assert writer.bytes_out == 4


def test_writer_flushes_by_itself_at_the_buffer_size(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    writer = BinaryWriter(server)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recv_exactly(client, WRITE_BUFFER)))
    reader.start()
    writer.write(b"y" * WRITE_BUFFER)  # no flush(): the buffer is full
    reader.join(TIMEOUT)
    assert received == [b"y" * WRITE_BUFFER]


def test_prompt_is_flushed_before_a_blocking_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """print(prompt); input() -- the peer sees the prompt while the handler waits."""
    server, client = pair
    writer = TextWriter(BinaryWriter(server))
    reader = TextReader(BinaryReader(server, before_wait=writer.raw.flush))
    answers: list[str] = []

    def handler() -> None:
        writer.write("name? ")
        answers.append(reader.readline())

    thread = threading.Thread(target=handler)
    thread.start()
    try:
        assert recv_exactly(client, 6) == b"name? "  # no answer was sent yet
        client.sendall(b"Ada\r\n")
    finally:
        thread.join(TIMEOUT)
    assert answers == ["Ada\n"]


def test_no_flush_when_a_line_is_already_buffered(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Pipelined input is answered in one send, not one per line."""
    server, client = pair
    flushes: list[int] = []
    writer = BinaryWriter(server)

    def counting_flush() -> None:
        flushes.append(1)
        writer.flush()

    reader = BinaryReader(server, before_wait=counting_flush)
    client.sendall(b"a\nb\nc\n")
    while line := reader.readline(3):
        writer.write(line.upper())
        if line == b"c\n":
            break
    assert len(flushes) == 1  # only the first read had to wait
    writer.flush()
    assert recv_exactly(client, 6) == b"A\nB\nC\n"


# -- ThreadStdio ------------------------------------------------------------------------------


def test_thread_stdio_gives_each_thread_its_own_streams(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    stdio = ThreadStdio()
    before_in, before_out = sys.stdin, sys.stdout
    stdio.install()
    try:
        writer = TextWriter(BinaryWriter(server))
        reader = TextReader(BinaryReader(server, before_wait=writer.raw.flush))
        client.sendall(b"in the thread\n")
        got: list[str] = []

        def worker() -> None:
            stdio.bind(reader, writer)  # type: ignore[arg-type]
            try:
                got.append(sys.stdin.readline())
                print("from the thread")
                sys.stdout.flush()
            finally:
                stdio.bind(None, None)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(TIMEOUT)
        assert got == ["in the thread\n"]
        assert recv_exactly(client, 16) == b"from the thread\n"
        # This thread never bound anything: it still sees the process's streams.
        assert cast(Any, sys.stdout).current() is before_out
    finally:
        stdio.uninstall()
    assert (sys.stdin, sys.stdout) == (before_in, before_out)
