"""SIGKILL while one domain of a message is done and another still in DATA.

A message to two domains is delivered by MX (a loopback DNS server and two aiosmtpd MX
hosts, as in tests/test_mx_delivery.py) by a real `leafmail flush --no-daemon`. The MX
of a.test takes it at once; the MX of b.test holds the transaction in DATA, as a slow
or stuck server does for up to the delivery deadline (15 minutes by default). While it
hangs, the status record must already say a.test's recipient is delivered, so that the
SIGKILL then, and the restart, do not send a.test the message again.
"""

from __future__ import annotations

import signal
from pathlib import Path

from crash_support import audit, message_bytes, sigkill
from leafmail_fixtures import run_flush, start_flush_alone, toml_string, write_config
from test_flush import wait_for
from test_mx_delivery import MxWorld

from leafmail.envelope import Envelope, Recipient
from leafmail.spool import Spool
from leafmail.status import MessageStatus, RcptState

SENDER = "sender@client.test"
WAIT = 30.0


def mx_config(tmp_path: Path, world: MxWorld) -> Path:
    """Direct MX delivery through the test's DNS server and MX port, plain SMTP allowed."""
    return write_config(
        tmp_path,
        f'hostname = "leaf.test"\nspool = {toml_string(tmp_path / "spool")}\n\n'
        '[delivery]\nmode = "mx"\nconnect_timeout = 10\ncommand_timeout = 300\n'
        "deadline = 600\n\n"
        f"[dns]\nnameservers = [{toml_string(world.dns.host)}]\nport = {world.dns.port}\n\n"
        f"[mx]\nport = {world.port}\nmta_sts = false\n",
    )


def states(spool: Path, qid: str) -> list[RcptState] | None:
    """The recorded state of each recipient, None before the first record."""
    store = Spool(spool, create=False)
    blob = store.read_status(qid)
    if blob is None:
        return None
    return [r.state for r in MessageStatus.from_bytes(blob, store.get(qid).envelope).recipients]


def test_a_domain_delivered_while_another_hangs_is_recorded_before_the_kill(
    tmp_path: Path,
) -> None:
    world = MxWorld(tmp_path)
    try:
        fast = world.mx("mx.a.test", "127.0.0.2")
        slow = world.mx("mx.b.test", "127.0.0.3")
        world.records("a.test", "MX", "10 mx.a.test")
        world.records("b.test", "MX", "10 mx.b.test")
        slow.behaviour.hang_at_data = True
        spool = tmp_path / "spool"
        data = message_bytes(1, 2_000)
        rcpts = (Recipient("rcpt@a.test"), Recipient("rcpt@b.test"))
        qid = Spool(spool).commit(Envelope(SENDER, rcpts), data)
        config = mx_config(tmp_path, world)

        proc = start_flush_alone(tmp_path, config)
        try:
            wait_for("b.test's MX to hold it in DATA", lambda: slow.data_sessions > 0, WAIT)
            wait_for("a.test's MX to take the message", lambda: bool(fast.received), WAIT)
            wait_for(
                "a.test's delivery to be recorded while b.test hangs",
                lambda: states(spool, qid) == [RcptState.DELIVERED, RcptState.PENDING],
                WAIT,
            )
        finally:
            assert sigkill(proc) == -signal.SIGKILL
        slow.behaviour.hang_at_data = False

        done = run_flush(tmp_path, config, "--no-daemon", timeout=WAIT * 2)
        assert done.returncode == 0, done.stderr
        assert [(g.content, g.recipients) for g in fast.received] == [(data, ["rcpt@a.test"])]
        assert [(g.content, g.recipients) for g in slow.received] == [(data, ["rcpt@b.test"])]
        assert audit(spool).empty(), audit(spool)
    finally:
        world.stop()
