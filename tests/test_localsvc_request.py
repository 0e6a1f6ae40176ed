"""The local delivery service's request header (leafmail.localsvc.parse_request).

Only the queue manager may ask (SO_PEERCRED), but a header of the wrong shape must end
as a ValueError, which the service logs as one failed request, and never as a TypeError
or AttributeError escaping the connection's task (found while fuzzing).
"""

from __future__ import annotations

from typing import Any

import pytest

from leafmail.envelope import Envelope, Recipient
from leafmail.localsvc import parse_request


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
