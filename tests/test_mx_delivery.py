"""Direct MX delivery against a real DNS server and real SMTP servers, all on loopback.

`MxWorld` is the Internet in miniature: a `LoopbackDNS` that the agent's resolver is
pointed at (the system resolver is never used), and aiosmtpd MX hosts (`Smarthost`) on
127.0.0.2, 127.0.0.3, ... that all listen on one shared port, the way every real MX
listens on 25. The port is reserved on every one of those addresses by a socket that is
bound but not listening, handed over to a server when a test starts one there; so an MX
record that points at 127.0.0.1 (or any address with no server) refuses connections,
and no other socket on the machine can take the port in the meantime. TLS certificates
come from trustme CAs. Nothing sleeps; the one timeout test waits a fraction of a second
for a server that never greets, which is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import io
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import FakeClock
from dnsserver import LoopbackDNS
from smarthost import Greeter, Smarthost

from leafmail.config import Config, DeliveryConfig, DnsConfig, MxConfig
from leafmail.delivery import Outcome, Result
from leafmail.delivery.mx import (
    MAX_CONNECTIONS,
    MAX_MX_HOSTS,
    MxAgent,
    MxHost,
    before_self,
    order_hosts,
)
from leafmail.delivery.router import build_agent
from leafmail.envelope import ClientInfo, Envelope, Recipient
from leafmail.queue import QueueRunner
from leafmail.retry import RetryPolicy
from leafmail.spool import Spool
from leafmail.states import QueueState
from netserver.connlog import ServerLog

pytestmark = pytest.mark.timeout(30)

HOSTNAME = "leaf.test"  # our EHLO name
SENDER = "alice@src.test"
REFUSED = "127.0.0.1"  # the shared port is bound there but not listening
ADDRESSES = tuple(f"127.0.0.{i}" for i in range(1, 7))  # where MX hosts may listen


# --- the world: DNS, MX hosts, certificates ---------------------------------------------


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server context with a certificate for `names` issued by `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


class MxWorld:
    """A loopback DNS server plus MX hosts on one shared port; stop() tears it all down."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.dns = LoopbackDNS(ttl=0).start()  # ttl 0: tests may change records
        self.port, self._reserved = reserve_port(ADDRESSES)
        self.ca = trustme.CA()
        self.ca_file = str(tmp_path / "mx-ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.hosts: list[Smarthost] = []
        self.greeters: list[Greeter] = []
        self.log = io.StringIO()

    def stop(self) -> None:
        for host in self.hosts:
            host.release_hung()
            host.stop()
        for greeter in self.greeters:
            greeter.stop()
        self.dns.stop()
        for sock in self._reserved.values():
            sock.close()

    def records(self, name: str, rdtype: str, *values: str) -> None:
        self.dns.set_records(name, rdtype, list(values))

    def _take(self, address: str) -> None:
        """Release the reservation of `address` for the server about to bind there."""
        self._reserved.pop(address).close()

    def server(self, address: str, *, tls: ssl.SSLContext | None = None, **knobs: Any) -> Smarthost:
        """Start an SMTP server at `address` on the shared port (no DNS record)."""
        self._take(address)
        host = Smarthost(host=address, port=self.port, tls=tls, **knobs).start()
        self.hosts.append(host)
        return host

    def mx(
        self, name: str, address: str, *, tls: ssl.SSLContext | None = None, **knobs: Any
    ) -> Smarthost:
        """Start an MX host at `address` and publish `name` -> `address` (A)."""
        host = self.server(address, tls=tls, **knobs)
        self.records(name, "A", address)
        return host

    def greeter(self, name: str, address: str, line: bytes | None) -> Greeter:
        self._take(address)
        greeter = Greeter(address, self.port, line)
        self.greeters.append(greeter)
        self.records(name, "A", address)
        return greeter

    def config(self, **overrides: Any) -> Config:
        """mode = "mx", our DNS server, the shared port, short timeouts; MTA-STS off."""
        mx = MxConfig(port=self.port, mta_sts=False, https_port=443, ca_file=self.ca_file)
        delivery = DeliveryConfig(
            mode="mx", connect_timeout=5.0, command_timeout=5.0, deadline=10.0
        )
        return Config(
            hostname=HOSTNAME,
            spool=str(self.tmp_path / "spool"),
            delivery=replace(delivery, **overrides.pop("delivery", {})),
            dns=DnsConfig(nameservers=(self.dns.host,), port=self.dns.port, timeout=5.0),
            mx=replace(mx, **overrides.pop("mx", {})),
            **overrides,
        )

    def agent(
        self, seed: int = 0, clock: Callable[[], float] = time.monotonic, **kw: Any
    ) -> MxAgent:
        config = self.config(**kw)
        return MxAgent(
            config.mx,
            config.delivery,
            dns=config.dns,
            helo=config.hostname,
            rng=random.Random(seed),
            log=ServerLog(self.log),
            clock=clock,
        )

    def queried(self, name: str) -> bool:
        return any(q == name for q, _type in self.dns.queries)


def reserve_port(addresses: tuple[str, ...]) -> tuple[int, dict[str, socket.socket]]:
    """A port that is free on every address, held there by bound, non-listening sockets."""
    for _ in range(50):
        first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        first.bind((addresses[0], 0))
        port: int = first.getsockname()[1]
        held = {addresses[0]: first}
        try:
            for address in addresses[1:]:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held[address] = sock
                sock.bind((address, port))
        except OSError:  # taken on one of them: try another port
            for sock in held.values():
                sock.close()
            continue
        return port, held
    raise OSError(f"no port free on all of {addresses}")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[MxWorld]:
    w = MxWorld(tmp_path)
    try:
        yield w
    finally:
        w.stop()


def envelope(*rcpts: str, sender: str = SENDER) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=tuple(Recipient(r) for r in rcpts),
        client=ClientInfo("127.0.0.1", 40000, "client.test"),
    )


def message(subject: str = "hello") -> bytes:
    return f"From: <{SENDER}>\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()


def deliver(agent: MxAgent, *rcpts: str, data: bytes | None = None) -> list[Result]:
    """Deliver one message to `rcpts`; the results in recipient order."""
    env = envelope(*rcpts)
    results = asyncio.run(agent.deliver(env, data or message(), range(len(rcpts))))
    assert sorted(results) == list(range(len(rcpts)))
    return [results[i] for i in range(len(rcpts))]


def outcome(result: Result) -> tuple[Outcome, str]:
    return result.outcome, result.status


def two_mx(world: MxWorld, domain: str = "a.test") -> tuple[Smarthost, Smarthost]:
    world.records(domain, "MX", f"10 mx1.{domain}", f"20 mx2.{domain}")
    return world.mx(f"mx1.{domain}", "127.0.0.2"), world.mx(f"mx2.{domain}", "127.0.0.3")


# --- ordering (pure) ---------------------------------------------------------------------


def test_order_hosts_sorts_by_preference_and_keeps_the_best_preference_of_a_duplicate() -> None:
    records = [(20, "b.test."), (10, "A.test."), (30, "c.test"), (40, "b.test")]
    hosts = order_hosts(records, random.Random(0))
    assert hosts == [MxHost("a.test", 10), MxHost("b.test", 20), MxHost("c.test", 30)]


def test_order_hosts_shuffles_equal_preferences_reproducibly_with_a_seed() -> None:
    records = [(10, "x.test"), (5, "first.test"), (10, "y.test"), (10, "z.test"), (20, "last.test")]
    orders = set()
    for seed in range(40):
        hosts = order_hosts(records, random.Random(seed))
        names = [h.name for h in hosts]
        assert names[0] == "first.test" and names[-1] == "last.test"
        assert sorted(names[1:4]) == ["x.test", "y.test", "z.test"]
        assert order_hosts(list(reversed(records)), random.Random(seed)) == hosts  # input order
        orders.add(tuple(names[1:4]))
    assert len(orders) == 6  # every permutation of the three equals shows up


def test_order_hosts_keeps_at_most_max_mx_hosts() -> None:
    records = [(i, f"mx{i}.test") for i in range(MAX_MX_HOSTS + 5)]
    assert len(order_hosts(records, random.Random(0))) == MAX_MX_HOSTS


class _CountedPreference(int):
    """A preference that counts how often it is compared, to bound order_hosts' work."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedPreference.compared += 1
        return int(self) == other

    def __lt__(self, other: int) -> bool:
        _CountedPreference.compared += 1
        return int(self) < other

    __hash__ = int.__hash__


def test_order_hosts_compares_preferences_n_log_n_times_not_n_squared() -> None:
    """A domain's owner can answer MX with some 3,500 records (a 64 KiB TCP answer):
    scanning every name for each preference cost 0.9 s of the delivery loop then. The
    count of comparisons is what grows, so it is what is bounded (not a time)."""
    n = 3000
    records = [(_CountedPreference(n - i), f"mx{i}.test") for i in range(n)]
    _CountedPreference.compared = 0
    hosts = order_hosts(records, random.Random(0))
    assert [h.name for h in hosts] == [f"mx{n - 1 - i}.test" for i in range(MAX_MX_HOSTS)]
    assert _CountedPreference.compared < 40 * n  # n log n; it was n * n = 9,000,000


def test_before_self_keeps_only_hosts_better_than_us() -> None:
    hosts = [MxHost("a.test", 10), MxHost("leaf.test", 20), MxHost("c.test", 20)]
    assert before_self(hosts, "LEAF.test.") == [MxHost("a.test", 10)]
    assert before_self(hosts, "other.test") == hosts


# --- choosing the host ---------------------------------------------------------------------


def test_the_most_preferred_mx_takes_the_mail_and_backups_are_not_even_resolved(
    world: MxWorld,
) -> None:
    mx1, mx2 = two_mx(world)
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert result.remote == f"mx1.a.test:{world.port}"
    assert [r.recipients for r in mx1.received] == [["bob@a.test"]]
    assert mx2.connections == 0
    assert not world.queried("mx2.a.test")


def test_a_refused_connection_falls_through_to_the_next_mx(world: MxWorld) -> None:
    world.records("a.test", "MX", "10 down.a.test", "20 mx2.a.test")
    world.records("down.a.test", "A", REFUSED)
    mx2 = world.mx("mx2.a.test", "127.0.0.3")
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert result.remote == f"mx2.a.test:{world.port}"
    assert [r.recipients for r in mx2.received] == [["bob@a.test"]]


def test_every_address_of_a_host_is_tried_before_the_next_host(world: MxWorld) -> None:
    world.records("a.test", "MX", "10 mx1.a.test", "20 mx2.a.test")
    mx1 = world.mx("mx1.a.test", "127.0.0.2")
    world.records("mx1.a.test", "A", REFUSED, "127.0.0.2")  # first address refuses
    mx2 = world.mx("mx2.a.test", "127.0.0.3")
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert len(mx1.received) == 1 and mx2.connections == 0


@pytest.mark.parametrize("greeting", [b"421 4.3.2 too busy\r\n", b"554 5.7.1 go away\r\n"])
def test_a_4xx_or_5xx_greeting_falls_through_to_the_next_mx(
    world: MxWorld, greeting: bytes
) -> None:
    world.records("a.test", "MX", "10 busy.a.test", "20 mx2.a.test")
    busy = world.greeter("busy.a.test", "127.0.0.2", greeting)
    mx2 = world.mx("mx2.a.test", "127.0.0.3")
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert busy.accepts == 1
    assert [r.recipients for r in mx2.received] == [["bob@a.test"]]
    assert "busy.a.test[127.0.0.2]" in world.log.getvalue()


def test_an_mx_that_never_greets_is_left_after_the_connect_timeout(world: MxWorld) -> None:
    world.records("a.test", "MX", "10 mute.a.test", "20 mx2.a.test")
    mute = world.greeter("mute.a.test", "127.0.0.2", None)
    mx2 = world.mx("mx2.a.test", "127.0.0.3")
    agent = world.agent(delivery={"connect_timeout": 0.3})
    [result] = deliver(agent, "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert mute.accepts == 1 and len(mx2.received) == 1


def test_all_mx_hosts_unreachable_defers_4_4_1_without_link_down(world: MxWorld) -> None:
    world.records("a.test", "MX", "10 down1.a.test", "20 down2.a.test")
    world.records("down1.a.test", "A", REFUSED)
    world.records("down2.a.test", "A", REFUSED)
    [result] = deliver(world.agent(), "bob@a.test")  # no LinkDown raised
    assert outcome(result) == (Outcome.DEFERRED, "4.4.1")
    assert "down1.a.test[127.0.0.1]" in result.text and "down2.a.test" in result.text


def test_equal_preferences_are_tried_in_the_seeded_shuffled_order(world: MxWorld) -> None:
    world.records("a.test", "MX", "10 mx1.a.test", "10 mx2.a.test", "10 mx3.a.test")
    hosts = {
        name: world.mx(f"{name}.a.test", f"127.0.0.{i + 2}")
        for i, name in enumerate(["mx1", "mx2", "mx3"])
    }
    chosen = set()
    for seed in range(12):
        expect = order_hosts(
            [(10, "mx1.a.test"), (10, "mx2.a.test"), (10, "mx3.a.test")], random.Random(seed)
        )[0].name
        [result] = deliver(world.agent(seed), "bob@a.test")
        assert result.remote == f"{expect}:{world.port}"
        chosen.add(expect)
    assert len(chosen) > 1  # the load is spread
    assert sum(len(h.received) for h in hosts.values()) == 12


def test_mx_that_names_an_ip_address_is_not_connected_to(world: MxWorld) -> None:
    """RFC 5321 5.1: an MX must be a name; "127.0.0.2" as a name does not resolve."""
    world.records("a.test", "MX", "10 127.0.0.2")
    literal = world.server("127.0.0.2")
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DEFERRED, "4.4.1")
    assert literal.connections == 0
    assert world.queried("127.0.0.2")  # it was looked up as a name, and was none


def test_only_max_mx_hosts_are_ever_resolved(world: MxWorld) -> None:
    names = [f"h{i:02d}.a.test" for i in range(MAX_MX_HOSTS + 5)]
    world.records("a.test", "MX", *(f"{i} {n}" for i, n in enumerate(names)))
    [result] = deliver(world.agent(), "bob@a.test")  # none of them has an address
    assert outcome(result) == (Outcome.DEFERRED, "4.4.1")
    resolved = {q for q, t in world.dns.queries if t == "A"}
    assert resolved == set(names[:MAX_MX_HOSTS])


def test_connection_attempts_per_domain_are_bounded(world: MxWorld) -> None:
    names = [f"h{i}.a.test" for i in range(6)]
    world.records("a.test", "MX", *(f"{i} {n}" for i, n in enumerate(names)))
    for name in names:  # two addresses each, both refusing: twelve possible attempts
        world.records(name, "A", REFUSED, "127.0.0.5")
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DEFERRED, "4.4.1")
    assert world.log.getvalue().count("mx host unusable") == MAX_CONNECTIONS
    assert not world.queried(names[-1])  # the budget ran out before the last host


def test_an_mx_list_naming_us_first_is_a_loop_and_fails_5_4_6(world: MxWorld) -> None:
    world.records("a.test", "MX", f"10 {HOSTNAME}", "20 mx2.a.test")
    mx2 = world.mx("mx2.a.test", "127.0.0.3")
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.FAILED, "5.4.6")
    assert mx2.connections == 0


# --- what DNS says -----------------------------------------------------------------------------


def test_no_mx_means_the_domain_itself_is_the_mail_host(world: MxWorld) -> None:
    host = world.mx("a.test", "127.0.0.2")  # A record only, no MX
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert result.remote == f"a.test:{world.port}"
    assert [r.recipients for r in host.received] == [["bob@a.test"]]


def test_no_mx_and_no_address_fails_5_1_2(world: MxWorld) -> None:
    world.records("a.test", "TXT", '"exists, but no mail"')
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.FAILED, "5.1.2")


def test_null_mx_fails_5_1_10_at_once_without_any_connection(world: MxWorld) -> None:
    world.records("a.test", "MX", "0 .")
    host = world.mx("a.test", "127.0.0.2")  # an address that must not be used
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.FAILED, "5.1.10")
    assert "null MX" in result.text
    assert host.connections == 0
    assert world.dns.queries == [("a.test", "MX")]


def test_nxdomain_fails_5_1_2(world: MxWorld) -> None:
    [result] = deliver(world.agent(), "bob@nowhere.test")
    assert outcome(result) == (Outcome.FAILED, "5.1.2")
    assert "does not exist" in result.text


def test_servfail_defers_4_4_3(tmp_path: Path) -> None:
    world = MxWorld(tmp_path)
    world.dns.stop()
    world.dns = LoopbackDNS(servfail=["broken.test"]).start()
    try:
        [result] = deliver(world.agent(), "bob@broken.test")
        assert outcome(result) == (Outcome.DEFERRED, "4.4.3")
    finally:
        world.stop()


def test_servfail_on_every_mx_address_defers_4_4_3(tmp_path: Path) -> None:
    world = MxWorld(tmp_path)
    world.dns.stop()
    world.dns = LoopbackDNS({("a.test", "MX"): ["10 mx.broken.test"]}, servfail=["mx.broken.test"])
    world.dns.start()
    try:
        [result] = deliver(world.agent(), "bob@a.test")
        assert outcome(result) == (Outcome.DEFERRED, "4.4.3")
        assert "address lookup failed" in result.text
    finally:
        world.stop()


def test_an_address_literal_domain_is_not_routed(world: MxWorld) -> None:
    [result] = deliver(world.agent(), "bob@[127.0.0.2]")
    assert outcome(result) == (Outcome.FAILED, "5.1.2")
    assert world.dns.queries == []


# --- TLS -----------------------------------------------------------------------------------


def test_starttls_is_used_when_offered_even_with_an_untrusted_certificate(world: MxWorld) -> None:
    world.records("a.test", "MX", "10 mx1.a.test")
    stranger = trustme.CA()  # not in any trust store we use
    mx1 = world.mx("mx1.a.test", "127.0.0.2", tls=server_tls(stranger, "someone.else.test"))
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert [r.tls for r in mx1.received] == [True]


def test_a_host_without_starttls_gets_plaintext(world: MxWorld) -> None:
    world.records("a.test", "MX", "10 mx1.a.test")
    mx1 = world.mx("mx1.a.test", "127.0.0.2")
    deliver(world.agent(), "bob@a.test")
    assert [r.tls for r in mx1.received] == [False]


def broken_tls(version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    """A server context that fails every handshake from us: it demands a client certificate.

    Under TLS 1.2 the refusal comes inside the handshake; under TLS 1.3 only at the
    first read after it (the EHLO over TLS), and both must count as a TLS failure.
    """
    ca = trustme.CA()
    context = server_tls(ca, "broken.test")
    context.maximum_version = version
    context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(context)
    return context


def test_a_failed_opportunistic_handshake_moves_to_the_next_mx(world: MxWorld) -> None:
    world.records("a.test", "MX", "10 mx1.a.test", "20 mx2.a.test")
    mx1 = world.mx("mx1.a.test", "127.0.0.2", tls=broken_tls())
    mx2 = world.mx("mx2.a.test", "127.0.0.3", tls=server_tls(world.ca, "mx2.a.test"))
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert mx1.connections == 1 and not mx1.received
    assert [r.tls for r in mx2.received] == [True]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_plaintext_is_the_last_resort_after_every_opportunistic_handshake_failed(
    world: MxWorld, version: ssl.TLSVersion
) -> None:
    world.records("a.test", "MX", "10 mx1.a.test")
    mx1 = world.mx("mx1.a.test", "127.0.0.2", tls=broken_tls(version))
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DELIVERED, "2.0.0")
    assert mx1.connections == 2  # TLS first, then plaintext
    assert [r.tls for r in mx1.received] == [False]


def test_plaintext_after_a_failed_handshake_to_a_host_that_requires_tls_defers(
    world: MxWorld,
) -> None:
    """The plaintext last resort reaches a host that requires TLS: it answers MAIL "530
    Must issue a STARTTLS command first" (RFC 3207 4). That refuses the session whose
    handshake failed, not the message: it waits for a handshake that works, no bounce."""
    world.records("a.test", "MX", "10 mx1.a.test")
    mx1 = world.mx("mx1.a.test", "127.0.0.2", tls=broken_tls(), require_starttls=True)
    [result] = deliver(world.agent(), "bob@a.test")
    assert result.outcome is Outcome.DEFERRED, result
    assert "530 Must issue a STARTTLS command first" in result.text
    assert mx1.connections == 2 and not mx1.received


# --- the transaction decides ---------------------------------------------------------------------


def test_rcpt_replies_decide_and_no_other_mx_is_tried_after_a_transaction(
    world: MxWorld,
) -> None:
    mx1, mx2 = two_mx(world)
    mx1.behaviour.rcpt_replies["gone@a.test"] = "550 5.1.1 no such user"
    mx1.behaviour.rcpt_replies["busy@a.test"] = "452 4.2.2 mailbox full"
    results = deliver(world.agent(), "ok@a.test", "gone@a.test", "busy@a.test")
    assert [outcome(r) for r in results] == [
        (Outcome.DELIVERED, "2.0.0"),
        (Outcome.FAILED, "5.1.1"),
        (Outcome.DEFERRED, "4.2.2"),
    ]
    assert [r.recipients for r in mx1.received] == [["ok@a.test"]]
    assert mx2.connections == 0


def test_a_connection_lost_in_data_defers_4_4_2_without_trying_the_backup(world: MxWorld) -> None:
    mx1, mx2 = two_mx(world)
    mx1.behaviour.drop_at_data = True
    [result] = deliver(world.agent(), "bob@a.test")
    assert outcome(result) == (Outcome.DEFERRED, "4.4.2")
    assert mx2.connections == 0


def test_each_domain_gets_its_own_results_in_one_message(world: MxWorld) -> None:
    mx_a = world.mx("a.test", "127.0.0.2")  # implicit MX
    mx_a.behaviour.rcpt_replies["gone@a.test"] = "550 5.1.1 no such user"
    world.records("b.test", "MX", "10 mx.b.test")
    mx_b = world.mx("mx.b.test", "127.0.0.3")
    world.records("c.test", "MX", "10 down.c.test")
    world.records("down.c.test", "A", REFUSED)
    world.records("d.test", "MX", "0 .")
    rcpts = ("x@a.test", "gone@a.test", "y@B.test", "z@c.test", "w@d.test", "v@b.test")
    results = deliver(world.agent(), *rcpts)
    assert [outcome(r) for r in results] == [
        (Outcome.DELIVERED, "2.0.0"),
        (Outcome.FAILED, "5.1.1"),
        (Outcome.DELIVERED, "2.0.0"),
        (Outcome.DEFERRED, "4.4.1"),
        (Outcome.FAILED, "5.1.10"),
        (Outcome.DELIVERED, "2.0.0"),
    ]
    assert [r.recipients for r in mx_a.received] == [["x@a.test"]]
    assert [r.recipients for r in mx_b.received] == [["y@B.test", "v@b.test"]]  # one transaction


def test_the_deadline_bounds_the_whole_domain_attempt(world: MxWorld) -> None:
    mx1, _mx2 = two_mx(world)
    mx1.behaviour.hang_at_data = True
    agent = world.agent(delivery={"deadline": 0.5})
    [result] = deliver(agent, "bob@a.test")
    assert outcome(result) == (Outcome.DEFERRED, "4.4.2")
    assert "within 0.5s" in result.text


# --- end to end: spool, queue runner, build_agent -------------------------------------------------


def spool_is_empty(spool: Spool) -> bool:
    return not any(spool.ids(state) for state in QueueState)


def run_pass(runner: QueueRunner) -> None:
    asyncio.run(runner.run_once())


def test_queue_runner_delivers_by_mx_retries_and_bounces(world: MxWorld) -> None:
    """mode = "mx" through build_agent: one domain now, one after a retry, one bounced."""
    world.records("a.test", "MX", "10 mx.a.test")
    mx_a = world.mx("mx.a.test", "127.0.0.2")
    world.records("b.test", "MX", "10 mx.b.test")
    world.records("mx.b.test", "A", "127.0.0.3")  # not running yet
    world.records("null.test", "MX", "0 .")
    world.records("src.test", "MX", "10 mx.src.test")  # where the bounce goes
    mx_src = world.mx("mx.src.test", "127.0.0.4")
    config = world.config()
    spool = Spool(Path(config.spool))
    agent = build_agent(config.queue, spool)
    assert agent is not None
    clock = FakeClock()
    policy = RetryPolicy(initial=300.0, maximum=2400.0, lifetime=5 * 86400.0)
    runner = QueueRunner(spool, agent, policy, hostname=HOSTNAME, clock=clock)
    qid = spool.commit(envelope("x@a.test", "y@b.test", "z@null.test"), message("mx e2e"))

    run_pass(runner)

    assert [r.recipients for r in mx_a.received] == [["x@a.test"]]
    assert spool.find(qid) == "deferred"
    [bounce] = mx_src.received  # the 5.1.10 DSN went out by MX in the same pass
    assert bounce.sender == "<>" and bounce.recipients == [SENDER]
    assert b"5.1.10" in bounce.content and b"z@null.test" in bounce.content

    mx_b = world.mx("mx.b.test", "127.0.0.3")  # the host comes back
    clock.now += 301.0
    run_pass(runner)

    assert [r.recipients for r in mx_b.received] == [["y@b.test"]]
    assert len(mx_a.received) == 1  # never sent twice
    assert spool_is_empty(spool)


def test_build_agent_with_mx_routes_only_the_routed_domain(world: MxWorld, sink: Smarthost) -> None:
    world.records("a.test", "MX", "10 mx.a.test")
    mx_a = world.mx("mx.a.test", "127.0.0.2")
    config = world.config(
        delivery={"mode": "smarthost", "smarthost": sink.address, "tls": "none"},
        routes=(("a.test", "mx"),),
    )
    agent = build_agent(config.queue, Spool(Path(config.spool)))
    assert agent is not None
    env = envelope("x@a.test", "y@elsewhere.test")

    async def deliver_and_close() -> dict[int, Result]:
        try:
            return await agent.deliver(env, message(), [0, 1])
        finally:
            await agent.close()

    results = asyncio.run(deliver_and_close())
    assert {i: r.outcome for i, r in results.items()} == {
        0: Outcome.DELIVERED,
        1: Outcome.DELIVERED,
    }
    assert [r.recipients for r in mx_a.received] == [["x@a.test"]]
    assert [r.recipients for r in sink.received] == [["y@elsewhere.test"]]


# --- found elsewhere ----------------------------------------------------------------------


def test_smarthost_helper_closes_its_event_loop() -> None:
    host = Smarthost(host="127.0.0.2").start()
    host.stop()
    assert host._loop.is_closed()
