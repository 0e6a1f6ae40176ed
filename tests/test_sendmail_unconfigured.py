"""`leafmail sendmail` with nothing set up: no config file and no LEAFMAIL_SPOOL (issue 12.4).

The spool is then the XDG default, which no system daemon reads. Mail left there by a
cron job or a web server's mail() would be reported sent and never leave, so sendmail
queues it only while a daemon serves that spool, and otherwise exits 75 with nothing
queued: the caller keeps the mail and says it failed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from leafmail_fixtures import LeafmailFactory, clean_env, leafmail_command, leafmail_servers

from leafmail.spool import Spool
from netserver.errors import EX_TEMPFAIL

MESSAGE = b"Subject: from cron\n\nthe job's output\n"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def sendmail(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """sendmail in a clean environment: no LEAFMAIL_* and XDG dirs under `tmp_path`."""
    return subprocess.run(
        [*leafmail_command("sendmail"), *args],
        input=MESSAGE,
        cwd=ROOT,
        env=clean_env(tmp_path),
        capture_output=True,
        timeout=30,
        check=False,
    )


def default_spool(tmp_path: Path) -> Path:
    return tmp_path / "xdg-data" / "leafmail" / "spool"


def test_with_nothing_set_up_and_no_daemon_sendmail_exits_75_and_queues_nothing(
    tmp_path: Path,
) -> None:
    done = sendmail(tmp_path, "bob@dst.test")
    assert done.returncode == EX_TEMPFAIL, done.stderr
    err = done.stderr.decode()
    assert len(err.splitlines()) == 1, err
    assert "no leafmail is set up for this user" in err and "nothing was queued" in err
    assert str(default_spool(tmp_path)) in err
    assert not default_spool(tmp_path).exists()  # not even created


def test_a_daemon_serving_the_default_spool_gets_the_mail(
    tmp_path: Path, servers: LeafmailFactory
) -> None:
    spool = default_spool(tmp_path)
    servers(spool=spool)
    done = sendmail(tmp_path, "bob@dst.test")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    (qid,) = Spool(spool, create=False).ids()
    assert Spool(spool, create=False).get(qid).data.endswith(b"the job's output\r\n")
