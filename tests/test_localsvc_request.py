"""The local delivery service's request header (leafmail.localsvc.parse_request).

Only the queue manager may ask (SO_PEERCRED), but a header of the wrong shape must end
as a ValueError, which the service logs as one failed request, and never as a TypeError
or AttributeError escaping the connection's task (found while fuzzing).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest

from leafmail.envelope import Envelope, Recipient
from leafmail.expansion import RecordedExpansions
from leafmail.localsvc import _conversation, _settled, parse_request
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
