"""The local delivery service's request header (leafmail.localsvc.parse_request).

Only the queue manager may ask (SO_PEERCRED), but a header of the wrong shape must end
as a ValueError, which the service logs as one failed request, and never as a TypeError
or AttributeError escaping the connection's task (found while fuzzing).
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from leafmail.delivery import Handoff, Outcome, Result
from leafmail.envelope import Envelope, Recipient
from leafmail.expansion import RecordedExpansions
from leafmail.localsvc import (
    LocalClient,
    _conversation,
    _decode_results,
    _encode_results,
    _settled,
    parse_request,
)
from leafmail.message import AttemptOutcome, attempt, success_action
from leafmail.retry import RetryPolicy
from leafmail.spool import Spool
from leafmail.status import MessageStatus, RcptState


def envelope_json() -> dict[str, Any]:
    """A valid envelope of two recipients, as the queue manager sends it."""
    return Envelope(
        "a@example.org", (Recipient("b@example.org"), Recipient("c@example.org"))
    ).to_json()


def test_a_well_formed_request_is_read() -> None:
    head = {"envelope": envelope_json(), "rcpts": [0, 1, 7], "known": {}}
    envelope, rcpts, known = parse_request(head)
    assert [r.address for r in envelope.recipients] == ["b@example.org", "c@example.org"]
    assert rcpts == [0, 1]  # an index past the recipients is dropped
    assert known == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rcpts", [None]),
        ("rcpts", [[0]]),
        ("known", [1, 2]),
        ("known", {"0": [1, 2]}),
        ("known", {"x": {}}),
        ("known", {"0": {"t": None}}),
        ("known", {"0": {"t": ["nonsense", 250, "2.0.0", "ok", ""]}}),
    ],
)
def test_a_header_of_the_wrong_shape_is_a_value_error(field: str, value: object) -> None:
    head: dict[str, object] = {"envelope": envelope_json(), "rcpts": [0], "known": {}}
    head[field] = value
    with pytest.raises(ValueError, match=r"bad request|nonsense|invalid literal"):
        parse_request(head)


def test_a_settled_line_from_the_service_is_recorded_at_once(tmp_path: Path) -> None:
    """The root-side service tells the queue manager, mid-delivery, which recipients are
    done (`RelayedExpansions.settled`); the queue manager's side of the conversation
    records them in the message's status before the delivery's answer comes."""
    spool = Spool(tmp_path / "spool")
    envelope = Envelope.from_json(envelope_json())
    qid = spool.commit(envelope, b"Subject: x\r\n\r\nbody\r\n")
    record = RecordedExpansions(spool, qid, MessageStatus.fresh(envelope, 0.0), envelope)
    settled = {"settled": {"0": ["delivered", 250, "2.0.0", "delivered to bob", ""]}}
    lines = [settled, {"results": {}}]

    async def converse() -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        reader.feed_eof()
        return await _conversation(reader, cast(asyncio.StreamWriter, None), record)

    assert json.loads(asyncio.run(converse())) == {"results": {}}
    blob = spool.read_status(qid)
    assert blob is not None
    status = MessageStatus.from_bytes(blob, envelope)
    assert [r.state for r in status.recipients] == [RcptState.DELIVERED, RcptState.PENDING]


@pytest.mark.parametrize("value", [None, [1], {"0": None}, {"x": []}, {"0": ["nonsense"]}])
def test_a_settled_line_of_the_wrong_shape_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="bad settled line"):
        _settled(value)


def test_a_recipient_settled_before_the_service_died_stays_delivered(tmp_path: Path) -> None:
    """The root-side service reports one recipient delivered (a "settled" line) and then
    dies before its results line (killed, restarted by a reload). The queue manager
    defers every recipient of that request ("gave no answer"), but the one recorded as
    delivered has the message: the attempt's own record must not turn it back into a
    deferral, or the next attempt sends it again."""
    spool = Spool(tmp_path / "spool")
    envelope = Envelope.from_json(envelope_json())
    qid = spool.commit(envelope, b"Subject: x\r\n\r\nbody\r\n")
    name = str(tmp_path / "local.sock")
    settled = {"settled": {"0": ["delivered", 250, "2.0.0", "delivered to b", ""]}}

    async def dying_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (size,) = struct.unpack("!I", await reader.readexactly(4))
        await reader.readexactly(size)
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        await reader.readexactly(length)
        writer.write(json.dumps(settled).encode() + b"\n")
        await writer.drain()
        writer.close()  # no results line: the service is gone

    async def run() -> None:
        server = await asyncio.start_unix_server(dying_service, path=name)
        async with server:
            done = await attempt(
                spool, qid, LocalClient(name.encode()), RetryPolicy(), hostname="mx.test", now=1.0
            )
        assert done.verdict is AttemptOutcome.DEFERRED

    asyncio.run(run())
    blob = spool.read_status(qid)
    assert blob is not None
    status = MessageStatus.from_bytes(blob, envelope)
    assert [r.state for r in status.recipients] == [RcptState.DELIVERED, RcptState.DEFERRED]


def test_a_forward_s_handoff_crosses_the_service_boundary() -> None:
    """An alias forwarded to one target is delivered with Handoff.PASSED: the copy
    carries NOTIFY on and reports success itself (RFC 3461 6.2.7.3), so the queue
    manager must send no success report of its own. The results line must carry that,
    or under privilege separation a NOTIFY=SUCCESS sender gets two reports: a
    "delivered" for the alias, and the copy's."""
    forwarded = replace(
        Result(Outcome.DELIVERED, 250, "2.0.0", "forwarded to b@example.org as X"),
        handoff=Handoff.PASSED,
    )
    line = json.dumps({"results": _encode_results({0: forwarded})}).encode()
    [got] = _decode_results(line, [0]).values()
    assert got == forwarded
    assert success_action(got, 1) is None
