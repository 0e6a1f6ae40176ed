"""Open relay, the full matrix: no envelope trick makes leafmail carry mail off the machine.

A `leafmail serve` with ``local_domains = ["mx.test"]`` trusts only 127.0.0.1; the
outsider connects from 127.0.0.2. Every recipient form that was ever used to smuggle
mail through a relay -- the percent hack, bang paths, source routes, quoted ``@``,
address literals, trailing dots, look-alike and IDNA domains -- is tried with every
sender that old relays trusted (``<>``, a spoofed local sender, the postmaster, a
foreign sender). A foreign recipient must get 5xx 5.7.1 (RFC 5321 3.6, 7.1); a
recipient that is accepted must really be local, and that is checked where it matters:
in the spooled envelope and in what a real smarthost receives once `leafmail flush`
delivers the queue. Trusted networks and AUTH over TLS are the control cases that must
still relay; AUTH without TLS, a failed AUTH and a forged ``AUTH=`` on MAIL must not.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import soak
from leafmail_fixtures import (
    PASSWORD,
    Leafmail,
    LeafmailFactory,
    RawSMTP,
    Reply,
    TLSFiles,
    extensions,
    leafmail_servers,
    make_tls,
    queued_id,
    run_flush,
    toml_string,
    users_file,
    write_config,
)
from localusers import ROOT as AS_ROOT
from localusers import (
    ensure_user,
    remove_scratch,
    scratch,
)
from smarthost import Smarthost
from test_flush import wait_for

pytestmark = pytest.mark.timeout(soak.scaled(60, 300))

OUTSIDER = "127.0.0.2"  # not in relay_networks
INSIDER = "127.0.0.1"  # the only trusted address
LOCAL_DOMAIN = "mx.test"
MESSAGE = b"From: <x@other.test>\r\nSubject: relay test\r\n\r\nbody\r\n"
NO_CHECKS = '[checks]\nrfc5322 = "off"\nreceived = "off"\nspf = "off"\ndkim = "off"\n'
SENDERS = ["<>", "<u@mx.test>", "<postmaster@mx.test>", "<u@other.test>"]

# Outcome classes: "local" (250, and it must stay on mx.test), "relay" (5xx 5.7.1),
# "syntax" (any 5xx: the path is not an RFC 5321 forward-path at all).
LOCAL = [
    "<u@MX.TEST>",
    "<Postmaster>",
    "<postmaster>",
    "<postmaster@mx.test>",
    "<PostMaster@Mx.Test>",
    "<\u00fc@mx.test>",
]
# Sender-specified routing to our own domain: leafmail reads it as a local part, but a
# next hop may not, so untrusted clients get the relay refusal (Postfix's
# allow_untrusted_routing = no). The first three are nmap smtp-open-relay's forms.
ROUTED = [
    "<relaytest%nmap.scanme.org@mx.test>",
    "<nmap.scanme.org!relaytest@mx.test>",
    '<"relaytest@nmap.scanme.org"@mx.test>',
    "<u%other.test@mx.test>",
    '<"u%other.test"@mx.test>',
    "<other.test!u@mx.test>",
    '<"other.test!u"@mx.test>',
    '<"u@other.test"@mx.test>',
    '<"u@other.test"@MX.test>',
]
RELAY = [
    *ROUTED,
    "<u@other.test>",
    "<u@OTHER.test>",
    "<@mx.test:u@other.test>",
    "<@mx.test,@x.test:u@other.test>",
    "<u@[127.0.0.1]>",
    "<u@[IPv6:::1]>",
    "<u@[IPv6:::ffff:127.0.0.1]>",
    "<u@[10.0.0.1]>",
    "<u@[x-tag:mx.test]>",
    "<u@mx.test.other.test>",
    "<u@sub.mx.test>",
    "<u%mx.test@other.test>",
    "<mx.test!u@other.test>",
    '<"u@mx.test"@other.test>',
    "<postmaster@other.test>",
    "<u@b\u00fccher.test>",
    "<u@xn--bcher-kva.test>",
    "<u@mx\uff0etest>",  # FULLWIDTH FULL STOP: one label, never equal to mx.test
    "<u@m\u0445.test>",  # CYRILLIC SMALL LETTER HA looks like x
]
SYNTAX = [
    '<"u@other.test">',
    "<u@[other.test]>",
    "<u@other.test.>",
    "<u@other.test@mx.test>",
    "<u@mx.test@other.test>",
    "<>",
    "<@mx.test:>",
    "<u@other.test\x00@mx.test>",
    "u@other.test",
]
CASES = (
    [(r, "local") for r in LOCAL] + [(r, "relay") for r in RELAY] + [(r, "syntax") for r in SYNTAX]
)


@dataclass(frozen=True)
class Material:
    """TLS files and a users file (alice) shared by the module's servers."""

    tls: TLSFiles
    users: Path


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    directory = tmp_path_factory.mktemp("relay-material")
    return Material(make_tls(directory), users_file(directory, {"alice": PASSWORD}))


def config_text(
    material: Material,
    smarthost: str,
    spool: Path,
    *,
    relay_networks: str = f'["{INSIDER}"]',
    local: str = "",
) -> str:
    """The server under attack: local mx.test, offline until flushed, STARTTLS + AUTH."""
    return (
        f'hostname = "{LOCAL_DOMAIN}"\nspool = {toml_string(spool)}\n'
        f"[smtp]\ntls_cert = {toml_string(material.tls.cert)}\n"
        f"tls_key = {toml_string(material.tls.key)}\nmax_errors = 1000\n"
        f'[relay]\nlocal_domains = ["{LOCAL_DOMAIN}"]\nrelay_networks = {relay_networks}\n'
        f"[auth]\nusers_file = {toml_string(material.users)}\n"
        f'[delivery]\nmode = "offline"\nsmarthost = "{smarthost}"\ntls = "none"\n'
        + NO_CHECKS
        + local
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path_factory.mktemp("relay"))


@pytest.fixture(scope="module")
def target(shared: LeafmailFactory, material: Material) -> Leafmail:
    """One server for the whole matrix (nothing is ever delivered from it)."""
    spool = shared.tmp_path / "matrix-spool"
    return shared(config_text(material, "127.0.0.1:9", spool), spool=spool)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)
    remove_scratch()  # a test's mail directory (as root), once its daemon has stopped


def session(server: Leafmail, source: str = OUTSIDER) -> RawSMTP:
    """A raw SMTP session from `source`, greeted and after EHLO."""
    client = RawSMTP(server.address(), source=source)
    client.greeting()
    client.ehlo()
    return client


def mail_from(client: RawSMTP, sender: str, rcpt: str) -> None:
    """MAIL FROM, with SMTPUTF8 when the recipient needs it (RFC 6531 3.4)."""
    params = "" if rcpt.isascii() else " SMTPUTF8"
    reply = client.command(f"MAIL FROM:{sender}{params}")
    assert reply.code == 250, (sender, reply)


def send_data(client: RawSMTP) -> str:
    """DATA with MESSAGE; the queue id of the 250."""
    assert client.command("DATA").code == 354
    return queued_id(client.command(MESSAGE + b".").text)


def stays_local(address: str) -> bool:
    """A recipient that is this host's: in mx.test, or the domain-less <Postmaster>."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower() == "postmaster"
    return domain.lower() == LOCAL_DOMAIN and bool(local)


def same_mailbox(address: str) -> str:
    """An address as the smarthost's parser shows it: quotes off, domain lower-case.

    aiosmtpd unquotes a quoted local part that needs no quotes and lower-cases nothing
    else; this is only for comparing, never for judging what is local. A bare
    <Postmaster> goes on as Postmaster@ our hostname (RFC 5321 4.1.1.3), as delivered.
    """
    local, _, domain = address.rpartition("@")
    if not local:
        local, domain = address, LOCAL_DOMAIN
    return f"{local.strip(chr(34))}@{domain.lower()}"


def judge(reply: Reply, outcome: str) -> bool:
    """Whether `reply` is the one the outcome class demands."""
    if outcome == "local":
        return reply.code == 250
    if outcome == "relay":
        return reply.code // 100 == 5 and reply.enhanced == "5.7.1"
    return reply.code // 100 == 5


# --- the matrix -------------------------------------------------------------------------


@pytest.mark.parametrize(("rcpt", "outcome"), CASES, ids=[ascii(c[0]) for c in CASES])
def test_outsider_recipient_forms(target: Leafmail, rcpt: str, outcome: str) -> None:
    """Each recipient form with every sender an old relay trusted; nothing foreign passes."""
    replies: dict[str, str] = {}
    with session(target) as client:
        for sender in SENDERS:
            mail_from(client, sender, rcpt)
            reply = client.command(f"RCPT TO:{rcpt}")
            replies[sender] = f"{reply.code} {reply.enhanced or ''}".strip()
            assert judge(reply, outcome), (sender, rcpt, reply)
            if reply.code == 250:
                qid = send_data(client)
                [got] = target.message(qid).envelope.recipients
                assert stays_local(got.address), (rcpt, got.address)
            else:
                assert client.command("RSET").code == 250
    soak.record("attack", f"relay {rcpt!r}", expected=outcome, replies=replies)


def test_auth_is_not_offered_in_plaintext_and_cannot_be_forced(target: Leafmail) -> None:
    """AUTH only over TLS: a plaintext AUTH fails and the session still may not relay."""
    with session(target) as client:
        assert "AUTH" not in extensions(client.ehlo())
        token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        reply = client.command(f"AUTH PLAIN {token}")
        assert reply.code // 100 == 5, reply
        mail_from(client, "<alice@mx.test>", "")
        reply = client.command("RCPT TO:<u@other.test>")
        assert (reply.code // 100, reply.enhanced) == (5, "5.7.1"), reply
    soak.record("attack", "relay after plaintext AUTH", auth_reply=reply.code, relayed=False)


def test_a_forged_auth_parameter_on_mail_grants_nothing(
    target: Leafmail, material: Material
) -> None:
    """MAIL ... AUTH=<alice@mx.test> (RFC 4954 5) claims an identity; it is no login.

    Tried in plaintext (no AUTH extension: the parameter may be refused) and under TLS
    without a login (AUTH offered: the parameter is allowed, and must not be trusted).
    """
    for tls in (False, True):
        with session(target) as client:
            if tls:
                assert client.command("STARTTLS").code == 220
                client.start_tls(material.tls.client_context(), server_hostname="127.0.0.1")
                client.ehlo()
            reply = client.command("MAIL FROM:<alice@mx.test> AUTH=alice@mx.test")
            assert reply.code == 250 or (not tls and reply.code == 555), reply
            if reply.code != 250:
                continue
            reply = client.command("RCPT TO:<u@other.test>")
            assert (reply.code // 100, reply.enhanced) == (5, "5.7.1"), (tls, reply)
    soak.record("attack", "relay with forged MAIL AUTH=", relayed=False)


def test_failed_auth_over_tls_does_not_relay(target: Leafmail, material: Material) -> None:
    with session(target) as client:
        assert client.command("STARTTLS").code == 220
        client.start_tls(material.tls.client_context(), server_hostname="127.0.0.1")
        assert "AUTH" in extensions(client.ehlo())
        token = base64.b64encode(b"\0alice\0wrong password").decode()
        assert client.command(f"AUTH PLAIN {token}").code == 535
        mail_from(client, "<alice@mx.test>", "")
        reply = client.command("RCPT TO:<u@other.test>")
        assert (reply.code // 100, reply.enhanced) == (5, "5.7.1"), reply
    soak.record("attack", "relay after failed AUTH over TLS", relayed=False)


@pytest.mark.parametrize("rcpt", ROUTED[:3])
def test_routed_local_parts_stay_open_to_trusted_clients(
    target: Leafmail, material: Material, rcpt: str
) -> None:
    """Our own networks and logged-in users may still use them (Postfix does the same)."""
    for qid in (
        send_one(target, INSIDER, "<a@mx.test>", rcpt),
        send_authenticated(target, material, rcpt),
    ):
        [got] = target.message(qid).envelope.recipients
        assert stays_local(got.address), got.address


def test_relay_denial_is_550_as_rfc5321_asks(target: Leafmail) -> None:
    """RFC 5321 4.3.2 lists no 554 for RCPT; 3.6 says a policy refusal there is 550."""
    with session(target) as client:
        mail_from(client, "<a@other.test>", "")
        reply = client.command("RCPT TO:<u@other.test>")
    assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply


# --- what is accepted is delivered as what it is -----------------------------------------


def flush(config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return run_flush(tmp_path, config)


def start(
    servers: LeafmailFactory, material: Material, sink: Smarthost, tmp_path: Path, **kw: str
) -> tuple[Leafmail, Path]:
    spool = tmp_path / "spool"
    config = write_config(tmp_path, config_text(material, sink.address, spool, **kw))
    server = servers.spawn(["--config", str(config), "--listen", "127.0.0.1:0"], spool_path=spool)
    return server, config


def send_one(server: Leafmail, source: str, sender: str, rcpt: str) -> str:
    with session(server, source) as client:
        mail_from(client, sender, rcpt)
        reply = client.command(f"RCPT TO:{rcpt}")
        assert reply.code == 250, (source, rcpt, reply)
        return send_data(client)


def send_authenticated(server: Leafmail, material: Material, rcpt: str) -> str:
    """The AUTH control: STARTTLS, AUTH PLAIN as alice, from the untrusted address."""
    with session(server) as client:
        assert client.command("STARTTLS").code == 220
        client.start_tls(material.tls.client_context(), server_hostname="127.0.0.1")
        client.ehlo()
        token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        assert client.command(f"AUTH PLAIN {token}").code == 235
        mail_from(client, "<alice@mx.test>", rcpt)
        assert client.command(f"RCPT TO:{rcpt}").code == 250
        return send_data(client)


def test_accepted_recipients_reach_the_smarthost_unchanged(
    servers: LeafmailFactory, material: Material, sink: Smarthost, tmp_path: Path
) -> None:
    """Flush the outsider's accepted mail: the smarthost sees mx.test recipients only.

    Relaying to other.test happens only for the trusted address and the AUTH session.
    The sender is a local address, so even a bounce would stay on mx.test.
    """
    server, config = start(servers, material, sink, tmp_path)
    spooled: dict[str, str] = {}
    for rcpt in LOCAL:
        qid = send_one(server, OUTSIDER, "<nobody@mx.test>", rcpt)
        [got] = server.message(qid).envelope.recipients
        spooled[qid] = got.address
    send_one(server, INSIDER, "<a@mx.test>", "<trusted@other.test>")
    send_authenticated(server, material, "<authed@other.test>")
    result = flush(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    delivered = [r for got in sink.received for r in got.recipients]
    controls = {"trusted@other.test", "authed@other.test"}
    foreign = [r for r in delivered if not stays_local(r) and r not in controls]
    assert foreign == [], foreign
    assert controls <= set(delivered), delivered
    outsiders = sorted(same_mailbox(r) for r in delivered if r not in controls)
    assert outsiders == sorted(same_mailbox(r) for r in spooled.values()), (delivered, spooled)
    soak.record(
        "attack",
        "relay: accepted outsider mail delivered by flush",
        accepted=len(spooled),
        delivered=len(delivered),
        off_machine_to_other_domains=len(foreign),
    )


LOCAL_USERS = """
[local]
mailbox = "maildir"
path = {path}
users = ["u"]
virtual_user = "lmtvirt"
"""


def maildir_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/new/*"))


def test_local_delivery_never_reads_percent_bang_or_quoted_at_as_a_route(
    servers: LeafmailFactory, material: Material, sink: Smarthost, tmp_path: Path
) -> None:
    """With [local], tricky local parts are refused to outsiders as routing (5.7.1);
    from a trusted client they are unknown users (550 5.1.1) or land in u's Maildir."""
    # u has no account: as root her Maildir is written by virtual_user, a real user
    # (useradd) who owns the mail directory (pytest's tmp_path is closed to others).
    mail = scratch(ensure_user("lmtvirt")) if AS_ROOT else tmp_path / "mail"
    mail.mkdir(exist_ok=True)
    local = LOCAL_USERS.format(path=toml_string(f"{mail}/{{user}}"))
    server, config = start(servers, material, sink, tmp_path, local=local)
    refused = ["<u%other.test@mx.test>", "<other.test!u@mx.test>", '<"u@other.test"@mx.test>']
    kept = ["<u+x%other.test@mx.test>", '<"u+a@other.test"@mx.test>']
    for source, rcpts, want in (
        (OUTSIDER, refused + kept, (550, "5.7.1")),
        (INSIDER, refused, (550, "5.1.1")),
    ):
        with session(server, source) as client:
            for rcpt in rcpts:
                mail_from(client, "<a@other.test>", rcpt)
                reply = client.command(f"RCPT TO:{rcpt}")
                assert (reply.code, reply.enhanced) == want, (source, rcpt, reply)
                assert client.command("RSET").code == 250
    for rcpt in kept:
        send_one(server, INSIDER, "<a@other.test>", rcpt)
    kept.append("<Postmaster>")
    send_one(server, OUTSIDER, "<a@other.test>", "<Postmaster>")
    wait_for("three local deliveries", lambda: len(maildir_files(mail)) == 3)
    delivered_to = sorted(
        line
        for path in maildir_files(mail)
        for line in path.read_bytes().splitlines()
        if line.startswith(b"Delivered-To:")
    )
    assert delivered_to == sorted(b"Delivered-To: " + r[1:-1].encode() for r in kept)
    result = flush(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sink.received == [], sink.received
    soak.record("attack", "relay: tricky local parts with [local]", refused=5, local=3, relayed=0)


@pytest.fixture(scope="module")
def auth_only(shared: LeafmailFactory, material: Material) -> Leafmail:
    """A server whose config says ``relay_networks = []``: no address is trusted."""
    spool = shared.tmp_path / "auth-only-spool"
    text = config_text(material, "127.0.0.1:9", spool, relay_networks="[]")
    return shared(text, spool=spool)


def relay_reply(server: Leafmail, source: str) -> Reply:
    with session(server, source) as client:
        mail_from(client, "<a@mx.test>", "")
        return client.command("RCPT TO:<u@other.test>")


def test_empty_relay_networks_trusts_no_other_address(auth_only: Leafmail) -> None:
    reply = relay_reply(auth_only, OUTSIDER)
    assert (reply.code // 100, reply.enhanced) == (5, "5.7.1"), reply


def test_empty_relay_networks_means_auth_only(auth_only: Leafmail) -> None:
    """``relay_networks = []`` says no address is trusted: only AUTH may relay.

    A local web application or a TLS/PROXY front end connecting from 127.0.0.1 would
    otherwise turn the host into an open relay the configuration said it was not.
    """
    reply = relay_reply(auth_only, INSIDER)
    soak.record("attack", "relay: relay_networks = [] from 127.0.0.1", reply=reply.code)
    assert (reply.code // 100, reply.enhanced) == (5, "5.7.1"), reply
