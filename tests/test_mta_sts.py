"""MTA-STS (RFC 8461): parsing, the policy cache, and delivery under enforce and testing.

The parsers are tested as pure functions. Everything else runs against real servers on
loopback: the `MxWorld` of test_mx_delivery (a DNS server of the test's own and aiosmtpd
MX hosts on 127.0.0.x), plus `PolicyServer`, a real HTTPS server in a thread whose
certificate for ``mta-sts.<domain>`` comes from the same trustme CA that
``[mx] ca_file`` names. Policies are published the way a domain would: a TXT record at
``_mta-sts.<domain>`` and a text/plain file at ``/.well-known/mta-sts.txt``.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from smarthost import Smarthost
from test_mx_delivery import MxWorld, deliver, outcome, server_tls

from leafmail.delivery import Outcome, mta_sts
from leafmail.delivery.mta_sts import (
    FETCH_RETRY,
    MAX_POLICY_BYTES,
    PolicyCache,
    PolicyError,
    StsMode,
    StsPolicy,
    mx_matches,
    parse_policy,
    parse_txt,
    verified_context,
)
from leafmail.delivery.mx import MxAgent, host_addresses

pytestmark = pytest.mark.timeout(30)

POLICY_HOST = "127.0.0.1"  # where every mta-sts.<domain> points


# --- the policy server ------------------------------------------------------------------------


@dataclass
class Reply:
    """What the policy server answers for one domain."""

    body: bytes
    status: int = 200
    content_type: str = "text/plain"
    location: str = ""


class PolicyServer:
    """An HTTPS server for mta-sts.<domain> names, answering per Host header."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.replies: dict[str, Reply] = {}
        self.requests: list[tuple[str, str]] = []  # (Host, path)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
                server.requests.append((host, self.path))
                reply = server.replies.get(host, Reply(b"not here", status=404))
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                if reply.location:
                    self.send_header("Location", reply.location)
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer((POLICY_HOST, 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port: int = self.httpd.server_address[1]
        self._thread = threading.Thread(  # a short poll so shutdown() returns promptly
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def fetches(self, domain: str) -> int:
        return sum(1 for host, _path in self.requests if host == f"mta-sts.{domain}")


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


class StsWorld(MxWorld):
    """MxWorld with MTA-STS turned on and a policy server for a few domains."""

    DOMAINS = ("a.test", "b.test")

    def __init__(self, tmp_path: Path, policy_ca: trustme.CA | None = None) -> None:
        super().__init__(tmp_path)
        ca = policy_ca or self.ca
        names = [f"mta-sts.{d}" for d in self.DOMAINS]
        self.policy_server = PolicyServer(server_tls(ca, *names))
        for name in names:
            self.records(name, "A", POLICY_HOST)
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    def stop(self) -> None:
        self.policy_server.stop()
        super().stop()

    def publish(self, domain: str, policy_id: str, body: bytes | Reply) -> None:
        """The TXT record and the policy file of `domain`."""
        self.records(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={policy_id}"')
        reply = body if isinstance(body, Reply) else Reply(body)
        self.policy_server.replies[f"mta-sts.{domain}"] = reply

    def sts_agent(self, seed: int = 0) -> MxAgent:
        return self.agent(
            seed,
            clock=self.clock,
            mx={"mta_sts": True, "https_port": self.policy_server.port},
        )


@pytest.fixture
def sts(tmp_path: Path) -> Iterator[StsWorld]:
    world = StsWorld(tmp_path)
    try:
        yield world
    finally:
        world.stop()


def good_and_other(sts: StsWorld, domain: str = "a.test") -> tuple[Smarthost, Smarthost]:
    """MX 10 other.example (plain, not in the policy), MX 20 mx.<domain> (verified TLS)."""
    sts.records(domain, "MX", "10 other.example", f"20 mx.{domain}")
    other = sts.mx("other.example", "127.0.0.2")
    good = sts.mx(f"mx.{domain}", "127.0.0.3", tls=server_tls(sts.ca, f"mx.{domain}"))
    return other, good


# --- parsing (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expect"),
    [
        (["v=STSv1; id=20240101T000000"], "20240101T000000"),
        (["v=STSv1;id=abc123;"], "abc123"),
        (["v=spf1 -all", "v=STSv1; id=x1"], "x1"),
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # two records: none
        (["v=STSv1"], None),  # no id
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv1; id=" + "a" * 33], None),  # id is at most 32 characters
        (["v=STSv10; id=abc"], None),
        ([], None),
    ],
)
def test_parse_txt(records: list[str], expect: str | None) -> None:
    assert parse_txt(records) == expect


def test_parse_policy_reads_every_field_and_ignores_unknown_ones() -> None:
    text = "version: STSv1\nmode: enforce\nmx: mx1.a.test\nmx: *.a.test\nmax_age: 600\nx: y\n"
    assert parse_policy(text, "id1") == StsPolicy(
        "id1", StsMode.ENFORCE, ("mx1.a.test", "*.a.test"), 600
    )


def test_parse_policy_caps_max_age_at_about_a_year() -> None:
    policy = parse_policy(policy_text("testing", "a.test", max_age=10**9).decode(), "i")
    assert policy.max_age == 31557600


@pytest.mark.parametrize(
    "text",
    [
        "mode: enforce\nmx: a.test\nmax_age: 60\n",  # no version
        "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 60\n",
        "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 60\n",
        "version: STSv1\nmode: enforce\nmx: a.test\n",  # no max_age
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\n",  # enforce without mx
        "<html>not a policy</html>",
    ],
)
def test_parse_policy_refuses_invalid_policies(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text, "id")


def test_a_none_policy_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 60\n", "i").mode is StsMode.NONE


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx.a.test", "mx.a.test", True),
        ("mx.a.test", "MX.A.TEST.", True),
        ("mx.a.test", "mx2.a.test", False),
        ("*.a.test", "mx.a.test", True),
        ("*.a.test", "a.test", False),  # the wildcard is exactly one label
        ("*.a.test", "x.mx.a.test", False),
        ("*.a.test", ".a.test", False),
        ("*.a.test", "mx.b.test", False),
        ("", "a.test", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


# --- enforce ---------------------------------------------------------------------------------


def test_enforce_skips_mx_hosts_the_policy_does_not_name(sts: StsWorld) -> None:
    other, good = good_and_other(sts)
    sts.publish("a.test", "p1", policy_text("enforce", "mx.a.test"))
    [result] = deliver(sts.sts_agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert other.connections == 0
    assert [r.tls for r in good.received] == [True]
    assert sts.policy_server.fetches("a.test") == 1


def test_enforce_wildcard_patterns_match_one_label(sts: StsWorld) -> None:
    sts.records("a.test", "MX", "10 mx.a.test")
    good = sts.mx("mx.a.test", "127.0.0.3", tls=server_tls(sts.ca, "mx.a.test"))
    sts.publish("a.test", "p1", policy_text("enforce", "*.a.test"))
    [result] = deliver(sts.sts_agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert len(good.received) == 1


@pytest.mark.parametrize("bad", ["wrong-name", "untrusted-ca", "no-starttls"])
def test_enforce_never_uses_an_mx_whose_tls_does_not_verify(sts: StsWorld, bad: str) -> None:
    sts.records("a.test", "MX", "10 mx1.a.test", "20 mx2.a.test")
    tls = {
        "wrong-name": server_tls(sts.ca, "somebody.else.test"),
        "untrusted-ca": server_tls(trustme.CA(), "mx1.a.test"),
        "no-starttls": None,
    }[bad]
    mx1 = sts.mx("mx1.a.test", "127.0.0.2", tls=tls)
    mx2 = sts.mx("mx2.a.test", "127.0.0.3", tls=server_tls(sts.ca, "mx2.a.test"))
    sts.publish("a.test", "p1", policy_text("enforce", "*.a.test"))
    [result] = deliver(sts.sts_agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert mx1.connections == 1 and not mx1.received
    assert [r.tls for r in mx2.received] == [True]


def test_enforce_defers_4_7_5_when_no_host_qualifies_and_never_falls_back(
    sts: StsWorld,
) -> None:
    sts.records("a.test", "MX", "10 mx1.a.test")
    mx1 = sts.mx("mx1.a.test", "127.0.0.2", tls=server_tls(trustme.CA(), "mx1.a.test"))
    sts.publish("a.test", "p1", policy_text("enforce", "mx1.a.test"))
    [result] = deliver(sts.sts_agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DEFERRED, "4.7.5")
    assert "MTA-STS" in result.text
    assert mx1.connections == 1  # tried with TLS once; no plaintext retry
    assert not mx1.received


def test_enforce_defers_4_7_5_without_connecting_when_no_mx_matches(sts: StsWorld) -> None:
    other, good = good_and_other(sts)
    sts.publish("a.test", "p1", policy_text("enforce", "mx.elsewhere.test"))
    [result] = deliver(sts.sts_agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DEFERRED, "4.7.5")
    assert other.connections == 0 and good.connections == 0


# --- testing, none, and no policy ----------------------------------------------------------------


def test_testing_mode_delivers_anyway_and_logs_what_enforce_would_refuse(sts: StsWorld) -> None:
    sts.records("a.test", "MX", "10 mx1.a.test")
    mx1 = sts.mx("mx1.a.test", "127.0.0.2", tls=server_tls(trustme.CA(), "mx1.a.test"))
    sts.publish("a.test", "t1", policy_text("testing", "mx.elsewhere.test"))
    [result] = deliver(sts.sts_agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert [r.tls for r in mx1.received] == [True]  # opportunistic after the failed check
    log = sts.log.getvalue()
    assert "enforce would have refused" in log
    assert "does not match the MTA-STS policy" in log
    assert "certificate verify failed" in log


def test_a_none_policy_is_delivered_as_without_one(sts: StsWorld) -> None:
    other, good = good_and_other(sts)
    sts.publish("a.test", "n1", policy_text("none"))
    [result] = deliver(sts.sts_agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert len(other.received) == 1 and good.connections == 0


def test_without_mta_sts_configured_no_policy_is_even_looked_up(sts: StsWorld) -> None:
    other, _good = good_and_other(sts)
    sts.publish("a.test", "p1", policy_text("enforce", "mx.a.test"))
    [result] = deliver(sts.agent(), "bob@a.test")  # mx.mta_sts = false
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert len(other.received) == 1
    assert not sts.queried("_mta-sts.a.test")
    assert sts.policy_server.requests == []


@pytest.mark.parametrize(
    "reply",
    [
        Reply(b"", status=404),
        Reply(b"", status=301, location="https://mta-sts.b.test/.well-known/mta-sts.txt"),
        Reply(policy_text("enforce", "mx.a.test"), content_type="text/html"),
        Reply(b"version: STSv1\r\nmode: enforce\r\nmax_age: 60\r\n"),  # no mx
        Reply(policy_text("enforce", "mx.a.test") + b"#" * MAX_POLICY_BYTES),
    ],
    ids=["404", "redirect", "content-type", "invalid", "too-big"],
)
def test_a_failed_fetch_without_a_cached_policy_delivers_as_without_one(
    sts: StsWorld, reply: Reply
) -> None:
    other, good = good_and_other(sts)
    sts.publish("b.test", "p1", policy_text("enforce", "mx.a.test"))  # the redirect target
    sts.publish("a.test", "p1", reply)
    [result] = deliver(sts.sts_agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert len(other.received) == 1 and good.connections == 0
    assert sts.policy_server.fetches("a.test") == 1
    assert sts.policy_server.fetches("b.test") == 0  # the redirect was not followed
    assert "MTA-STS policy fetch failed" in sts.log.getvalue()


def test_a_policy_host_whose_certificate_does_not_verify_gives_no_policy(tmp_path: Path) -> None:
    sts = StsWorld(tmp_path, policy_ca=trustme.CA())  # not the CA in mx.ca_file
    try:
        other, _good = good_and_other(sts)
        sts.publish("a.test", "p1", policy_text("enforce", "mx.a.test"))
        [result] = deliver(sts.sts_agent(), "bob@a.test")
        assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
        assert len(other.received) == 1
        assert "certificate verify failed" in sts.log.getvalue()
    finally:
        sts.stop()


# --- the cache ---------------------------------------------------------------------------------


def test_a_cached_policy_is_not_fetched_again_until_its_id_changes(sts: StsWorld) -> None:
    _other, good = good_and_other(sts)
    sts.publish("a.test", "p1", policy_text("enforce", "mx.a.test", max_age=3600))
    agent = sts.sts_agent()
    deliver(agent, "one@a.test")
    deliver(agent, "two@a.test")
    assert sts.policy_server.fetches("a.test") == 1

    sts.publish("a.test", "p2", policy_text("enforce", "other.example"))
    [result] = deliver(agent, "three@a.test")
    assert sts.policy_server.fetches("a.test") == 2
    assert outcome(result) == (Outcome.DEFERRED, "4.7.5")  # p2 is in force: only other.example,
    assert len(good.received) == 2  # which has no STARTTLS


def test_an_expired_policy_is_fetched_again(sts: StsWorld) -> None:
    good_and_other(sts)
    sts.publish("a.test", "p1", policy_text("enforce", "mx.a.test", max_age=600))
    agent = sts.sts_agent()
    deliver(agent, "one@a.test")
    sts.now += 599
    deliver(agent, "two@a.test")
    assert sts.policy_server.fetches("a.test") == 1
    sts.now += 2
    deliver(agent, "three@a.test")
    assert sts.policy_server.fetches("a.test") == 2


def test_a_cached_enforce_policy_holds_when_the_fetch_fails(sts: StsWorld) -> None:
    other, good = good_and_other(sts)
    sts.publish("a.test", "p1", policy_text("enforce", "mx.a.test"))
    agent = sts.sts_agent()
    deliver(agent, "one@a.test")
    good.stop()  # now only other.example (not in the policy) could take it
    sts.hosts.remove(good)
    sts.publish("a.test", "p2", Reply(b"", status=503))  # an attacker blocks the new policy

    [result] = deliver(agent, "two@a.test")

    assert outcome(result) == (Outcome.DEFERRED, "4.7.5")  # mx.a.test is down; no fallback
    assert "other.example does not match" in result.text and "mx.a.test[" in result.text
    assert other.connections == 0
    assert sts.policy_server.fetches("a.test") == 2


def test_a_cached_enforce_policy_holds_when_the_txt_record_disappears(sts: StsWorld) -> None:
    other, _good = good_and_other(sts)
    sts.publish("a.test", "p1", policy_text("enforce", "mx.a.test"))
    agent = sts.sts_agent()
    deliver(agent, "one@a.test")
    sts.records("_mta-sts.a.test", "TXT")  # removed: an attacker can strip DNS answers

    [result] = deliver(agent, "two@a.test")

    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert other.connections == 0
    assert sts.policy_server.fetches("a.test") == 1


def test_policies_are_cached_per_domain(sts: StsWorld) -> None:
    good_and_other(sts, "a.test")
    sts.records("b.test", "MX", "10 other.example", "20 mx.b.test")
    good_b = sts.mx("mx.b.test", "127.0.0.4", tls=server_tls(sts.ca, "mx.b.test"))
    sts.publish("a.test", "same", policy_text("enforce", "mx.a.test"))
    sts.publish("b.test", "same", policy_text("enforce", "mx.b.test"))
    results = deliver(sts.sts_agent(), "x@a.test", "y@b.test")
    assert [outcome(r) for r in results] == [(Outcome.DELIVERED, "2.0.0")] * 2
    assert len(good_b.received) == 1
    assert sts.policy_server.fetches("a.test") == 1 and sts.policy_server.fetches("b.test") == 1


def test_a_failed_fetch_is_not_repeated_for_every_message(sts: StsWorld) -> None:
    good_and_other(sts)
    sts.publish("a.test", "p1", Reply(b"", status=500))
    agent = sts.sts_agent()
    deliver(agent, "one@a.test")
    deliver(agent, "two@a.test")
    assert sts.policy_server.fetches("a.test") == 1
    sts.now += FETCH_RETRY + 1
    deliver(agent, "three@a.test")
    assert sts.policy_server.fetches("a.test") == 2


def test_a_new_id_is_fetched_at_once_even_after_a_failure(sts: StsWorld) -> None:
    _other, good = good_and_other(sts)
    sts.publish("a.test", "p1", Reply(b"", status=500))
    agent = sts.sts_agent()
    deliver(agent, "one@a.test")
    sts.publish("a.test", "p2", policy_text("enforce", "mx.a.test"))
    deliver(agent, "two@a.test")
    assert sts.policy_server.fetches("a.test") == 2
    assert [r.recipients for r in good.received] == [["two@a.test"]]


# --- the cache object on its own ------------------------------------------------------------------


def test_policy_cache_answers_none_without_a_txt_record(sts: StsWorld) -> None:
    resolver = sts.sts_agent().resolver
    cache = PolicyCache(
        resolver,
        lambda name: host_addresses(resolver, name),
        https_port=sts.policy_server.port,
        context=verified_context(sts.ca_file),
    )
    assert asyncio.run(cache.policy("a.test")) is None
    assert cache.fetches == 0


def test_the_cache_keeps_at_most_max_cached_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mta_sts, "MAX_CACHED", 3)
    table: dict[str, int] = {}
    for i, key in enumerate(["a", "b", "c", "a", "d"]):
        PolicyCache._remember(table, key, i)
    assert table == {"c": 2, "a": 3, "d": 4}  # "b" was the least recently stored
