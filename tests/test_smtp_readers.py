"""Tests for netserver.smtp.readers: command lines, DATA bodies, BDAT chunks.

Every DATA case is also fed one byte at a time and in two pieces split at every
offset: where the input is cut must never change the result.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netserver.smtp.readers import (
    BareNewline,
    ChunkEnd,
    ChunkReader,
    CommandLine,
    CommandReader,
    DataError,
    DataReader,
    LineError,
    LineErrorKind,
    MessageEnd,
    MessageSink,
    apply_newline_policy,
    has_bare_newline,
    has_long_line,
)

TOO_LONG = LineError(LineErrorKind.TOO_LONG)
BARE = LineError(LineErrorKind.BARE_NEWLINE)


def read_lines(
    data: bytes, policy: BareNewline = BareNewline.REJECT
) -> list[CommandLine | LineError]:
    reader = CommandReader(policy, 512, {b"MAIL ": 2048})
    buf = bytearray(data)
    out: list[CommandLine | LineError] = []
    while (item := reader.read(buf)) is not None:
        out.append(item)
    return out


COMMAND_CASES = [
    (b"NOOP\r\n", [CommandLine(b"NOOP")]),
    (b"NOOP\r\nQUIT\r\n", [CommandLine(b"NOOP"), CommandLine(b"QUIT")]),
    (b"NOOP", []),
    (b"NOOP\r", []),
    (b"\r\n", [CommandLine(b"")]),
    (b"NO\nOP\r\n", [BARE]),
    (b"NO\rOP\r\n", [BARE]),
    (b"NOOP\r\r\n", [BARE]),
    (b"NOOP\n", []),  # a bare LF never ends a line
    (b"NOOP\nQUIT\n", []),
    (b"x" * 510 + b"\r\n", [CommandLine(b"x" * 510)]),
    (b"x" * 511 + b"\r\nNOOP\r\n", [TOO_LONG, CommandLine(b"NOOP")]),
    (b"x" * 5000 + b"\r\nNOOP\r\n", [TOO_LONG, CommandLine(b"NOOP")]),
    (b"MAIL " + b"x" * 1000 + b"\r\n", [CommandLine(b"MAIL " + b"x" * 1000)]),
    (b"mail " + b"x" * 2041 + b"\r\n", [CommandLine(b"mail " + b"x" * 2041)]),
    (b"MAIL " + b"x" * 2042 + b"\r\n", [TOO_LONG]),
]


@pytest.mark.parametrize(("data", "expected"), COMMAND_CASES)
def test_command_reader(data: bytes, expected: list[CommandLine | LineError]) -> None:
    assert read_lines(data) == expected


@pytest.mark.parametrize(("data", "expected"), COMMAND_CASES)
def test_command_reader_byte_by_byte(data: bytes, expected: list[CommandLine | LineError]) -> None:
    reader = CommandReader(BareNewline.REJECT, 512, {b"MAIL ": 2048})
    buf = bytearray()
    out: list[CommandLine | LineError] = []
    for byte in data:
        buf.append(byte)
        while (item := reader.read(buf)) is not None:
            out.append(item)
        assert len(buf) <= 2048  # an over-long line is dropped as it comes
    assert out == expected


def test_an_extended_limit_below_the_default_is_refused() -> None:
    """Lines within the default limit are never checked against their prefix, which is
    right only while every extended limit raises the default one."""
    with pytest.raises(ValueError, match="below the default"):
        CommandReader(BareNewline.REJECT, 512, {b"NOOP ": 100})


def test_command_reader_replace_policy() -> None:
    assert read_lines(b"NO\nOP\r\nA\rB\r\n", BareNewline.REPLACE) == [
        CommandLine(b"NO OP"),
        CommandLine(b"A B"),
    ]


def test_command_reader_skip() -> None:
    reader = CommandReader(BareNewline.REJECT)
    reader.skip(10)
    buf = bytearray(b"MAIL FROM:")
    assert reader.read(buf) is None
    assert buf == b""
    buf += b"NOOP\r\n"
    assert reader.read(buf) == CommandLine(b"NOOP")
    reader.skip(3)
    buf += b"abcRSET\r\n"
    assert reader.read(buf) == CommandLine(b"RSET")


def test_command_reader_reset_forgets_discarding() -> None:
    reader = CommandReader(BareNewline.REJECT)
    buf = bytearray(b"x" * 600)
    assert reader.read(buf) is None
    reader.reset()
    buf = bytearray(b"NOOP\r\n")
    assert reader.read(buf) == CommandLine(b"NOOP")


# --- DATA --------------------------------------------------------------------------


def feed_data(
    chunks: list[bytes], policy: BareNewline = BareNewline.REJECT, max_size: int = 10_000
) -> tuple[MessageEnd | None, bytes]:
    """Feed chunks to a DataReader; return the end (if any) and the unread rest."""
    reader = DataReader(policy, max_size)
    buf = bytearray()
    for i, chunk in enumerate(chunks):
        buf += chunk
        end = reader.read(buf)
        if end is not None:
            return end, bytes(buf) + b"".join(chunks[i + 1 :])
    return None, bytes(buf)


DATA_CASES = [
    # (wire bytes after "DATA\r\n", body, error, rest after the terminator)
    (b".\r\n", b"", None, b""),
    (b".\r\nNOOP\r\n", b"", None, b"NOOP\r\n"),
    (b"a\r\n.\r\n", b"a\r\n", None, b""),
    (b"a\r\nb\r\n.\r\nQUIT\r\n", b"a\r\nb\r\n", None, b"QUIT\r\n"),
    (b"..\r\n.\r\n", b".\r\n", None, b""),
    (b"..a\r\n...\r\n.\r\n", b".a\r\n..\r\n", None, b""),
    (b".a\r\n.\r\n", b"a\r\n", None, b""),
    (b"a.\r\n.b\r\n.\r\n", b"a.\r\nb\r\n", None, b""),
    (b"\r\n.\r\n", b"\r\n", None, b""),
    # Nothing but CRLF "." CRLF ends the data: these are bodies with bare newlines,
    # and only the final ".\r\n", after a real CRLF, ends them.
    (b"a\n.\n.\r\n.\r\n", b"", DataError.BARE_NEWLINE, b""),
    (b"a\r.\r.\r\n.\r\n", b"", DataError.BARE_NEWLINE, b""),
    (b"a\n.\r\n.\r\n", b"", DataError.BARE_NEWLINE, b""),
    (b"a\r\n.\n.\r\n.\r\n", b"", DataError.BARE_NEWLINE, b""),
    (b"a\r\n.\r.\r\n.\r\n", b"", DataError.BARE_NEWLINE, b""),
    (b"a\rb\r\n.\r\n", b"", DataError.BARE_NEWLINE, b""),
    (b"x" * 998 + b"\r\n.\r\n", b"x" * 998 + b"\r\n", None, b""),
    (b"." + b"x" * 998 + b"\r\n.\r\n", b"x" * 998 + b"\r\n", None, b""),
    (b"x" * 999 + b"\r\n.\r\n", b"", DataError.LINE_TOO_LONG, b""),
    (b"a\r\n" + b"x" * 999 + b"\r\nb\r\n.\r\n", b"", DataError.LINE_TOO_LONG, b""),
    (b"a\r\n" * 400 + b"x" * 999 + b"\r\n.\r\n", b"", DataError.LINE_TOO_LONG, b""),
    # NUL is text in no RFC; CRLF NUL "." CRLF is an end for a next hop that drops NULs.
    (b"a\r\n\x00.\r\nMAIL\r\n.\r\n", b"", DataError.NUL, b""),
    (b"a\x00b\r\n.\r\nQUIT\r\n", b"", DataError.NUL, b"QUIT\r\n"),
]


@pytest.mark.parametrize(("wire", "body", "error", "rest"), DATA_CASES)
def test_data_reader(wire: bytes, body: bytes, error: DataError | None, rest: bytes) -> None:
    end, unread = feed_data([wire])
    assert end == MessageEnd(body, end.size if end else 0, error)
    assert unread == rest


@pytest.mark.parametrize(("wire", "body", "error", "rest"), DATA_CASES)
def test_data_reader_cut_anywhere(
    wire: bytes, body: bytes, error: DataError | None, rest: bytes
) -> None:
    one_by_one, _ = feed_data([bytes([b]) for b in wire])
    assert one_by_one is not None
    assert (one_by_one.data, one_by_one.error) == (body, error)
    for cut in range(1, len(wire), max(1, len(wire) // 50)):
        end, unread = feed_data([wire[:cut], wire[cut:]])
        assert end is not None
        assert (end.data, end.error, unread) == (body, error, rest)


@pytest.mark.parametrize(
    "wire",
    [b"", b".", b".\r", b"a\r\n", b"a\n.\n", b"a\r.\r", b"a\n.\r\n", b"a\r\n.\n", b"\r\n.\r"],
)
def test_data_not_ended(wire: bytes) -> None:
    end, _ = feed_data([wire])
    assert end is None


def test_data_replace_policy_never_makes_a_terminator() -> None:
    end, rest = feed_data([b"a\n.\nb\r.\rc\r\n.\r\n"], BareNewline.REPLACE)
    assert end is not None
    assert end.error is None
    assert end.data == b"a\r\n.\r\nb\r\n.\r\nc\r\n"
    assert rest == b""


def test_data_too_big_is_reported_at_the_end_and_memory_stays_bounded() -> None:
    reader = DataReader(BareNewline.REJECT, 1000)
    buf = bytearray()
    line = b"y" * 78 + b"\r\n"
    for _ in range(2000):
        buf += line * 10
        assert reader.read(buf) is None
        assert len(buf) <= 1
        assert reader._sink.buffered <= 1000
    buf += b".\r\n"
    end = reader.read(buf)
    assert end is not None
    assert end.error is DataError.TOO_BIG
    assert end.data == b""
    assert end.size == 2000 * 10 * 80


def test_data_size_limit_is_inclusive() -> None:
    end, _ = feed_data([b"x" * 8 + b"\r\n.\r\n"], max_size=10)
    assert end is not None
    assert (end.data, end.error) == (b"x" * 8 + b"\r\n", None)
    end, _ = feed_data([b"x" * 9 + b"\r\n.\r\n"], max_size=10)
    assert end is not None
    assert end.error is DataError.TOO_BIG


def test_data_first_error_wins() -> None:
    end, _ = feed_data([b"a\nb\r\n" + b"x" * 2000 + b"\r\n.\r\n"], max_size=100)
    assert end is not None
    assert end.error is DataError.BARE_NEWLINE


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.sampled_from([0, 1, 70, 997, 998, 999, 1000, 2500]), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=3),
)
def test_line_limit_holds_however_lines_and_reads_fall(lines: list[int], cuts: list[int]) -> None:
    """LINE_TOO_LONG exactly when some line has more than 998 octets before its CRLF,
    whatever the line lengths and wherever the reads cut the body."""
    body = b"".join(b"x" * n + b"\r\n" for n in lines)
    wire = body + b".\r\n"
    chunks, start = [], 0
    for cut in sorted(cuts):
        if start < cut < len(wire):
            chunks.append(wire[start:cut])
            start = cut
    chunks.append(wire[start:])
    end, _ = feed_data(chunks, max_size=100_000)
    assert end is not None
    assert (end.error is DataError.LINE_TOO_LONG) == (max(lines) > 998)


def test_a_long_line_without_crlf_is_caught_before_it_ends() -> None:
    reader = DataReader(BareNewline.REJECT, 10_000_000)
    buf = bytearray(b"z" * 5000)
    assert reader.read(buf) is None
    assert reader._sink.error is DataError.LINE_TOO_LONG
    assert reader._sink.buffered == 0


# --- BDAT and the sink -------------------------------------------------------------


def test_chunk_reader_takes_exact_octets_raw() -> None:
    sink = MessageSink(100)
    reader = ChunkReader(sink, 7, last=False)
    buf = bytearray(b".\r\na\nb")
    assert reader.read(buf) is None
    assert reader.remaining == 1
    buf += b"cNOOP\r\n"
    assert reader.read(buf) == ChunkEnd(7, False)
    assert buf == b"NOOP\r\n"
    assert sink.getvalue() == b".\r\na\nbc"


def test_chunk_with_a_nul_is_refused_and_dropped() -> None:
    sink = MessageSink(100)
    reader = ChunkReader(sink, 8, last=True)
    assert reader.read(bytearray(b"a\r\n\x00.\r\nb")) == ChunkEnd(8, True)
    assert sink.error is DataError.NUL
    assert sink.getvalue() == b""


def test_chunk_of_zero_octets_ends_at_once() -> None:
    assert ChunkReader(MessageSink(1), 0, last=True).read(bytearray()) == ChunkEnd(0, True)


def test_sink_drops_everything_after_an_error() -> None:
    sink = MessageSink(5)
    sink.write(b"abc")
    sink.write(b"def")
    assert sink.error is DataError.TOO_BIG
    assert sink.getvalue() == b""
    sink.write(b"g")
    assert sink.size == 7
    assert sink.buffered == 0


@pytest.mark.parametrize(
    ("data", "bare"),
    [(b"", False), (b"a\r\nb", False), (b"a\nb", True), (b"a\rb", True), (b"\r\n\r", True)],
)
def test_has_bare_newline(data: bytes, bare: bool) -> None:
    assert has_bare_newline(data) is bare


_FOUR_OCTETS = bytes(b"\r\n.x"[i % 4] for i in range(256))  # CR and LF dense


@given(st.binary(max_size=40).map(lambda b: b.translate(_FOUR_OCTETS)))
def test_has_bare_newline_agrees_with_its_definition(data: bytes) -> None:
    """Counts and a search for a lone CR stand for "some CR or LF outside a CRLF"."""
    pairs_removed = data.replace(b"\r\n", b"")
    assert has_bare_newline(data) is (b"\r" in pairs_removed or b"\n" in pairs_removed)


def _each_bare_newline_made_crlf(data: bytes) -> bytes:
    """The REPLACE policy's definition, octet by octet."""
    out, i = bytearray(), 0
    while i < len(data):
        if data[i : i + 2] == b"\r\n":
            out += b"\r\n"
            i += 2
        else:
            out += b"\r\n" if data[i] in b"\r\n" else data[i : i + 1]
            i += 1
    return bytes(out)


@given(st.binary(max_size=40).map(lambda b: b.translate(_FOUR_OCTETS)))
def test_the_replace_policy_agrees_with_its_definition(data: bytes) -> None:
    expected = _each_bare_newline_made_crlf(data)
    assert apply_newline_policy(data, BareNewline.REPLACE) == expected
    reader = DataReader(BareNewline.REPLACE, 1 << 20)  # DATA too, in one segment or more
    end = reader.read(bytearray(b"x" + data.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n"))
    assert end is not None and end.error is None
    assert end.data == _each_bare_newline_made_crlf(b"x" + data + b"\r\n")


def test_apply_newline_policy() -> None:
    assert apply_newline_policy(b"a\r\n", BareNewline.REJECT) == b"a\r\n"
    assert apply_newline_policy(b"a\n", BareNewline.REJECT) is None
    assert apply_newline_policy(b"a\nb\rc\r\n", BareNewline.REPLACE) == b"a\r\nb\r\nc\r\n"


@pytest.mark.parametrize(
    ("data", "long"),
    [
        (b"x" * 998 + b"\r\n", False),  # 1000 octets with CRLF: the limit itself
        (b"x" * 999 + b"\r\n", True),
        (b"a\r\n" + b"x" * 998, False),  # the last line, without its CRLF yet
        (b"a\r\n" + b"x" * 999, True),
        ((b"x" * 900 + b"\r\n") * 3, False),  # many lines near the limit add nothing up
        (b"", False),
    ],
)
def test_has_long_line_counts_octets_per_line(data: bytes, long: bool) -> None:
    assert has_long_line(data) is long
