"""Two leafmail nodes behind the real HAProxy, one stopped under load (issue 15).

Each node has its own spool and trusts the balancer in ``proxy_from``; clients send
through HAProxy without pause from several threads. One node is then killed (SIGKILL)
or stopped (SIGTERM) while sessions are running:

- SIGKILL: HAProxy's check sees the node gone and new sessions go to the other one;
  once the node restarts on its spool, every message that got a 250 from either node
  is delivered to the smarthost (at least once: a delivery cut by the kill is redone).
- SIGTERM: the node stops accepting, the balancer sees it DOWN, a transaction under
  way finishes with its 250 (none is cut), idle sessions get 421, the node exits 0, and
  every 250 is in one of the two spools.
"""

from __future__ import annotations

import re
import signal
import smtplib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from haproxy import BALANCER_IP, Balancer, need_haproxy
from leafmail_fixtures import (
    CLIENT,
    IO_TIMEOUT,
    Leafmail,
    LeafmailFactory,
    leafmail_servers,
    queued_id,
    start_leafmail,
)
from smarthost import Smarthost

THREADS = 4
PER_SESSION = 3  # transactions per session
MAX_MESSAGES = 400  # a bound on the load, whatever happens
LOAD_TIMEOUT = 60.0
BODY = (b"x" * 70 + b"\r\n") * 30  # 2 KiB in lines of 72 octets
_TEST_ID = re.compile(rb"^X-Test-Id: (\S+)\r$", re.MULTILINE)


def node_config(delivery: str = "") -> str:
    return f"""\
[smtp]
proxy_from = ["{BALANCER_IP}"]
shutdown_grace = "20s"

[relay]
local_domains = ["mx.test"]
{delivery}"""


@dataclass
class Outcome:
    """What the load saw: 250s by node, transactions cut, sessions by node and time."""

    accepted: dict[str, str] = field(default_factory=dict)  # test id -> node
    cut: list[str] = field(default_factory=list)  # test ids whose transaction broke
    sessions: list[tuple[float, str]] = field(default_factory=list)  # (start, node)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Load:
    """THREADS clients sending through the balancer until `stop()` (or the bounds)."""

    def __init__(self, balancer: Balancer) -> None:
        self.address = balancer.address
        self.outcome = Outcome()
        self.stopping = threading.Event()
        self.count = 0
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(THREADS)]
        for thread in self.threads:
            thread.start()

    def accepted_by(self, node: str) -> int:
        with self.outcome.lock:
            return sum(1 for who in self.outcome.accepted.values() if who == node)

    def wait_accepted(self, node: str, count: int) -> None:
        deadline = time.monotonic() + LOAD_TIMEOUT
        while self.accepted_by(node) < count:
            assert time.monotonic() < deadline, f"{node} never reached {count} messages"
            assert any(t.is_alive() for t in self.threads), f"load ended: {self.outcome}"
            time.sleep(0.01)

    def stop(self) -> Outcome:
        self.stopping.set()
        for thread in self.threads:
            thread.join(LOAD_TIMEOUT)
        return self.outcome

    def _next_id(self, thread: int) -> str | None:
        with self.outcome.lock:
            if self.stopping.is_set() or self.count >= MAX_MESSAGES:
                return None
            self.count += 1
            return f"t{thread}-{self.count}"

    def _run(self, thread: int) -> None:
        deadline = time.monotonic() + LOAD_TIMEOUT
        while time.monotonic() < deadline and not self.stopping.is_set():
            if not self._session(thread):
                return

    def _session(self, thread: int) -> bool:
        """One session of up to PER_SESSION transactions; False when the load is over."""
        smtp = smtplib.SMTP(local_hostname=CLIENT, timeout=IO_TIMEOUT)
        try:
            code, banner = smtp.connect(*self.address)
        except (OSError, smtplib.SMTPException):
            return True  # not connected (the balancer had no node): a new session
        node = banner.split(b" ", 1)[0].decode()
        with self.outcome.lock:
            self.outcome.sessions.append((time.monotonic(), node))
        try:
            if code != 220:
                return True
            smtp.ehlo()
            for _ in range(PER_SESSION):
                test_id = self._next_id(thread)
                if test_id is None:
                    return False
                if not self._transaction(smtp, node, test_id):
                    return True
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass  # between transactions: the node went away or said 421
        finally:
            smtp.close()
        return True

    def _transaction(self, smtp: smtplib.SMTP, node: str, test_id: str) -> bool:
        """MAIL, RCPT, DATA; a break after MAIL's 250 is a cut transaction."""
        try:
            code, _ = smtp.mail("load@sender.test")
        except (OSError, smtplib.SMTPException):
            return False
        if code != 250:
            return False  # 421: the node is stopping between transactions
        body = f"X-Test-Id: {test_id}\r\nSubject: load\r\n\r\n".encode() + BODY
        try:
            code, text = smtp.rcpt("someone@remote.test")
            if code == 250:
                code, text = smtp.data(body)
        except (OSError, smtplib.SMTPException):
            code, text = 0, b"connection lost"
        with self.outcome.lock:
            if code == 250:
                queued_id(text)
                self.outcome.accepted[test_id] = node
            else:
                self.outcome.cut.append(f"{test_id} {code} {text!r}")
        return code == 250


def spooled_ids(node: Leafmail) -> set[str]:
    """The X-Test-Id of every message in the node's queue/."""
    return {m[1].decode() for msg in node.messages() if (m := _TEST_ID.search(msg.data))}


def delivered_ids(sink: Smarthost) -> set[str]:
    return {m[1].decode() for got in sink.received if (m := _TEST_ID.search(got.content))}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    need_haproxy()
    yield from leafmail_servers(tmp_path)


def start_node(
    servers: LeafmailFactory, name: str, config: str, *, listen: str, spool: Path | None = None
) -> Leafmail:
    node = start_leafmail(
        servers.tmp_path, config=config, hostname=name, listen=(listen,), spool=spool
    )
    servers.started.append(node)
    return node


def test_sigterm_under_load_cuts_no_transaction_and_loses_no_250(
    tmp_path: Path, servers: LeafmailFactory
) -> None:
    a = start_node(servers, "node-a.test", node_config(), listen="127.0.0.1:0")
    b = start_node(servers, "node-b.test", node_config(), listen="127.0.0.1:0")
    balancer = Balancer(tmp_path, [a.address(), b.address()])
    try:
        # A transaction held open on node A across the SIGTERM, deterministically.
        held = smtplib.SMTP(local_hostname=CLIENT, timeout=IO_TIMEOUT)
        _code, banner = held.connect(*balancer.address)
        while not banner.startswith(b"node-a.test"):
            held.close()
            held = smtplib.SMTP(local_hostname=CLIENT, timeout=IO_TIMEOUT)
            _code, banner = held.connect(*balancer.address)
        held.ehlo()
        assert held.mail("held@sender.test")[0] == 250
        assert held.rcpt("someone@remote.test")[0] == 250
        load = Load(balancer)
        load.wait_accepted("node-a.test", 20)
        a.terminate()
        balancer.wait_state({"a": "DOWN", "b": "UP"})  # the health check sees it gone
        after = load.accepted_by("node-b.test")
        load.wait_accepted("node-b.test", after + 20)  # new sessions go to B
        code, text = held.data(b"X-Test-Id: held\r\n\r\nacross the stop\r\n")
        assert code == 250, text  # the transaction under way was not cut
        assert held.mail("again@sender.test")[0] == 421  # then the node says goodbye
        held.close()
        outcome = load.stop()
    finally:
        balancer.stop()
    assert a.stop() == 0, a.log()
    assert outcome.cut == [], outcome.cut
    spooled = spooled_ids(a) | spooled_ids(b)
    assert "held" in spooled_ids(a)
    assert set(outcome.accepted) <= spooled, set(outcome.accepted) - spooled
    assert sum(1 for who in outcome.accepted.values() if who == "node-a.test") >= 20


def test_sigkill_under_load_moves_sessions_and_every_250_is_delivered(
    tmp_path: Path, servers: LeafmailFactory, sink: Smarthost
) -> None:
    offline = node_config('[delivery]\nmode = "offline"\n')
    a = start_node(servers, "node-a.test", offline, listen="127.0.0.1:0")
    b = start_node(servers, "node-b.test", offline, listen="127.0.0.1:0")
    balancer = Balancer(tmp_path, [a.address(), b.address()])
    try:
        load = Load(balancer)
        load.wait_accepted("node-a.test", 20)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(IO_TIMEOUT)
        a.exit_code = 0  # killed on purpose: the teardown must not count it
        balancer.wait_state({"a": "DOWN", "b": "UP"})
        moved = time.monotonic()
        after = load.accepted_by("node-b.test")
        load.wait_accepted("node-b.test", after + 20)
        outcome = load.stop()
        # Sessions that started once the balancer saw A down all went to B.
        assert {node for start, node in outcome.sessions if start > moved} == {"node-b.test"}
        # A restarts on its spool and port, now delivering; so does B.
        deliver = node_config(
            f'[delivery]\nmode = "smarthost"\nsmarthost = "{sink.address}"\ntls = "none"\n'
        )
        restarted = start_node(
            servers,
            "node-a.test",
            deliver,
            listen=f"127.0.0.1:{a.address()[1]}",
            spool=a.spool_path,
        )
        balancer.wait_state({"a": "UP", "b": "UP"})
        b.stop()
        start_node(servers, "node-b.test", deliver, listen="127.0.0.1:0", spool=b.spool_path)
        deadline = time.monotonic() + LOAD_TIMEOUT
        while not set(outcome.accepted) <= delivered_ids(sink):
            assert time.monotonic() < deadline, set(outcome.accepted) - delivered_ids(sink)
            time.sleep(0.05)
    finally:
        balancer.stop()
    assert restarted.proc.poll() is None
    assert sum(1 for who in outcome.accepted.values() if who == "node-a.test") >= 20
