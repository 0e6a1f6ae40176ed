"""`leafmail.envelope.load_json`, the strict JSON reader of spool records and requests.

Every spool read, status read and local request goes through it, so it must not build
a decoder per call, and it must still give its one error (EnvelopeError) for every way
a record can be wrong: the queue runner handles that error and no other.
"""

from __future__ import annotations

import json

import pytest

from leafmail.envelope import EnvelopeError, load_json

RECORD = '{"sender": "a@src.test", "recipients": ["b@dst.test"], "size": 3}'


def test_load_json_builds_no_decoder_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[json.JSONDecoder] = []
    original = json.JSONDecoder.__init__

    def counting(self: json.JSONDecoder, *args: object, **kwargs: object) -> None:
        built.append(self)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(json.JSONDecoder, "__init__", counting)
    for _ in range(50):
        assert load_json(RECORD.encode(), "record") == json.loads(RECORD)
        assert load_json(RECORD, "record") == json.loads(RECORD)
    assert built == []


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b'{"next_attempt": NaN}', "NaN is not a JSON number"),
        (b'{"next_attempt": -Infinity}', "-Infinity is not a JSON number"),
        (b"[" * 100_000 + b"]" * 100_000, "record is not JSON"),
        (b"1" * 5_000, "record is not JSON"),  # past int's digit limit
        (b'{"sender": "\xff"}', "record is not JSON"),  # not UTF-8
        (b'{"sender": ', "record is not JSON"),
        (b"", "record is not JSON"),
    ],
)
def test_load_json_gives_envelope_error_for_each_way_to_be_wrong(blob: bytes, why: str) -> None:
    with pytest.raises(EnvelopeError, match=why):
        load_json(blob, "record")
