"""leafmail's Python API as a program calls it: `import leafmail`, submit into a real
spool, list the queue, unfreeze a message and send it to a real SMTP server (the
aiosmtpd smarthost of tests/smarthost.py). No daemon here (tests/test_api_daemon.py has
the one that submit wakes), so this file is in the fast layer."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import pytest
from smarthost import Smarthost

import leafmail

SENDER = "alice@src.test"
TEXT = b"From: <alice@src.test>\r\nSubject: api\r\n\r\nHello from Python.\r\n"


def agent(sink: Smarthost) -> leafmail.Agent:
    return leafmail.smarthost(sink.host, sink.port, helo="leaf.test", tls="none")


def test_the_api_is_what_all_names() -> None:
    for name in ("submit", "list_queue", "unfreeze", "smarthost", "Message", "Spool"):
        assert name in leafmail.__all__
        assert getattr(leafmail, name) is not None
    assert sorted(leafmail.__all__) == leafmail.__all__


def test_submit_list_unfreeze_send(tmp_path: Path, sink: Smarthost) -> None:
    spool_dir = tmp_path / "spool"  # does not exist yet: submit creates it
    qid = leafmail.submit(spool_dir, SENDER, ["bob@dst.test", "carol@dst.test"], TEXT)

    (entry,) = leafmail.list_queue(spool_dir)
    assert (entry.qid, entry.state, entry.sender) == (qid, "active", SENDER)
    assert [r["address"] for r in entry.recipients] == ["bob@dst.test", "carol@dst.test"]
    assert entry.size == len(TEXT)

    message = leafmail.unfreeze(spool_dir, qid)
    assert (message.qid, message.envelope.sender, message.data) == (qid, SENDER, TEXT)
    results = message.send(agent(sink), hostname="leaf.test")

    assert {rcpt: r.outcome for rcpt, r in results.items()} == {
        "bob@dst.test": leafmail.Outcome.DELIVERED,
        "carol@dst.test": leafmail.Outcome.DELIVERED,
    }
    (got,) = sink.received
    assert (got.sender, got.recipients, got.content) == (
        SENDER,
        ["bob@dst.test", "carol@dst.test"],
        TEXT,
    )
    assert leafmail.list_queue(spool_dir) == []  # delivered: gone from the spool
    with pytest.raises(leafmail.UnknownMessage):
        leafmail.unfreeze(spool_dir, qid)


def test_a_deferral_is_recorded_and_listed(spool: leafmail.Spool, sink: Smarthost) -> None:
    sink.behaviour.rcpt_replies["bob@dst.test"] = "451 4.3.0 try later"
    qid = leafmail.submit(spool, SENDER, ["bob@dst.test"], TEXT)
    results = leafmail.unfreeze(spool, qid).send(agent(sink), hostname="leaf.test")
    assert results["bob@dst.test"].outcome is leafmail.Outcome.DEFERRED
    (entry,) = leafmail.list_queue(spool)
    assert (entry.qid, entry.state) == (qid, "deferred")
    assert "try later" in entry.last_error
    assert entry.next_attempt > entry.arrival


def test_line_ends_become_crlf_and_an_email_message_is_accepted(spool: leafmail.Spool) -> None:
    lf = leafmail.submit(spool, SENDER, ["bob@dst.test"], b"Subject: lf\n\nline\nlast")
    assert leafmail.unfreeze(spool, lf).data == b"Subject: lf\r\n\r\nline\r\nlast\r\n"

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, "bob@dst.test", "Grüße"
    msg.set_content("naïve body\n")
    qid = leafmail.submit(spool, SENDER, ["bob@dst.test"], msg)
    stored = leafmail.unfreeze(spool, qid)
    assert b"\r\n" in stored.data and b"\n" not in stored.data.replace(b"\r\n", b"")
    assert stored.envelope.client.protocol == "local"
    assert stored.envelope.body == ("7BIT" if stored.data.isascii() else "8BITMIME")


def test_nul_octets_are_not_spooled(spool: leafmail.Spool) -> None:
    qid = leafmail.submit(spool, SENDER, ["bob@dst.test"], b"Subject: n\r\n\r\nx\r\n\x00.\r\n")
    assert leafmail.unfreeze(spool, qid).data == b"Subject: n\r\n\r\nx\r\n.\r\n"


def test_an_utf8_address_sets_smtputf8(spool: leafmail.Spool) -> None:
    qid = leafmail.submit(spool, SENDER, ["jürgen@dst.test"], TEXT)
    assert leafmail.unfreeze(spool, qid).envelope.smtputf8 is True
    plain = leafmail.submit(spool, "", ["bob@dst.test"], TEXT)  # the null sender is allowed
    assert leafmail.unfreeze(spool, plain).envelope.smtputf8 is False


@pytest.mark.parametrize(
    ("sender", "recipients", "error"),
    [
        (SENDER, [], ValueError),
        (SENDER, ["no at sign"], ValueError),
        ("bad sender@", ["bob@dst.test"], ValueError),
        (SENDER, ["bob@dst.test\r\nRCPT TO:<x@y>"], ValueError),
        (SENDER, "bob@dst.test", TypeError),
    ],
)
def test_bad_envelopes_are_refused_and_nothing_is_spooled(
    spool: leafmail.Spool, sender: str, recipients: list[str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        leafmail.submit(spool, sender, recipients, TEXT)
    assert leafmail.list_queue(spool) == []


def test_smarthost_refuses_a_password_without_tls() -> None:
    with pytest.raises(ValueError, match="unprotected"):
        leafmail.smarthost("smtp.example.test", username="me", password="secret", tls="none")  # noqa: S106
    with pytest.raises(ValueError, match="tls must be one of"):
        leafmail.smarthost("smtp.example.test", tls="ssl")
