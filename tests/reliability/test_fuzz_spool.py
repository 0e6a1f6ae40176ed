"""Fuzzing the spool reader (leafmail.spool) and the status/envelope records.

A spool file is trusted only after its self-check; a damaged one must come out as the
documented error (`decode`: ValueError; `Spool.get`: CorruptMessage, the file moved to
corrupt/ intact; `Spool.messages`: yielded, not raised), never as another exception,
never as a hang, and never lost.  A status record has no checksum, so its reader must
cope with anything: `MessageStatus.from_bytes` raises EnvelopeError, and
`peek_next_attempt` reads a damaged record as "due now" (0.0).

Mutations: bit flips, truncation, insertions, header fields replaced, and the envelope
JSON replaced by arbitrary JSON with the checksum recomputed (so the JSON reader and
`Envelope.from_json` are reached, not just the checksum).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import soak
from fuzz_support import Tally, budget
from hypothesis import example, given
from hypothesis import strategies as st

from leafmail.envelope import ClientInfo, Envelope, EnvelopeError, Recipient
from leafmail.queue import QueueRunner
from leafmail.retry import RetryPolicy
from leafmail.spool import MAGIC, TRAILER, CorruptMessage, Spool, decode, encode, new_id
from leafmail.states import QueueState
from leafmail.status import (
    MessageStatus,
    RcptState,
    RcptStatus,
    TargetMark,
    TargetState,
    peek_next_attempt,
)

# --- strategies ------------------------------------------------------------------------

odd_text = st.text(max_size=30) | st.sampled_from(['"a b"@x', "<>", "ü@ü.example", "\x00", "\\"])
opt_text = st.none() | odd_text
recipients = st.builds(
    Recipient,
    odd_text,
    st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY", "NEVER"]), max_size=3).map(tuple),
    opt_text,
)
clients = st.builds(
    ClientInfo,
    opt_text,
    st.none() | st.integers(0, 2**70),
    opt_text,
    odd_text,
    opt_text,
    opt_text,
)
envelopes = st.builds(
    Envelope,
    odd_text,
    st.lists(recipients, min_size=1, max_size=4).map(tuple),
    clients,
    odd_text,
    odd_text,
    st.booleans(),
    opt_text,
    opt_text,
)
bodies = st.binary(max_size=300) | st.sampled_from([b"", b"\n", TRAILER, MAGIC + b" 1 1 x\n"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


def with_checksum(env: bytes, data: bytes) -> bytes:
    """A spool file around arbitrary envelope bytes, with a correct header and trailer."""
    digest = hashlib.sha256(env + data).hexdigest().encode()
    return b"%s %d %d %s\n" % (MAGIC, len(env), len(data), digest) + env + b"\n" + data + TRAILER


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes, str]:
    """(original, damaged, kind of damage) spool file bytes."""
    blob = encode(draw(envelopes), draw(bodies))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "header", "json", "fields"]))
    if kind == "flip":
        at = draw(st.integers(0, len(blob) - 1))
        damaged = blob[:at] + bytes([blob[at] ^ (1 << draw(st.integers(0, 7)))]) + blob[at + 1 :]
    elif kind == "truncate":
        damaged = blob[: draw(st.integers(0, len(blob) - 1))]
    elif kind == "insert":
        at = draw(st.integers(0, len(blob)))
        damaged = blob[:at] + draw(st.binary(min_size=1, max_size=8)) + blob[at:]
    elif kind == "header":
        fields = blob[: blob.index(b"\n")].split(b" ")
        index = draw(st.integers(0, len(fields) - 1))
        fields[index] = draw(st.binary(max_size=12) | st.sampled_from([b"-1", b"0", b"9" * 30]))
        damaged = b" ".join(fields) + blob[blob.index(b"\n") :]
    elif kind == "json":
        env = json.dumps(draw(json_values)).encode()
        damaged = with_checksum(env, draw(bodies))
    else:
        damaged = with_checksum(mutate_fields(draw(envelopes), draw), b"body")
    return blob, damaged, kind


def mutate_fields(envelope: Envelope, draw: st.DrawFn) -> bytes:
    """The envelope's JSON with one field (maybe nested) dropped, renamed or retyped."""
    record: dict[str, Any] = envelope.to_json()
    target = record
    where = draw(st.sampled_from(["top", "client", "recipient"]))
    if where == "client":
        target = record["client"]
    elif where == "recipient":
        target = record["recipients"][0]
    key = draw(st.sampled_from(sorted(target)))
    action = draw(st.sampled_from(["drop", "rename", "retype"]))
    if action == "drop":
        del target[key]
    elif action == "rename":
        target[key + "x"] = target.pop(key)
    else:
        target[key] = draw(json_values)
    return json.dumps(record).encode()


# --- encode/decode -----------------------------------------------------------------------

TALLY_ROUND = Tally("spool.round-trip")


@budget(80, 30_000)
@given(envelope=envelopes, data=bodies)
@TALLY_ROUND.count
def _fuzz_round_trip(envelope: Envelope, data: bytes) -> None:
    assert decode(encode(envelope, data)) == (envelope, data)


@pytest.mark.timeout(soak.scaled(60, 900))
def test_encode_decode_round_trip() -> None:
    with TALLY_ROUND.recorded():
        _fuzz_round_trip()


TALLY_DECODE = Tally("spool.decode-mutated")


@budget(200, 60_000)
@given(pair=mutated())
@example(pair=(b"", with_checksum(b"[" * 100_000 + b"]" * 100_000, b"x"), "json"))
@TALLY_DECODE.count
def _fuzz_decode(pair: tuple[bytes, bytes, str]) -> None:
    original, damaged, kind = pair
    if damaged.count(b"[") > 10_000:
        return  # pinned by test_deeply_nested_envelope_is_corrupt
    try:
        envelope, data = decode(damaged)
    except ValueError:
        return
    # Damage the checksum does not cover cannot exist: accepted bytes are the original.
    if kind in ("flip", "truncate", "insert", "header"):
        assert damaged == original, "damage went undetected"
    # JSON rewritten under a fresh checksum: only a well-formed envelope gets through.
    assert isinstance(envelope, Envelope) and envelope.recipients
    assert decode(encode(envelope, data)) == (envelope, data)


@pytest.mark.timeout(soak.scaled(60, 900))
def test_damaged_files_give_value_error() -> None:
    with TALLY_DECODE.recorded():
        _fuzz_decode()


# --- the reader on a real spool directory ----------------------------------------------

TALLY_SPOOL = Tally("spool.get-and-messages")


@budget(20, 3_000)
@given(files=st.lists(mutated(), min_size=1, max_size=4), keep=st.lists(st.booleans()))
@TALLY_SPOOL.count
def _fuzz_spool_dir(root: Path, files: list[tuple[bytes, bytes, str]], keep: list[bool]) -> None:
    """Damaged files go to corrupt/ byte for byte; nothing vanishes; good ones load."""
    spool = Spool(root / new_id())
    written: dict[str, bytes] = {}
    for index, (original, damaged, _kind) in enumerate(files):
        blob = original if index < len(keep) and keep[index] else damaged
        qid = new_id()
        (spool.root / "queue" / qid).write_bytes(blob)
        written[qid] = blob
    seen: set[str] = set()
    for item in spool.messages(QueueState.QUEUE):
        if isinstance(item, CorruptMessage):
            qid = str(item).split(":")[0]
            assert (spool.root / "corrupt" / qid).read_bytes() == written[qid]
            assert not (spool.root / "queue" / qid).exists()
        else:
            qid = item.qid
            assert decode(written[qid]) == (item.envelope, item.data)
            assert (spool.root / "queue" / qid).read_bytes() == written[qid]
        seen.add(qid)
    assert seen == set(written), "a message vanished from the listing"
    assert set(spool.ids(QueueState.QUEUE)) | set(spool.ids(QueueState.CORRUPT)) == set(written)
    for qid in spool.ids(QueueState.CORRUPT):
        with pytest.raises(KeyError):
            spool.get(qid)  # corrupt/ is never parsed again


@pytest.mark.timeout(soak.scaled(60, 900))
def test_reader_moves_damaged_files_to_corrupt(tmp_path: Path) -> None:
    with TALLY_SPOOL.recorded():
        _fuzz_spool_dir(tmp_path)


# --- status records ----------------------------------------------------------------------

marks = st.builds(
    TargetMark,
    odd_text,
    st.sampled_from(list(TargetState)),
    odd_text,
    st.just("") | st.from_regex(r"\A[0-9A-F]{24}\Z"),
)
statuses = st.builds(
    RcptStatus,
    st.sampled_from(list(RcptState)),
    st.integers(0, 10**6),
    odd_text,
    odd_text,
    st.lists(marks, max_size=3).map(tuple),
)


@st.composite
def status_blobs(draw: st.DrawFn) -> tuple[Envelope, bytes]:
    envelope = draw(envelopes)
    rcpts = tuple(draw(statuses) for _ in envelope.recipients)
    number = st.floats(0, 1e10, allow_nan=False)
    status = MessageStatus(
        draw(number), rcpts, draw(number), draw(number), draw(st.integers(0, 99))
    )
    blob = status.to_bytes()
    kind = draw(st.sampled_from(["same", "flip", "truncate", "json", "value"]))
    if kind == "flip":
        at = draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([blob[at] ^ (1 << draw(st.integers(0, 7)))]) + blob[at + 1 :]
    elif kind == "truncate":
        blob = blob[: draw(st.integers(0, len(blob)))]
    elif kind == "json":
        blob = json.dumps(draw(json_values)).encode()
    elif kind == "value":
        record = json.loads(blob)
        record[draw(st.sampled_from(sorted(record)))] = draw(json_values)
        blob = json.dumps(record).encode()
    return envelope, blob


TALLY_STATUS = Tally("spool.status-records")


@budget(150, 60_000)
@given(pair=status_blobs())
@TALLY_STATUS.count
def _fuzz_status(pair: tuple[Envelope, bytes]) -> None:
    envelope, blob = pair
    when = peek_next_attempt(blob)
    assert isinstance(when, float) and math.isfinite(when)
    try:
        status = MessageStatus.from_bytes(blob, envelope)
    except EnvelopeError:
        return
    assert len(status.recipients) == len(envelope.recipients)
    assert MessageStatus.from_bytes(status.to_bytes(), envelope) == status
    assert when == status.next_attempt


@pytest.mark.timeout(soak.scaled(60, 900))
def test_status_records_give_envelope_error() -> None:
    with TALLY_STATUS.recorded():
        _fuzz_status()


# --- crashes found, kept as regression tests ---------------------------------------------

ONE_RCPT = Envelope("a@b.example", (Recipient("c@d.example"),))
HUGE = b"1" + b"0" * 400  # a JSON integer too big for a float


def status_with(field: str, raw: bytes) -> bytes:
    blob = MessageStatus.fresh(ONE_RCPT, 1.0).to_bytes()
    record = json.loads(blob)
    record[field] = "@@"
    return json.dumps(record).encode().replace(b'"@@"', raw)


def test_deeply_nested_envelope_is_corrupt(tmp_path: Path) -> None:
    """A checksummed file whose envelope is deeply nested JSON: corrupt, moved aside."""
    spool = Spool(tmp_path / "spool")
    qid = new_id()
    (spool.root / "queue" / qid).write_bytes(with_checksum(b"[" * 100_000 + b"]" * 100_000, b"x"))
    with pytest.raises(CorruptMessage):
        spool.get(qid)
    assert (spool.root / "corrupt" / qid).exists()


def test_peek_huge_integer_reads_as_due() -> None:
    assert peek_next_attempt(status_with("next_attempt", HUGE)) == 0.0


def test_peek_overlong_integer_reads_as_due() -> None:
    assert peek_next_attempt(status_with("next_attempt", b"1" * 5000)) == 0.0


def test_peek_deep_nesting_reads_as_due() -> None:
    assert peek_next_attempt(b"[" * 100_000) == 0.0


def test_peek_nan_reads_as_due() -> None:
    assert math.isfinite(peek_next_attempt(status_with("next_attempt", b"NaN")))


def test_status_huge_arrival_is_envelope_error() -> None:
    with pytest.raises(EnvelopeError):
        MessageStatus.from_bytes(status_with("arrival", HUGE), ONE_RCPT)


def test_status_overlong_integer_is_envelope_error() -> None:
    with pytest.raises(EnvelopeError):
        MessageStatus.from_bytes(status_with("attempts", b"1" * 5000), ONE_RCPT)


def test_status_deep_nesting_is_envelope_error() -> None:
    with pytest.raises(EnvelopeError):
        MessageStatus.from_bytes(b"[" * 100_000, ONE_RCPT)


def test_runner_scan_survives_a_damaged_status(tmp_path: Path) -> None:
    """The queue runner's scan over deferred mail, with one bad status record.

    The damaged record must read as "due now"; the other deferred message must still
    be listed.  What happens: OverflowError out of `QueueRunner.due`, every pass.
    """
    spool = Spool(tmp_path / "spool")
    bad, good = spool.commit(ONE_RCPT, b"x"), spool.commit(ONE_RCPT, b"y")
    for qid in (bad, good):
        spool.move(qid, QueueState.QUEUE, QueueState.DEFERRED)
    spool.write_status(bad, status_with("next_attempt", HUGE))
    spool.write_status(good, status_with("next_attempt", b"5"))
    runner = QueueRunner(spool, None, RetryPolicy(), hostname="mx.test")
    assert set(runner.due(now=10.0)) == {bad, good}
