"""leafmail.submit wakes a running `leafmail serve` on the same spool: the message is
delivered at once, not at the daemon's next queue scan (60 s away)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from leafmail_fixtures import (
    LeafmailFactory,
    leafmail_servers,
    smtp_client,
    smtplib_send,
    toml_string,
    write_config,
)
from smarthost import Smarthost

import leafmail
from leafmail.queue import SCAN_INTERVAL

SENDER = "alice@src.test"
TEXT = b"From: <alice@src.test>\r\nSubject: api\r\n\r\nSubmitted from Python.\r\n"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> None:
    """Poll a condition the product gives no signal for, within a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def until(moment: float) -> float:
    """Seconds from now to `moment` (time.monotonic)."""
    return moment - time.monotonic()


def test_submit_wakes_the_daemon_which_delivers_at_once(
    servers: LeafmailFactory, sink: Smarthost, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    config = write_config(
        tmp_path,
        f'hostname = "leaf.test"\nspool = {toml_string(spool)}\n\n'
        f'[delivery]\nmode = "smarthost"\ntls = "none"\nsmarthost = "{sink.address}"\n',
    )
    started = time.monotonic()
    daemon = servers.spawn(["--config", str(config), "--listen", "127.0.0.1:0"], spool_path=spool)
    # The runner's first scan comes after `started`, so its next one not before this:
    # what is delivered sooner was delivered because of the wake. (A fixed 5 s, which a
    # loaded machine can take to deliver, proved no more.)
    before_the_rescan = started + SCAN_INTERVAL - 1.0
    # Once a message sent by SMTP is delivered, the runner's first pass is over and it
    # sleeps until its next scan: only a wake can make it deliver sooner.
    with smtp_client(daemon) as client:
        marker = smtplib_send(client, SENDER, ["first@dst.test"], TEXT)
    wait_for("the first delivery", lambda: f"qid={marker} result=delivered" in daemon.log(), 20)

    qid = leafmail.submit(spool, SENDER, ["bob@dst.test"], TEXT)

    wait_for("the submitted message", lambda: len(sink.received) == 2, until(before_the_rescan))
    got = sink.received[1]
    assert (got.sender, got.recipients, got.content) == (SENDER, ["bob@dst.test"], TEXT)
    wait_for("the spool to empty", lambda: leafmail.list_queue(spool) == [], 20)
    assert f"qid={qid} result=delivered" in daemon.log()
