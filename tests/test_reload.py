"""SIGHUP reloads `leafmail serve` while it serves (issue 13.1): a real process, real TLS.

systemd's ExecReload sends SIGHUP; the daemon used to die of it (exit 129). Now the
parent reads the config again and starts new workers with it while the old ones finish
their sessions. The test replaces the TLS certificate and the users file, opens a
session before the reload that completes after it, then checks that a new session sees
the new certificate and the new users. The "reloaded" log line is the product's signal
that the new workers serve.
"""

from __future__ import annotations

import signal
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from leafmail_fixtures import (
    CLIENT,
    IO_TIMEOUT,
    LeafmailFactory,
    leafmail_servers,
    make_tls,
    smtp_client,
    toml_string,
    users_file,
)

DEADLINE = 20.0


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll a condition with a bounded deadline (the log is the only signal)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def peer_cert(server_port: int, context: ssl.SSLContext) -> bytes:
    with smtplib.SMTP("127.0.0.1", server_port, local_hostname=CLIENT, timeout=IO_TIMEOUT) as c:
        c.starttls(context=context)
        sock = c.sock
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_sighup_reloads_tls_and_users_while_a_session_goes_on(
    servers: LeafmailFactory, tmp_path: Path
) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    tls_a, tls_b = make_tls(first), make_tls(second)
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    cert.write_bytes(tls_a.cert.read_bytes())
    key.write_bytes(tls_a.key.read_bytes())
    users = users_file(live, {"alice": "old password"})
    config = (
        f"[smtp]\ntls_cert = {toml_string(cert)}\ntls_key = {toml_string(key)}\n"
        f"[auth]\nusers_file = {toml_string(users)}\n"
    )
    server = servers(config)
    before = peer_cert(server.port, tls_a.client_context())

    # A session opened before the reload, in the middle of a transaction.
    open_session = smtp_client(server)
    open_session.ehlo()
    assert open_session.mail("a@far.test")[0] == 250
    assert open_session.rcpt("postmaster@mx.test")[0] == 250

    cert.write_bytes(tls_b.cert.read_bytes())
    key.write_bytes(tls_b.key.read_bytes())
    users_file(live, {"carol": "new password"})
    server.proc.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: "msg=reloaded" in server.log())
    assert server.proc.poll() is None, "the daemon died of SIGHUP"

    code, text = open_session.data(b"Subject: across the reload\r\n\r\nstill here\r\n")
    assert code == 250, text
    open_session.quit()

    after = peer_cert(server.port, tls_b.client_context())
    assert after != before
    with smtp_client(server) as client:
        client.starttls(context=tls_b.client_context())
        client.ehlo()
        client.login("carol", "new password")
    with smtp_client(server) as client:
        client.starttls(context=tls_b.client_context())
        client.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice", "old password")


def test_a_bad_config_on_sighup_keeps_the_running_one(
    servers: LeafmailFactory, tmp_path: Path
) -> None:
    config_path = tmp_path / "reload.toml"
    config_path.write_text("[smtp]\nmax_recipients = 5\n[process]\nworkers = 1\n")
    server = servers(args=["--config", str(config_path)])
    config_path.write_text("[smtp]\nmax_recipients = 'many'\n[process]\nworkers = 3\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_for("the refusal", lambda: "reload failed, keeping the running" in server.log())
    config_path.write_text("[smtp]\nmax_recipients = 5\n[process]\nworkers = 3\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: "msg=reloaded" in server.log())
    assert "changes only with a restart" in server.log() and "setting=process" in server.log()
    with smtp_client(server) as client:
        assert client.noop()[0] == 250
