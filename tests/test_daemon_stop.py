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

import functools
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from leafmail_fixtures import Leafmail, LeafmailFactory, RawSMTP, leafmail_servers, wait_exit

pytestmark = pytest.mark.timeout(60)

DEADLINE = 15.0
LOCAL = '[relay]\nlocal_domains = ["mx.test"]\n[local]\nusers = ["alice"]\npath = "/none/{user}"\n'


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children, their children ...)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            children = [int(c) for c in (task / "children").read_text().split()]
            found += children
            todo += children
    return found


def started_lines(log: str) -> list[str]:
    """The parent's "<role> started" lines, one per process it forked."""
    return [line for line in log.splitlines() if re.search(r' started" pid=\d+$', line)]


def service_pids(server: Leafmail) -> list[int]:
    """The queue manager's and local delivery's pids, from the "processes ready" line."""
    line = next(x for x in server.log().splitlines() if "processes ready" in x)
    return [int(m[1]) for m in re.finditer(r"(?:qmgr|local)=(\d+)", line)]


def wait_for(what: str, condition: Callable[[], bool], server: Leafmail) -> None:
    """Poll the parent's log (its only signal for this) within a deadline."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{server.log()}")
        time.sleep(0.02)


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
        wait_for("the parent to stop", lambda: "waiting for connections" in server.log(), server)
        for pid in descendants(server.proc.pid):  # the rest of what pkill does
            os.kill(pid, signal.SIGTERM)
        for pid in services:
            seen = functools.partial(exit_seen, server, pid)
            wait_for(f"the parent to see {pid} leave", seen, server)
        smtp.send(b"still accepted\r\n.\r\n")
        assert smtp.reply().code == 250
    code = wait_exit(server.proc, 30.0)
    log = server.log()
    assert code == 0, log
    assert "replacing it" not in log, log
    assert started_lines(log) == forked, log
    assert len(server.queue_ids()) == 1, log
