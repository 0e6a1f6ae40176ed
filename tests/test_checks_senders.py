"""Sender ownership and routed local parts, as tables (the fast layer)."""

from __future__ import annotations

import ipaddress

import pytest

from leafmail.checks import ACCEPT, CheckContext, Reject
from leafmail.checks.relay import ROUTING_DENIED, is_routed, relay_check
from leafmail.checks.senders import SenderLogins, sender_login_check
from netserver.admit.access import AccessPolicy
from netserver.smtp.addresses import Mailbox

LOGINS = SenderLogins(
    [("alice", ["alice@example.org", "@Example.NET."]), ("bob@example.org", ["bob@else.test"])],
    ["mx.test", "Local.Test"],
)


@pytest.mark.parametrize(
    ("user", "sender", "owned"),
    [
        ("alice", Mailbox("alice", "example.org"), True),
        ("alice", Mailbox("ALICE", "EXAMPLE.ORG."), True),
        ("alice", Mailbox("anyone", "example.net"), True),
        ("alice", Mailbox("alice", "mx.test"), False),  # listed: only the list counts
        ("alice", Mailbox("alice", "sub.example.net"), False),
        ("carol", Mailbox("carol", "mx.test"), True),  # not listed: carol@each local domain
        ("carol", Mailbox("Carol", "local.test"), True),
        ("carol", Mailbox("carol", "example.org"), False),
        ("carol", Mailbox('"carol"', "mx.test"), True),  # quoting changes nothing
        ("carol", Mailbox("alice", "mx.test"), False),
        ("dave@example.org", Mailbox("dave", "example.org"), True),  # a login that is an address
        ("dave@example.org", Mailbox("dave", "mx.test"), False),
        ("bob@example.org", Mailbox("bob", "example.org"), False),  # listed beats the default
        ("bob@example.org", Mailbox("bob", "else.test"), True),
    ],
)
def test_owns(user: str, sender: Mailbox, owned: bool) -> None:
    assert LOGINS.owns(user, sender) is owned


def test_check_judges_only_logged_in_users_and_allows_the_null_sender() -> None:
    check = sender_login_check(LOGINS)
    ip = ipaddress.ip_address("192.0.2.1")
    assert check(CheckContext(ip, sender=Mailbox("x", "y.test"))) is ACCEPT  # no login
    assert check(CheckContext(ip, user="carol", sender=None)) is ACCEPT  # <>
    verdict = check(CheckContext(ip, user="carol", sender=Mailbox("x", "y.test")))
    assert isinstance(verdict, Reject)
    assert (verdict.reply.code, verdict.reply.enhanced) == (553, "5.7.1")


@pytest.mark.parametrize(
    ("local", "routed"),
    [("u", False), ("u+tag", False), ("a%b", True), ("b!a", True), ('"a@b"', True),
     ('"a b"', False), ('"a\\@b"', True)],
)  # fmt: skip
def test_is_routed(local: str, routed: bool) -> None:
    assert is_routed(Mailbox(local, "mx.test")) is routed


def test_routed_local_recipient_refused_only_to_untrusted() -> None:
    check = relay_check(["mx.test"], AccessPolicy(allow=["127.0.0.1"]))
    rcpt = Mailbox("u%other.test", "MX.test.")
    outsider = CheckContext(ipaddress.ip_address("192.0.2.1"), recipient=rcpt)
    assert check(outsider) == Reject(ROUTING_DENIED)
    assert check(CheckContext(ipaddress.ip_address("127.0.0.1"), recipient=rcpt)) is ACCEPT
    assert (
        check(CheckContext(ipaddress.ip_address("192.0.2.1"), user="a", recipient=rcpt)) is ACCEPT
    )
