"""`leafmail serve` stopping while its children are signalled too (pkill, killall).

``pkill leafmail`` sends SIGTERM to the parent and to every child. The children leave on
their own; the parent stops its listeners, waits for the sessions in progress (up to
``smtp.shutdown_grace``), then stops the queue manager and local delivery. A child it
sees leave while it is stopping is not a crash: it must not start a replacement. It
used to: "qmgr died; replacing it" and a new queue manager, which it then had to stop
again after it had logged "stopped". Postfix's master, once terminating, starts no
service process either.

The test takes the signals in the order that shows this without a race: the parent
first, a session kept in DATA so the parent stays in its stopping phase, then every
child. The message of that session is still accepted and stays queued.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from leafmail_fixtures import Leafmail, LeafmailFactory, RawSMTP, leafmail_servers, wait_exit
from lifecycle_handlers import descendants, wait_until

pytestmark = pytest.mark.timeout(60)

DEADLINE = 15.0
LOCAL = '[relay]\nlocal_domains = ["mx.test"]\n[local]\nusers = ["alice"]\npath = "/none/{user}"\n'


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def started_lines(log: str) -> list[str]:
    """The parent's "<role> started" lines, one per process it forked."""
    return [line for line in log.splitlines() if re.search(r' started" pid=\d+$', line)]


def service_pids(server: Leafmail) -> list[int]:
    """The queue manager's and local delivery's pids, from the "processes ready" line."""
    line = next(x for x in server.log().splitlines() if "processes ready" in x)
    return [int(m[1]) for m in re.finditer(r"(?:qmgr|local)=(\d+)", line)]


def exit_seen(server: Leafmail, pid: int) -> bool:
    """The parent logged something of `pid` besides its start: it saw it leave."""
    lines = server.log().splitlines()
    return any(f"pid={pid}" in line and " started" not in line for line in lines)


@pytest.mark.parametrize("config", ["", LOCAL], ids=["smtpd+qmgr", "with-local"])
def test_children_that_leave_while_the_parent_stops_are_not_replaced(
    servers: LeafmailFactory, config: str
) -> None:
    server = servers("[smtp]\nshutdown_grace = 30\n" + config)
    forked = started_lines(server.log())
    services = service_pids(server)
    assert len(services) == (2 if config else 1), server.log()
    with RawSMTP(server.address()) as smtp:
        smtp.greeting()
        smtp.ehlo()
        assert smtp.command("MAIL FROM:<bob@client.test>").code == 250
        assert smtp.command("RCPT TO:<alice@mx.test>").code == 250
        assert smtp.command("DATA").code == 354
        smtp.send(b"Subject: cut short\r\n\r\n")
        server.terminate()
        assert wait_until(lambda: "waiting for connections" in server.log(), DEADLINE), server.log()
        for pid in descendants(server.proc.pid):  # the rest of what pkill does
            with contextlib.suppress(ProcessLookupError):  # one may have left since
                os.kill(pid, signal.SIGTERM)
        for pid in services:
            # the parent's log is its only signal that it saw the child leave
            assert wait_until(functools.partial(exit_seen, server, pid), DEADLINE), server.log()
        smtp.send(b"still accepted\r\n.\r\n")
        assert smtp.reply().code == 250
    code = wait_exit(server.proc, 30.0)
    log = server.log()
    assert code == 0, log
    assert "replacing it" not in log, log
    assert started_lines(log) == forked, log
    assert len(server.queue_ids()) == 1, log
