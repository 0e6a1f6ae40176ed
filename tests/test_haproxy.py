"""leafmail behind the real HAProxy (issue 15): the client is judged as itself.

Two leafmail nodes, each with its own spool, trust the balancer's address
(`haproxy.BALANCER_IP`) in ``[smtp] proxy_from``; HAProxy sends them a PROXY v2 header
and checks them with ``option smtpchk``. Clients bind chosen loopback addresses
(127.0.0.x) and connect to HAProxy: relay control, the per-source cap and the Received
header must see those addresses, never the balancer's.
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from haproxy import BALANCER_IP, HAPROXY, Balancer, need_haproxy
from leafmail_fixtures import (
    CLIENT,
    IO_TIMEOUT,
    PASSWORD,
    Leafmail,
    LeafmailFactory,
    RawSMTP,
    TLSFiles,
    check_spooled,
    leafmail_servers,
    make_tls,
    smtplib_send,
    toml_string,
    users_file,
)
from lifecycle_handlers import wait_until

RELAYER = "127.0.0.5"  # in relay_networks
STRANGER = "127.0.0.6"  # not
OTHER = "127.0.0.7"


def node_config(name: str, extra: str = "") -> str:
    return f"""\
hostname = "{name}"

[smtp]
proxy_from = ["{BALANCER_IP}"]
max_sessions_per_source = 2
{extra}
[relay]
local_domains = ["mx.test"]
relay_networks = ["{RELAYER}"]
"""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


@pytest.fixture
def balanced(tmp_path: Path, servers: LeafmailFactory) -> Iterator[tuple[Balancer, Leafmail]]:
    """One node behind HAProxy (the per-source tests need to know where sessions go)."""
    node = servers(node_config("mx.test"))
    balancer = Balancer(tmp_path, [node.address()])
    yield balancer, node
    balancer.stop()


def client(balancer: Balancer, source: str) -> smtplib.SMTP:
    """smtplib from `source` (a loopback address) to HAProxy."""
    return smtplib.SMTP(
        *balancer.address, local_hostname=CLIENT, timeout=IO_TIMEOUT, source_address=(source, 0)
    )


def test_relay_is_judged_by_the_client_behind_the_balancer(
    balanced: tuple[Balancer, Leafmail],
) -> None:
    balancer, node = balanced
    body = b"Subject: relayed\r\n\r\nthrough the balancer\r\n"
    with client(balancer, RELAYER) as smtp:
        qid = smtplib_send(smtp, "a@sender.test", ["b@elsewhere.test"], body)
    with client(balancer, STRANGER) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@sender.test")[0] == 250
        code, text = smtp.rcpt("b@elsewhere.test")
        assert code == 550, text  # relay denied: the stranger is not in relay_networks
        assert smtp.rcpt("local@mx.test")[0] == 250  # but may send to our domain
    check_spooled(
        node.message(qid),
        body,
        qid=qid,
        sender="a@sender.test",
        recipients=["b@elsewhere.test"],
        ip=RELAYER,
    )
    assert BALANCER_IP not in node.message(qid).data.decode()


def test_per_source_cap_counts_the_client_not_the_balancer(
    balanced: tuple[Balancer, Leafmail],
) -> None:
    balancer, node = balanced
    held = [client(balancer, STRANGER) for _ in range(2)]
    try:
        for smtp in held:
            assert smtp.noop()[0] == 250
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            client(balancer, STRANGER)
        assert refused.value.smtp_code == 421
        # Another client behind the same balancer is not held back by the first one.
        with client(balancer, OTHER) as smtp:
            assert smtp.noop()[0] == 250
    finally:
        for smtp in held:
            smtp.close()
    assert f"more than 2 connections from {STRANGER}" in node.log()
    # The connection log names the client too (the line is written when a session ends).
    assert wait_until(lambda: f"conn peer={OTHER}:" in node.log()), node.log()


def test_direct_clients_are_never_asked_for_a_header(
    balanced: tuple[Balancer, Leafmail],
) -> None:
    """A client that is not the balancer gets the greeting at once, as itself."""
    _balancer, node = balanced
    with socket.create_connection(node.address(), timeout=IO_TIMEOUT) as sock:
        assert sock.recv(512).startswith(b"220 mx.test ")


def test_a_v1_header_names_the_client_and_a_missing_one_is_dropped(
    balanced: tuple[Balancer, Leafmail],
) -> None:
    """The balancer's address without HAProxy: a v1 header works as v2 does, and a
    trusted peer that sends none is never greeted (the header is required from it)."""
    _balancer, node = balanced
    with RawSMTP(node.address(), source=BALANCER_IP) as raw:
        raw.send(f"PROXY TCP4 {RELAYER} 127.0.0.1 40000 25\r\n".encode())
        assert raw.greeting().code == 220
        raw.ehlo()
        assert raw.command("MAIL FROM:<a@sender.test>").code == 250
        assert raw.command("RCPT TO:<b@elsewhere.test>").code == 250  # judged as RELAYER
    with RawSMTP(node.address(), source=BALANCER_IP) as raw:
        raw.send(b"EHLO no.header.test\r\n")
        assert raw.at_eof()  # dropped at once: not a PROXY header
    refused = re.compile(rf'refused peer={re.escape(BALANCER_IP)}:\d+ reason="PROXY protocol: no')
    assert wait_until(lambda: refused.search(node.log()) is not None), node.log()


def test_auth_throttle_counts_the_client_behind_the_balancer(
    tmp_path: Path, servers: LeafmailFactory
) -> None:
    """Failed logins block the client the header names, not the balancer (or others)."""
    users = users_file(tmp_path, {"alice": PASSWORD})
    config = node_config("mx.test", "allow_plaintext_auth = true\n") + (
        f"[auth]\nusers_file = {toml_string(users)}\nfailure_delay = 0\nmax_failures = 2\n"
    )
    node = servers(config)
    balancer = Balancer(tmp_path, [node.address()])
    try:
        with client(balancer, STRANGER) as smtp:
            smtp.ehlo()
            for want in (535, 421):  # the second failure blocks the address
                code, _text = smtp.docmd("AUTH", "PLAIN AGFsaWNlAHdyb25n")  # alice/wrong
                assert code == want
        with pytest.raises(smtplib.SMTPConnectError) as blocked:
            client(balancer, STRANGER)
        assert blocked.value.smtp_code == 421
        with client(balancer, OTHER) as smtp:  # the balancer itself is not blocked
            assert smtp.noop()[0] == 250
    finally:
        balancer.stop()
    assert f"client={STRANGER} " in node.log()  # the line contrib/fail2ban reads


def tls_session(balancer: Balancer, role: str, tls: TLSFiles) -> smtplib.SMTP:
    """smtps from RELAYER (relays by address), or submission from STRANGER with AUTH."""
    if role == "smtps":
        return smtplib.SMTP_SSL(
            *balancer.address,
            local_hostname=CLIENT,
            timeout=IO_TIMEOUT,
            source_address=(RELAYER, 0),
            context=tls.client_context(),
        )
    smtp = client(balancer, STRANGER)
    smtp.starttls(context=tls.client_context())
    smtp.login("alice", PASSWORD)
    return smtp


@pytest.mark.parametrize("role", ["smtps", "submission"])
def test_tls_listeners_behind_the_balancer_see_the_client(
    tmp_path: Path, servers: LeafmailFactory, role: str
) -> None:
    """smtps: PROXY v2 in clear, then the TLS handshake, then SMTP as the client;
    submission: the header, then STARTTLS and AUTH; both relay and record the client."""
    tls = make_tls(tmp_path)
    users = users_file(tmp_path, {"alice": PASSWORD})
    extra = (
        f"tls_cert = {toml_string(tls.cert)}\ntls_key = {toml_string(tls.key)}\n"
        f'{role}_listen = ["127.0.0.3:0"]\n'
    )
    node = servers(node_config("mx.test", extra) + f"[auth]\nusers_file = {toml_string(users)}\n")
    # An implicit-TLS port cannot answer EHLO in clear: HAProxy only connects to check it.
    balancer = Balancer(tmp_path, [node.address("127.0.0.3")], smtpchk=role != "smtps")
    body = b"Subject: over tls\r\n\r\nbehind the balancer\r\n"
    sender = "a@sender.test" if role == "smtps" else "alice@mx.test"  # alice's own
    try:
        with tls_session(balancer, role, tls) as smtp:
            qid = smtplib_send(smtp, sender, ["b@elsewhere.test"], body)
    finally:
        balancer.stop()
    check_spooled(
        node.message(qid),
        body,
        qid=qid,
        protocol="ESMTPS" if role == "smtps" else "ESMTPSA",
        sender=sender,
        recipients=["b@elsewhere.test"],
        ip=RELAYER if role == "smtps" else STRANGER,
        tls=True,
        auth=None if role == "smtps" else "alice",
    )


def test_contrib_config_is_valid_haproxy() -> None:
    """contrib/haproxy/haproxy.cfg as shipped: HAProxy's own check accepts it."""
    need_haproxy()
    config = ROOT / "contrib" / "haproxy" / "haproxy.cfg"
    text = config.read_text()
    for needed in ("mode tcp", "send-proxy-v2", "option smtpchk", "check-send-proxy"):
        assert needed in text, needed
    done = subprocess.run(
        [HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
