"""`leafmail serve` with local delivery: the RCPT check, delivery by itself while
offline, and the remote part of the same message waiting for `leafmail flush`.

Real processes throughout: the daemon, smtplib as the client, an aiosmtpd smarthost,
and the Maildir read back with Python's `mailbox`.
"""

from __future__ import annotations

import mailbox
import os
import pwd
import smtplib
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
    smtp_client,
    smtplib_send,
    toml_string,
    write_config,
)
from localusers import (
    ensure_user,
    remove_scratch,
    scratch,
)
from smarthost import Smarthost
from test_flush import wait_for

from leafmail.states import QueueState

SENDER = "carol@src.test"
ROOT_USER = os.geteuid() == 0
VIRTUAL = "lmtvirt"
MESSAGE = b"From: <carol@src.test>\r\nSubject: local\r\n\r\nHello Alice.\r\n"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)
    remove_scratch()  # the mail directory of start(), once the daemon has stopped


def start(servers: LeafmailFactory, tmp_path: Path, smarthost: str) -> tuple[Leafmail, Path]:
    """An offline daemon for leaf.test with alice's Maildir under tmp_path; its config.

    The directory that holds the mailboxes exists, as /var/mail or a home would; the
    Maildir itself is created on first delivery. alice has no account: as root she is
    written as a real unprivileged user (virtual_user), in a directory of that user's
    that tmp_path/mail points to (pytest's tmp_path is closed to other users).
    """
    virtual = ""
    if ROOT_USER:
        owner = ensure_user(VIRTUAL)
        (tmp_path / "mail").symlink_to(scratch(owner, mode=0o700))
        virtual = f'virtual_user = "{VIRTUAL}"\n'
    else:
        (tmp_path / "mail").mkdir(mode=0o700)
    mail = (tmp_path / "mail").resolve()
    config = write_config(
        tmp_path,
        f'hostname = "leaf.test"\nspool = {toml_string(tmp_path / "spool")}\n'
        '[delivery]\nmode = "offline"\ntls = "none"\n'
        f'smarthost = "{smarthost}"\n'
        "[local]\n"
        f"path = {toml_string(str(mail / '{user}'))}\n"
        'users = ["alice"]\n' + virtual,
    )
    server = servers.spawn(
        ["--config", str(config), "--listen", "127.0.0.1:0"], spool_path=tmp_path / "spool"
    )
    return server, config


def maildir_messages(tmp_path: Path, user: str) -> list[bytes]:
    path = tmp_path / "mail" / user
    # Delivery creates the Maildir's subdirectories one by one: until all three are
    # there, no message can have been delivered into it.
    if not all((path / sub).is_dir() for sub in ("tmp", "new", "cur")):
        return []
    return [m.as_bytes() for m in mailbox.Maildir(str(path), create=False)]


def test_unknown_local_users_are_refused_at_rcpt(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    server, _config = start(servers, tmp_path, sink.address)
    with smtp_client(server) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt("nobody-here@leaf.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        assert client.rcpt("alice@leaf.test")[0] == 250
        assert client.rcpt("Postmaster@leaf.test")[0] == 250  # always (RFC 5321 4.5.1)
        assert client.rcpt("bob@elsewhere.test")[0] == 250  # relayed: loopback may


def test_offline_delivers_locally_at_once_and_remote_mail_waits_for_flush(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    server, config = start(servers, tmp_path, sink.address)
    with smtp_client(server) as client:
        smtplib_send(client, SENDER, ["alice@leaf.test", "bob@elsewhere.test"], MESSAGE)

    wait_for("alice's copy", lambda: len(maildir_messages(tmp_path, "alice")) == 1)
    stored = maildir_messages(tmp_path, "alice")[0]
    assert b"Delivered-To: alice@leaf.test" in stored and stored.endswith(b"Hello Alice.\n")
    if ROOT_USER:  # the daemon is root; alice's mail was written by virtual_user, not root
        writer = pwd.getpwnam(VIRTUAL)
        box = (tmp_path / "mail" / "alice").resolve()
        for path in [box, *box.rglob("*")]:
            assert (path.stat().st_uid, path.stat().st_gid) == (writer.pw_uid, writer.pw_gid)
    assert sink.received == []  # offline: the remote copy waits

    done = subprocess.run(
        leafmail_command("flush", "--config", str(config)),
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [r.recipients for r in sink.received] == [["bob@elsewhere.test"]]
    assert len(maildir_messages(tmp_path, "alice")) == 1  # never delivered twice


def test_smtp_client_sees_a_clean_refusal_not_a_bounce(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    """All recipients unknown: the client gets the 550s; nothing is spooled."""
    server, _config = start(servers, tmp_path, sink.address)
    with smtp_client(server) as client, pytest.raises(smtplib.SMTPRecipientsRefused):
        client.sendmail(SENDER, ["ghost@leaf.test"], MESSAGE)
    spool = server.spool()
    assert spool.ids(QueueState.QUEUE) == [] and spool.ids(QueueState.DEFERRED) == []
