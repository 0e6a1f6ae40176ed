"""SMTP smuggling (SEC Consult 2023, CVE-2023-51764/51765/51766) against `leafmail serve`.

A client ends the real message with a sequence that is *not* CRLF.CRLF but that some
server reads as the end of DATA (LF.LF, CR.CR, LF.CRLF ...), follows it with a complete
second transaction (MAIL FROM a forged sender, RCPT TO a victim, DATA, a body), and
only then sends the real CRLF.CRLF. A server that takes the fake end answers two
messages; one that takes the bytes as data but relays them unchanged hands the fake end
to the next hop, which may split them there. RFC 5321 4.1.1.4: only CRLF.CRLF ends DATA.

Acceptable here: one reply for everything, and either no message (``bare_lf =
"reject"``, 554 5.6.0) or exactly one with the original envelope whose bare CR/LF were
made CRLF (``"replace"``), which leafmail must relay dot-stuffed, with no sequence a
lenient next hop could take for an end (checked at aiosmtpd and on the raw wire). BDAT
has no terminator at all: a chunk holding CRLF.CRLF and commands is data, and chunk
sizes that lie only move the line between data and commands within one session.

Under ``make soak`` every case is repeated with the same bytes cut into random writes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import soak
from attack_support import (
    EVIL,
    RCPT,
    SENDER,
    VICTIM,
    RawCapture,
    codes,
    config,
    flush,
    has_bare_newline,
    loose_ends,
    open_transaction,
    record,
    repair,
    replies_until_close,
    send_split,
    session,
)
from leafmail_fixtures import Leafmail, LeafmailFactory, leafmail_servers, split_received
from smarthost import Smarthost

from leafmail.spool import SpooledMessage

pytestmark = pytest.mark.timeout(soak.scaled(60, 600))

FAKE_ENDS = {
    "lf.crlf": b"\n.\r\n",
    "lf.lf": b"\n.\n",
    "cr.cr": b"\r.\r",
    "crlf.cr": b"\r\n.\r",
    "crlf.lf": b"\r\n.\n",
    "cr.crlf": b"\r.\r\n",
}
NUL_END = b"\r\n\x00.\r\n"  # not a fake end here, but one for a NUL-dropping next hop
SMUGGLED = (
    f"MAIL FROM:<{EVIL}>\r\nRCPT TO:<{VICTIM}>\r\nDATA\r\n"
    f"From: <{EVIL}>\r\nTo: <{VICTIM}>\r\nSubject: smuggled\r\n\r\nowned\r\n"
).encode()
SPLITS = soak.scaled(1, 40)  # the one-write form, plus random cuts under soak


def attack_stream(fake_end: bytes, tag: str) -> bytes:
    """The DATA body of one attack, real terminator and a NOOP and QUIT after it."""
    head = f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: real {tag}\r\n\r\nbody".encode()
    return head + fake_end + SMUGGLED + b".\r\nNOOP\r\nQUIT\r\n"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path_factory.mktemp("smuggling"))


@pytest.fixture(scope="module")
def rejecting(shared: LeafmailFactory) -> Leafmail:
    return shared(config("reject"))


@pytest.fixture(scope="module")
def replacing(shared: LeafmailFactory) -> Leafmail:
    return shared(config("replace"))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def new_messages(server: Leafmail, before: set[str]) -> list[SpooledMessage]:
    return [m for m in server.messages() if m.qid not in before]


def smuggle(server: Leafmail, fake_end: bytes, tag: str, rng: random.Random | None) -> list[int]:
    """Run one attack in a fresh session; the reply codes after the 354."""
    with session(server) as client:
        open_transaction(client)
        send_split(client, attack_stream(fake_end, tag), rng)
        return codes(replies_until_close(client))


def rngs(name: str) -> list[random.Random | None]:
    """One write first, then seeded random cuts (the seed names the case, to replay it)."""
    return [None] + [random.Random(f"{name}/{i}") for i in range(1, SPLITS)]


@pytest.mark.parametrize("name", list(FAKE_ENDS))
def test_fake_end_with_bare_lf_reject_is_one_refused_message(
    rejecting: Leafmail, name: str
) -> None:
    before = set(rejecting.queue_ids())
    for rng in rngs(name):
        got = smuggle(rejecting, FAKE_ENDS[name], name, rng)
        # One 554 for the whole stream, the NOOP, the QUIT; never a 354 or a second 250.
        assert got == [554, 250, 221], (name, got)
    assert new_messages(rejecting, before) == []
    record(f"smuggling {name} (bare_lf=reject)", "rejected 554 5.6.0", tries=SPLITS, spooled=0)


@pytest.mark.parametrize("name", list(FAKE_ENDS))
def test_fake_end_with_bare_lf_replace_is_one_repaired_message(
    replacing: Leafmail, name: str
) -> None:
    before = set(replacing.queue_ids())
    for rng in rngs(name):
        got = smuggle(replacing, FAKE_ENDS[name], name, rng)
        assert got == [250, 250, 221], (name, got)
    spooled = new_messages(replacing, before)
    assert len(spooled) == SPLITS
    for msg in spooled:
        check_one_repaired(msg, name)
    record(f"smuggling {name} (bare_lf=replace)", "one message", tries=SPLITS, spooled=SPLITS)


@pytest.mark.parametrize("policy", ["reject", "replace"])
def test_nul_dot_fake_end_is_refused_under_both_policies(
    rejecting: Leafmail, replacing: Leafmail, policy: str
) -> None:
    """CRLF NUL "." CRLF: the scanner's end for next hops that drop NUL octets.

    leafmail is not fooled by it, but it must not store it either, or it would hand
    the sequence to such a next hop: NUL is refused whatever bare_lf says.
    """
    server = rejecting if policy == "reject" else replacing
    before = set(server.queue_ids())
    for rng in rngs(f"nul/{policy}"):
        got = smuggle(server, NUL_END, f"nul {policy}", rng)
        assert got == [554, 250, 221], (policy, got)
    assert new_messages(server, before) == []
    record(f"smuggling crlf.nul.dot (bare_lf={policy})", "rejected 554 5.6.0", spooled=0)


def check_one_repaired(msg: SpooledMessage, tag: str) -> None:
    """The original envelope; the smuggled text is data with CRLF line ends only."""
    assert msg.envelope.sender == SENDER
    assert [r.address for r in msg.envelope.recipients] == [RCPT]
    _, data = split_received(msg.data)
    assert f"Subject: real {tag}\r\n".encode() in data
    assert f"RCPT TO:<{VICTIM}>\r\n".encode() in data  # kept as text, not obeyed
    assert data.endswith(b"owned\r\n")
    assert not has_bare_newline(data), data


def test_message_ends_only_at_crlf_dot_crlf_after_many_fakes(replacing: Leafmail) -> None:
    """Every fake end in one body: still one message, all of it."""
    before = set(replacing.queue_ids())
    body = b"".join(b"line" + end + SMUGGLED for end in FAKE_ENDS.values())
    with session(replacing) as client:
        open_transaction(client)
        client.send(b"Subject: all fakes\r\n\r\n" + body + b".\r\nQUIT\r\n")
        assert codes(replies_until_close(client)) == [250, 221]
    [msg] = new_messages(replacing, before)
    _, data = split_received(msg.data)
    assert data.count(b"Subject: smuggled\r\n") == len(FAKE_ENDS)
    assert not has_bare_newline(data)
    record("smuggling all fake ends in one body", "one message", spooled=1)


# --- BDAT ------------------------------------------------------------------------------


def bdat(chunk: bytes, last: bool = True) -> bytes:
    return b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk


CHUNK_WITH_COMMANDS = b"Subject: chunk\r\n\r\nbody\r\n.\r\n" + SMUGGLED + b".\r\n"


def test_bdat_chunk_holding_a_terminator_and_commands_is_data(rejecting: Leafmail) -> None:
    """RFC 3030: a chunk is octets; CRLF.CRLF and commands inside it mean nothing."""
    before = set(rejecting.queue_ids())
    with session(rejecting) as client:
        open_transaction(client, data=False)
        client.send(bdat(CHUNK_WITH_COMMANDS) + b"NOOP\r\nQUIT\r\n")
        assert codes(replies_until_close(client)) == [250, 250, 221]
    [msg] = new_messages(rejecting, before)
    assert [r.address for r in msg.envelope.recipients] == [RCPT]
    assert split_received(msg.data)[1] == CHUNK_WITH_COMMANDS
    record("bdat chunk with CRLF.CRLF and commands", "one message, verbatim", spooled=1)


@pytest.mark.parametrize("bare", [b"\n", b"\r"], ids=["lf", "cr"])
@pytest.mark.parametrize("policy", ["reject", "replace"])
def test_bdat_bare_newline_follows_the_policy(
    rejecting: Leafmail, replacing: Leafmail, policy: str, bare: bytes
) -> None:
    server = rejecting if policy == "reject" else replacing
    before = set(server.queue_ids())
    first = b"Subject: bare in bdat\r\n\r\nline" + bare + b"."
    second = bare + SMUGGLED + b"end\r\n"
    with session(server) as client:
        open_transaction(client, data=False)
        client.send(bdat(first, last=False) + bdat(second) + b"NOOP\r\nQUIT\r\n")
        got = codes(replies_until_close(client))
    spooled = new_messages(server, before)
    if policy == "reject":
        assert got == [250, 554, 250, 221]
        assert spooled == []
    else:
        assert got == [250, 250, 250, 221]
        [msg] = spooled
        _, data = split_received(msg.data)
        assert data == repair(first + second)
        assert [r.address for r in msg.envelope.recipients] == [RCPT]
    outcome = "rejected 554" if policy == "reject" else "one repaired message"
    record(f"bdat bare {bare!r} (bare_lf={policy})", outcome, spooled=len(spooled))


def test_bdat_chunk_with_nul_is_refused(replacing: Leafmail) -> None:
    before = set(replacing.queue_ids())
    chunk = b"Subject: nul in bdat\r\n\r\nbody" + NUL_END + SMUGGLED
    with session(replacing) as client:
        open_transaction(client, data=False)
        client.send(bdat(chunk) + b"NOOP\r\nQUIT\r\n")
        assert codes(replies_until_close(client)) == [554, 250, 221]
    assert new_messages(replacing, before) == []
    record("bdat chunk with crlf.nul.dot", "rejected 554 5.6.0", spooled=0)


def test_bdat_size_larger_than_sent_swallows_the_commands(rejecting: Leafmail) -> None:
    """Commands sent inside an announced chunk are data; no second envelope appears."""
    before = set(rejecting.queue_ids())
    head = b"Subject: lie\r\n\r\n"
    inside = b"RSET\r\n" + SMUGGLED + b".\r\n"
    pad = b"x" * 40 + b"\r\n"
    chunk = head + inside + pad
    with session(rejecting) as client:
        open_transaction(client, data=False)
        client.send(b"BDAT %d LAST\r\n" % len(chunk) + head + inside)
        client.send(pad + b"NOOP\r\nQUIT\r\n")
        assert codes(replies_until_close(client)) == [250, 250, 221]
    [msg] = new_messages(rejecting, before)
    assert split_received(msg.data)[1] == chunk
    assert msg.envelope.sender == SENDER
    record("bdat size larger than sent", "commands kept as data", spooled=1)


def test_bdat_size_smaller_than_sent_ends_the_chunk_exactly(rejecting: Leafmail) -> None:
    """The octets after the announced size are commands of the same client, in order."""
    before = set(rejecting.queue_ids())
    chunk = b"Subject: short\r\n\r\nok\r\n"
    after = f"MAIL FROM:<{EVIL}>\r\nRCPT TO:<{VICTIM}>\r\nBDAT 4 LAST\r\nevil".encode()
    with session(rejecting) as client:
        open_transaction(client, data=False)
        client.send(bdat(chunk) + after + b"QUIT\r\n")
        got = replies_until_close(client)
    assert codes(got) == [250, 250, 250, 250, 221]
    spooled = sorted(new_messages(rejecting, before), key=lambda m: m.envelope.sender)
    assert [(m.envelope.sender, split_received(m.data)[1]) for m in spooled] == [
        (SENDER, chunk),
        (EVIL, b"evil"),
    ]
    record("bdat size smaller than sent", "exact chunk, rest are commands", spooled=2)


# --- what goes to the next hop ---------------------------------------------------------


def spool_all_attacks(server: Leafmail) -> int:
    """Every DATA and BDAT smuggling attempt into `server` (bare_lf = replace)."""
    count = 0
    for name, fake_end in FAKE_ENDS.items():
        assert smuggle(server, fake_end, name, None) == [250, 250, 221]
        count += 1
    with session(server) as client:
        open_transaction(client, data=False)
        client.send(bdat(CHUNK_WITH_COMMANDS) + b"QUIT\r\n")
        assert codes(replies_until_close(client)) == [250, 221]
    return count + 1


def test_relayed_attacks_reach_aiosmtpd_as_single_messages(
    servers: LeafmailFactory, tmp_path: Path, sink: Smarthost
) -> None:
    server = servers(config("replace"))
    sent = spool_all_attacks(server)
    done = flush(tmp_path, server, sink.address)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(sink.received) == sent
    for got in sink.received:
        assert (got.sender, got.recipients) == (SENDER, [RCPT])
        assert not has_bare_newline(got.content)
    assert sink.connections >= 1 and server.queue_ids() == []
    record("smuggling relayed to aiosmtpd", "one message each", sent=sent, received=sent)


def test_relayed_attacks_have_no_loose_end_on_the_wire(
    servers: LeafmailFactory, tmp_path: Path
) -> None:
    """The raw DATA leafmail sends: dot-stuffed, CRLF only, one terminator at the end."""
    server = servers(config("replace"))
    sent = spool_all_attacks(server)
    capture = RawCapture()
    try:
        done = flush(tmp_path, server, capture.address)
    finally:
        capture.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(capture.messages) == sent
    for data in capture.messages:
        assert not has_bare_newline(data), data
        assert loose_ends(b"\r\n" + data) == [b"\r\n.\r\n"], data
        assert data.endswith(b"\r\n.\r\n")
    mails = [c for c in capture.commands if c.upper().startswith(b"MAIL")]
    assert len(mails) == sent and all(EVIL.encode() not in c for c in mails)
    record("smuggling relayed on the raw wire", "no loose end", sent=sent, received=sent)
