"""What the SMTP path computes once instead of once a message (issue 12, CPU a message).

Each cache must give what a fresh computation gives, and stay bounded whoever connects.
"""

from __future__ import annotations

import email.utils
import io
import ipaddress
import socket
from datetime import UTC, datetime

import pytest

import netserver.endpoint as endpoint
from leafmail.trace import received_header
from netserver.admit.access import KNOWN_DECISIONS, AccessPolicy
from netserver.connlog import ConnRecord, ServerLog
from netserver.endpoint import Endpoint, parse_ip
from netserver.memo import BoundedMemo
from netserver.smtp import replies
from netserver.smtp.replies import Reply


def test_a_reply_is_rendered_once_and_equal_replies_stay_equal() -> None:
    assert replies.OK.to_bytes() is replies.OK.to_bytes()
    fresh = Reply(250, "2.0.0", "OK")
    assert fresh == replies.OK and hash(fresh) == hash(replies.OK)
    assert fresh.to_bytes() == b"250 2.0.0 OK\r\n"
    many = Reply(250, None, ("mx.test greets c", "PIPELINING"))
    assert many.to_bytes() == b"250-mx.test greets c\r\n250 PIPELINING\r\n"
    assert replies.greeting("mx.test") is replies.greeting("mx.test")
    assert replies.closing("mx.test").to_bytes() == b"221 2.0.0 mx.test closing connection\r\n"


def test_access_decisions_are_remembered_per_address_and_bounded() -> None:
    policy = AccessPolicy(allow=["127.0.0.0/8"])
    ip = ipaddress.ip_address("127.0.0.1")
    first = policy.decide(ip)
    assert policy.decide(ip) is first and first.allowed
    assert not policy.decide(ipaddress.ip_address("192.0.2.1")).allowed
    for n in range(KNOWN_DECISIONS + 10):  # many clients: the memory stays bounded
        policy.decide(ipaddress.ip_address(0x0A000000 + n))
    assert len(policy._known) <= KNOWN_DECISIONS
    assert policy.decide(ip) == first
    # Names are judged afresh each time: they are not part of the remembered key.
    named = AccessPolicy(allow=[".example.test"])
    assert not named.decide(ip).allowed
    assert named.decide(ip, frozenset({"host.example.test"})).allowed


def test_addresses_are_parsed_and_printed_once_and_bounded() -> None:
    one = Endpoint.from_sockaddr(socket.AF_INET, ("192.0.2.7", 25))
    two = Endpoint.from_sockaddr(socket.AF_INET, ("192.0.2.7", 26))
    assert one.ip is two.ip and one.host is two.host == "192.0.2.7"
    mapped = Endpoint.from_sockaddr(socket.AF_INET6, ("::ffff:192.0.2.7", 25, 0, 0))
    assert mapped.ip == one.ip and str(mapped) == "192.0.2.7:25"
    assert str(Endpoint.from_sockaddr(socket.AF_INET6, ("2001:db8::1", 25, 0, 0))) == (
        "[2001:db8::1]:25"
    )
    for n in range(endpoint.KNOWN_ADDRESSES + 10):
        parse_ip(str(ipaddress.ip_address(0x0A000000 + n)))
    assert len(endpoint._parsed) <= endpoint.KNOWN_ADDRESSES


def test_the_received_date_is_the_date_of_its_second() -> None:
    for stamp in (1_800_000_000.2, 1_800_000_000.9, 1_800_000_001.0):
        header = received_header(
            helo="c.test", client_ip="192.0.2.1", hostname="mx.test", protocol="ESMTP",
            qid="0" * 24, recipients=["a@b.test"], timestamp=stamp,
        )  # fmt: skip
        expected = email.utils.format_datetime(datetime.fromtimestamp(int(stamp), UTC))
        assert header.endswith(f"; {expected}\r\n".encode())


def test_a_memo_remembers_no_failure_and_stays_within_its_limit() -> None:
    calls: list[str] = []

    def make(key: str) -> int:
        calls.append(key)
        if key == "bad":
            raise ValueError(key)
        return len(key)

    memo = BoundedMemo(make, limit=3)
    assert memo("ab") == memo("ab") == 2 and calls == ["ab"]
    for _ in range(2):
        with pytest.raises(ValueError):
            memo("bad")
    assert calls.count("bad") == 2  # a failure is asked again, never remembered
    for key in ("c", "dd", "eee", "ffff"):
        memo(key)
    assert len(memo) <= 3


class _CountedKey:
    """A key that counts how often it is hashed (an address's hash is a Python call)."""

    def __init__(self) -> None:
        self.hashed = 0

    def __hash__(self) -> int:
        self.hashed += 1
        return 7


def test_a_memo_answers_the_same_key_object_again_without_hashing_it() -> None:
    made: list[_CountedKey] = []

    def make(key: _CountedKey) -> int:
        made.append(key)
        return len(made)

    memo = BoundedMemo[_CountedKey, int](make, limit=8)
    one, other = _CountedKey(), _CountedKey()
    assert memo(one) == 1
    first = one.hashed  # looked up, then stored
    assert memo(one) == memo(one) == 1 and one.hashed == first  # not hashed again
    assert memo(other) == 2 and memo(one) == 1 and made == [one, other]
    assert one.hashed == first + 1  # after another key: the table again, same answer


def test_the_helo_reply_is_made_once_per_client_name_and_bounded() -> None:
    """smtp-source and many small clients say HELO, not EHLO: its 250 is kept per name
    like EHLO's, for at most 256 names (the names are the client's)."""
    first = replies.helo("mx.test", "client.test")
    assert replies.helo("mx.test", "client.test") is first
    assert first.to_bytes() == b"250 mx.test greets client.test\r\n"
    for n in range(300):
        replies.helo("mx.test", f"c{n}.test")
    assert replies.helo.cache_info().currsize <= 256


def test_numbers_in_a_log_line_are_written_as_they_are() -> None:
    out = io.StringIO()
    ServerLog(out).event("conn", count=3, duration=0.25, tiny=1e-07, who="a b", none=None)
    assert out.getvalue() == 'netserver: conn count=3 duration=0.25 tiny=1e-07 who="a b" none=-\n'


@pytest.mark.parametrize(
    ("peer", "local", "counts", "status"),
    [
        (
            Endpoint(parse_ip("192.0.2.1"), 4000),
            Endpoint(parse_ip("127.0.0.1"), 25),
            (10, 20),
            "ok",
        ),
        (
            Endpoint(parse_ip("2001:db8::1"), 1),
            Endpoint(parse_ip("::1"), 7000),
            (None, None),
            "exit-3",
        ),
        (Endpoint(path='/run/a b"c.sock'), Endpoint(path=""), (0, None), "signal 9"),
        (Endpoint(path="/tmp/x\x01=y"), Endpoint(path="/tmp/s"), (1, 2), "idle-timeout"),
        (  # an IPv6 zone is any text (the PROXY parser refuses one; this line quotes it)
            Endpoint(ipaddress.IPv6Address('fe80::1%a"b=c\x1b'), 1),
            Endpoint(parse_ip("::1"), 25),
            (3, 4),
            "ok",
        ),
    ],
)
def test_the_connection_line_is_the_generic_event_line(
    peer: Endpoint, local: Endpoint, counts: tuple[int | None, int | None], status: str
) -> None:
    """`ServerLog.connection` writes its text line directly (it runs per connection);
    it must be the line the generic `event` writes for the same fields, quoting and all."""
    record = ConnRecord(peer, local, "exec", bytes_in=counts[0], bytes_out=counts[1])
    record.status = status
    fast, generic = io.StringIO(), io.StringIO()
    ServerLog(fast).connection(record)
    duration = float(fast.getvalue().split(" duration=", 1)[1].split(" ", 1)[0])
    fields = {"peer": str(peer), "local": str(local), "mode": "exec", "duration": duration}
    ServerLog(generic).event("conn", **fields, **{"in": counts[0], "out": counts[1]}, status=status)
    assert fast.getvalue() == generic.getvalue()
    quiet = io.StringIO()
    ServerLog(quiet, connections=False).connection(record)
    assert quiet.getvalue() == ""
