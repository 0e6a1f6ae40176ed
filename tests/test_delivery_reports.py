"""Delivery reports end to end: success DSNs, bounces of 8-bit mail, local domains.

Real processes throughout: `leafmail serve`, smtplib as the client, aiosmtpd as the
smarthost (it does not speak DSN, and can be told not to offer 8BITMIME), Maildirs in
tmp_path, and a second `leafmail serve` as a next hop that does speak DSN.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from leafmail_fixtures import (
    Leafmail,
    LeafmailFactory,
    clean_env,
    leafmail_command,
    leafmail_servers,
    run_flush,
    smtp_client,
    smtplib_send,
    toml_string,
    write_config,
)
from localusers import give_to_virtual, virtual_tmp, virtual_user_toml
from smarthost import Received, Smarthost
from test_flush import wait_for

from leafmail.config import _build
from leafmail.states import QueueState
from netserver.errors import EX_TEMPFAIL, ConfigError

pytestmark = pytest.mark.timeout(60)

SENDER = "carol@src.test"
NULL = "<>"


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """As root, a directory the virtual user (who writes alice's mail) can reach."""
    yield from virtual_tmp(tmp_path)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def start(
    servers: LeafmailFactory, tmp_path: Path, smarthost: str, *, local: bool = True
) -> Leafmail:
    """leaf.test delivering by itself: local mail to Maildirs, the rest to `smarthost`."""
    (tmp_path / "mail").mkdir(mode=0o700, exist_ok=True)
    give_to_virtual(tmp_path / "mail")  # as root, alice's and postmaster's writer (12.3)
    (tmp_path / "aliases").write_text("team: alice, dave@far.test\n", encoding="utf-8")
    text = (
        f'hostname = "leaf.test"\nspool = {toml_string(tmp_path / "spool")}\n'
        '[relay]\nlocal_domains = ["leaf.test"]\n'
        '[delivery]\nmode = "smarthost"\ntls = "none"\n'
        f'smarthost = "{smarthost}"\nretry_initial = "1h"\n'
    )
    if local:
        text += (
            "[local]\n"
            f"path = {toml_string(str(tmp_path / 'mail' / '{user}'))}\n"
            'users = ["alice"]\n'
            f"aliases = {toml_string(tmp_path / 'aliases')}\n" + virtual_user_toml()
        )
    config = write_config(tmp_path, text)
    return servers.spawn(
        ["--config", str(config), "--listen", "127.0.0.1:0"], spool_path=tmp_path / "spool"
    )


def reports_to(sink: Smarthost, sender: str) -> list[Received]:
    return [r for r in sink.received if r.sender == NULL and r.recipients == [sender]]


def status_blocks(content: bytes) -> list[dict[str, str]]:
    """The delivery-status part's blocks as dicts (parsed by the email package)."""
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            assert isinstance(blocks, list)
            found = []
            for block in blocks:
                assert isinstance(block, email.message.Message)
                found.append({k: str(v) for k, v in block.items()})
            return found
    raise AssertionError("no message/delivery-status part")


# --- issue 13.5: NOTIFY=SUCCESS ----------------------------------------------------------


def test_notify_success_gives_delivered_relayed_and_expanded_reports(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    server = start(servers, tmp_path, sink.address)
    body = b"From: <carol@src.test>\r\nSubject: tell me\r\n\r\nPlease confirm.\r\n"
    with smtp_client(server) as client:
        client.ehlo()
        assert client.has_extn("dsn")
        assert client.mail(SENDER, ["RET=HDRS", "ENVID=env-42"])[0] == 250
        for rcpt in ("alice@leaf.test", "bob@far.test", "team@leaf.test"):
            options = ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;orig-{rcpt}"]
            assert client.rcpt(rcpt, options)[0] == 250
        assert client.data(body)[0] == 250

    wait_for("the success report", lambda: len(reports_to(sink, SENDER)) >= 1)
    wait_for("dave's copy", lambda: any("dave@far.test" in r.recipients for r in sink.received))
    (report,) = reports_to(sink, SENDER)
    text = report.content.decode()
    assert "Subject: Successful Mail Delivery Report" in text
    blocks = status_blocks(report.content)
    assert blocks[0]["Original-Envelope-Id"] == "env-42"
    actions = {b["Final-Recipient"]: (b["Action"], b["Original-Recipient"]) for b in blocks[1:]}
    assert actions == {
        "rfc822; alice@leaf.test": ("delivered", "rfc822;orig-alice@leaf.test"),
        "rfc822; bob@far.test": ("relayed", "rfc822;orig-bob@far.test"),
        "rfc822; team@leaf.test": ("expanded", "rfc822;orig-team@leaf.test"),
    }
    assert "Please confirm." not in text  # a success report returns headers only
    # The copy for dave asks for no second success report (the expansion was it),
    # and still carries the ORCPT of the alias; aiosmtpd has no DSN, so it is not
    # passed on, but no further report arrives either.
    assert len(reports_to(sink, SENDER)) == 1


def test_no_success_report_without_notify_success(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    server = start(servers, tmp_path, sink.address)
    with smtp_client(server) as client:
        smtplib_send(client, SENDER, ["bob@far.test"], b"Subject: quiet\r\n\r\nx\r\n")
    wait_for("bob's copy", lambda: len(sink.received) == 1)
    server.stop()
    assert reports_to(sink, SENDER) == []


def test_a_next_hop_with_dsn_gets_notify_orcpt_envid_and_reports_itself(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    """Relayed to a next hop that speaks DSN (another leafmail): no report from us."""
    hop_dir = tmp_path / "hop"
    hop_dir.mkdir()
    hop_config = write_config(
        hop_dir,
        f'hostname = "hop.test"\nspool = {toml_string(hop_dir / "spool")}\n'
        '[relay]\nlocal_domains = ["far.test"]\n[delivery]\nmode = "offline"\n'
        f'smarthost = "{sink.address}"\ntls = "none"\n',
    )
    hop = servers.spawn(
        ["--config", str(hop_config), "--listen", "127.0.0.1:0"], spool_path=hop_dir / "spool"
    )
    server = start(servers, tmp_path, f"127.0.0.1:{hop.port}", local=False)
    with smtp_client(server) as client:
        smtplib_send(
            client,
            SENDER,
            ["bob@far.test"],
            b"Subject: hop\r\n\r\nx\r\n",
            mail_options=["ENVID=env-7"],
            rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;bob@far.test"],
        )
    wait_for("the hop to spool it", lambda: len(hop.spool().ids(QueueState.QUEUE)) >= 1)
    server.stop()  # its queue is empty once the hop took the message; nothing else comes
    messages = hop.messages()
    assert [m.envelope.sender for m in messages] == [SENDER]  # no report from leaf.test
    (rcpt,) = messages[0].envelope.recipients
    assert (rcpt.notify, rcpt.orcpt) == (("SUCCESS",), "rfc822;bob@far.test")
    assert messages[0].envelope.envid == "env-7"


# --- issue 13.2: an alias's forward is made once however often the alias is retried -------


def test_forward_of_a_partly_deferred_alias_is_sent_once(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    server = start(servers, tmp_path, sink.address)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "mail" / "alice").symlink_to(elsewhere)  # refused: alice's copy defers
    with smtp_client(server) as client:
        smtplib_send(client, SENDER, ["team@leaf.test"], b"Subject: team\r\n\r\nhi\r\n")
    wait_for("dave's copy", lambda: len(sink.received) == 1)
    config = sorted(tmp_path.glob("leafmail-*.toml"))[-1]
    for _ in range(3):  # forced passes: alice defers each time
        assert run_flush(tmp_path, config).returncode == EX_TEMPFAIL
    assert [r.recipients for r in sink.received] == [["dave@far.test"]]
    (tmp_path / "mail" / "alice").unlink()
    assert run_flush(tmp_path, config).returncode == 0
    assert len(list((tmp_path / "mail" / "alice" / "new").iterdir())) == 1
    assert [r.recipients for r in sink.received] == [["dave@far.test"]]


# --- issue 13.3: the bounce of 8-bit mail through a 7-bit smarthost ----------------------


def test_bounce_of_8bit_mail_passes_a_smarthost_without_8bitmime(
    servers: LeafmailFactory, hosts_7bit: Smarthost, tmp_path: Path
) -> None:
    server = start(servers, tmp_path, hosts_7bit.address, local=False)
    body = (
        b"From: <carol@src.test>\r\nSubject: caf\xc3\xa9\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nCaf\xc3\xa9 au lait.\r\n"
    )
    with smtp_client(server) as client:
        smtplib_send(client, SENDER, ["bob@far.test"], body, mail_options=["BODY=8BITMIME"])
    wait_for("the bounce", lambda: len(reports_to(hosts_7bit, SENDER)) == 1)
    (bounce,) = reports_to(hosts_7bit, SENDER)
    assert bounce.content.isascii()
    blocks = status_blocks(bounce.content)
    assert (blocks[1]["Action"], blocks[1]["Status"]) == ("failed", "5.6.3")
    # The smarthost is known by its address: Remote-MTA is its address literal (RFC 3464
    # 2.3.5), and the diagnostic is ours about it, not a reply it sent (2.3.6).
    assert blocks[1]["Remote-MTA"] == "dns; [127.0.0.1]"
    assert blocks[1]["Diagnostic-Code"].startswith("X-Leafmail; 554 5.6.3 ")
    msg = email.message_from_bytes(bounce.content, policy=email.policy.default)
    returned = [p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert len(returned) == 1
    headers = returned[0].get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert "Subject: café".encode() in headers  # quoted-printable on the wire, decoded here
    assert b"au lait" not in headers


@pytest.fixture
def hosts_7bit() -> Iterator[Smarthost]:
    """A smarthost that does not offer 8BITMIME (aiosmtpd with decode_data)."""
    host = Smarthost(eightbitmime=False).start()
    try:
        yield host
    finally:
        host.stop()


# --- issue 13.4: double bounces and local_domains without [local] --------------------------


def test_an_undeliverable_bounce_reaches_the_local_postmaster(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    sink.behaviour.rcpt_replies["bob@far.test"] = "550 5.1.1 no bob here"
    sink.behaviour.rcpt_replies[SENDER] = "550 5.1.1 and no carol either"
    server = start(servers, tmp_path, sink.address)
    with smtp_client(server) as client:
        smtplib_send(client, SENDER, ["bob@far.test"], b"Subject: lost\r\n\r\nx\r\n")
    box = tmp_path / "mail" / "postmaster"
    wait_for(
        "the postmaster's copy", lambda: (box / "new").is_dir() and any((box / "new").iterdir())
    )
    (path,) = (box / "new").iterdir()
    report = path.read_bytes()
    assert b"Subject: Postmaster Copy: Undeliverable Bounce" in report
    assert b"550 5.1.1 and no carol either" in report
    (carol,) = status_blocks(report)[1:]
    assert carol["Remote-MTA"] == "dns; [127.0.0.1]"
    assert carol["Diagnostic-Code"] == "smtp; 550 5.1.1 and no carol either"
    assert sink.received == []
    server.stop()
    assert "undeliverable bounce reported to the postmaster" in server.log()
    assert "postmaster@leaf.test" in server.log()


def test_local_domain_without_local_table_by_mx_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f'hostname = "leaf.test"\nspool = {toml_string(tmp_path / "spool")}\n'
        '[relay]\nlocal_domains = ["leaf.test"]\n[delivery]\nmode = "mx"\n',
    )
    done = subprocess.run(
        leafmail_command("serve", "--config", str(config), "--listen", "127.0.0.1:0"),
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "relay.local_domains has 'leaf.test' but there is no [local] table" in lines[0]


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (None, "postmaster@leaf.test"),  # the default: qualified with the first local domain
        ("hostmaster", "hostmaster@leaf.test"),
        ("ops@example.org", "ops@example.org"),
        ("", ""),  # switched off: dropped, and logged as an error
    ],
)
def test_double_bounce_to(value: str | None, address: str) -> None:
    delivery = {} if value is None else {"double_bounce_to": value}
    raw = {"hostname": "mx.leaf.test", "relay": {"local_domains": ["leaf.test"]}}
    config = _build({**raw, "delivery": delivery}, "test")
    assert config.double_bounce_address == address


@pytest.mark.parametrize("value", ["a b", "x@", "<x@y.test>"])
def test_double_bounce_to_must_be_an_address(value: str) -> None:
    with pytest.raises(ConfigError, match=r"double_bounce_to .* is not an address"):
        _build({"hostname": "h.test", "delivery": {"double_bounce_to": value}}, "test")


def test_local_domain_without_local_table_through_a_smarthost_is_allowed() -> None:
    """The null client: the provider's server holds the mailboxes of our domain."""
    raw = {
        "hostname": "leaf.test",
        "relay": {"local_domains": ["leaf.test"]},
        "delivery": {"mode": "smarthost", "smarthost": "smtp.provider.test:587"},
    }
    assert _build(raw, "test").route_for("leaf.test") == "smarthost"
