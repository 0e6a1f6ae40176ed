"""Fuzz the sans-I/O SMTP server engine with arbitrary chunks and decisions.

The input chooses the configuration, the newline policy, how the client's bytes are
cut into chunks and how every decision is answered (accept, reject 4xx/5xx, 421).
Checked for every input: no exception but the engine's documented ones, every reply
line is ``DDD SP|-`` text ending in CRLF and at most 512 octets (RFC 5321 4.5.3.1.5),
a multi-line reply keeps one code, the same bytes fed in one piece get the same
replies as in chunks (an answer must not depend on packet boundaries), and the CPU
a session takes stays within a fixed allowance plus a bound per octet.
"""

from __future__ import annotations

import itertools
import re
import time

import atheris
from common import keep_if_slow, run

with atheris.instrument_imports():
    from netserver.smtp import (
        BareNewline,
        Closed,
        DecisionEvent,
        ServerConfig,
        ServerProtocol,
        StartTLS,
    )
    from netserver.smtp.replies import Reply

ALLOWANCE = 0.02  # CPU seconds any session may take, instrumented
PER_OCTET = 20e-6  # and per octet of input: past both, the input is kept as slow
_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])[^\r\n]*\r\n")
_POLICIES = list(BareNewline)
_REJECTIONS = (
    Reply(450, "4.7.1", "try later"),
    Reply(550, "5.7.1", "refused"),
    Reply(421, "4.7.0", "closing"),
)


def _check_replies(out: bytes) -> None:
    """Every line well formed and short; continuation lines keep their code."""
    pos = 0
    code: bytes | None = None
    while pos < len(out):
        match = _LINE.match(out, pos)
        assert match is not None, f"malformed reply at {pos}: {out[pos : pos + 80]!r}"
        assert match.end() - pos <= 512, f"reply line of {match.end() - pos} octets"
        if code is not None:
            assert match.group(1) == code, f"code changed inside a reply: {out!r}"
        code = match.group(1) if match.group(2) == b"-" else None
        pos = match.end()
    assert code is None, "a reply ended on a continuation line"


def _session(config: ServerConfig, chunks: list[bytes], answers: bytes) -> tuple[bytes, int]:
    """Run one session; return everything it sent and how much of it came before TLS.

    The bytes after a STARTTLS line are plaintext dropped unseen when they came in the
    same read and TLS input when they came later, so replies are comparable up to the
    220 for STARTTLS only.
    """
    proto = ServerProtocol(config)
    sent = [proto.data_to_send()]
    turn = 0
    before_tls = -1
    for chunk in chunks:
        events = proto.receive_data(chunk)
        while events:
            last = events[-1]
            if isinstance(last, StartTLS):
                sent.append(proto.data_to_send())
                if before_tls < 0:
                    before_tls = sum(map(len, sent))
                proto.tls_started()
            elif isinstance(last, DecisionEvent):
                choice = answers[turn % len(answers)] if answers else 0
                turn += 1
                if choice % 4 == 3:
                    proto.reject(_REJECTIONS[choice % len(_REJECTIONS)])
                else:
                    proto.accept()
            elif isinstance(last, Closed):
                break
            else:
                raise AssertionError(f"unexpected last event {last!r}")
            events = proto.resume()
        sent.append(proto.data_to_send())
        if proto.closed:
            break
    out = b"".join(sent)
    return out, len(out) if before_tls < 0 else before_tls


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    flags = fdp.ConsumeInt(1)
    config = ServerConfig(
        "mx.example",
        max_message_size=fdp.ConsumeIntInRange(1, 4096),
        max_recipients=fdp.ConsumeIntInRange(1, 4),
        max_errors=fdp.ConsumeIntInRange(0, 30),
        max_junk_commands=fdp.ConsumeIntInRange(0, 5),
        tls_available=bool(flags & 1),
        auth_enabled=bool(flags & 2),
        auth_plaintext_allowed=bool(flags & 4),
        bare_newline=_POLICIES[(flags >> 3) % len(_POLICIES)],
    )
    answers = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
    cuts = sorted(set(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 12), 0, 4096)))
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    edges = [0, *[c for c in cuts if 0 < c < len(body)], len(body)]
    chunks = [body[a:b] for a, b in itertools.pairwise(edges)]
    started = time.process_time()
    chunked, tls_at = _session(config, chunks, answers)
    keep_if_slow(data, time.process_time() - started, ALLOWANCE + PER_OCTET * len(data))
    _check_replies(chunked)
    whole, whole_tls_at = _session(config, [body], answers)
    if tls_at < len(chunked) or whole_tls_at < len(whole):
        chunked, whole = chunked[:tls_at], whole[:whole_tls_at]
    assert whole == chunked, f"replies depend on chunking:\n{whole!r}\n{chunked!r}"


if __name__ == "__main__":
    run(one_input)
