"""Fuzz the readers of leafmail's stored and local-socket records.

A crafted spool file (the harness writes a matching checksum, so the fuzzer gets past
it to the envelope), a status record, a `leafmail sendmail` request line (and the
envelope check a local user's request then gets) and a control request. Checked: only
ValueError (EnvelopeError is one) escapes, so one bad file or request is set aside
instead of stopping a queue run or a service; the listing's peek accepts every file
the full reader accepts, and reads the same addresses.
"""

from __future__ import annotations

import contextlib
import hashlib

import atheris
from common import run

with atheris.instrument_imports():
    from leafmail import controlserver, pickup, spool, submitwire
    from leafmail.envelope import Envelope, Recipient
    from leafmail.status import MessageStatus, peek_next_attempt

_ENVELOPE = Envelope("a@b", (Recipient("c@d"), Recipient("e@f")))


def spool_file(env: bytes, data: bytes) -> bytes:
    """A spool file around `env` and `data` with lengths and checksum that agree."""
    digest = hashlib.sha256(env + data).hexdigest().encode()
    head = b"%s %d %d %s\n" % (spool.MAGIC, len(env), len(data), digest)
    return head + env + b"\n" + data + spool.TRAILER


def check_spool(blob: bytes) -> None:
    try:
        envelope, _ = spool.decode(blob)
    except ValueError:
        envelope = None
    try:
        env, _, _ = spool._checked(blob)
        peeked = spool._peek_envelope(env)
    except ValueError:
        assert envelope is None, "the listing refuses a file the reader accepts"
        return
    if envelope is not None:
        assert peeked == (envelope.sender, tuple(r.address for r in envelope.recipients))


def one_input(data: bytes) -> None:
    if not data:
        return
    kind, payload = data[0] % 5, data[1:]
    if kind == 0:
        check_spool(spool_file(payload, b"Subject: x\r\n\r\nhi\r\n"))
    elif kind == 1:
        check_spool(payload)
    elif kind == 2:
        with contextlib.suppress(ValueError):
            MessageStatus.from_bytes(payload, _ENVELOPE)
        peek_next_attempt(payload)
    elif kind == 3:
        try:
            request = submitwire.parse_request(payload)
        except ValueError:
            return
        with contextlib.suppress(pickup.Rejected):  # what a local user may not ask for
            pickup.checked_envelope(request.envelope, "mx.example")
    else:
        assert controlserver._command(payload) in (None, "flush", "wake")


if __name__ == "__main__":
    run(one_input)
