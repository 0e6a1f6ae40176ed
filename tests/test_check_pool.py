"""Bounded per-message work (issue 12.6): the check pool's budget and the header limits.

The pool is driven directly (a job that burns CPU is killed by RLIMIT_CPU, one that
outlasts the wall-clock limit is killed by the parent; both are reaped and replaced),
and through a real `leafmail serve`: while a hostile message (a To: field of 110,000
addresses, 990 KB, about 10 s of CPU) is being checked, another client still gets its 220
within a second, and the hostile message gets the temporary answer (451 under
``rfc5322 = "reject"``). With the default header limits the same message is refused
at once, before any parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from dnsserver import LoopbackDNS
from leafmail_fixtures import CLIENT, Leafmail, LeafmailFactory, leafmail_servers
from test_checks_received import RECEIVED_MX, hops
from test_checks_serve import make_dkim_key

from leafmail.checks import ACCEPT, CheckContext, Defer, Stage, Tag
from leafmail.checks.jobs import OVER_BUDGET
from leafmail.checks.limits import HEADER_TOO_BIG, TOO_MANY_FIELDS, header_limit_problem
from leafmail.checks.pool import WORKER_NAME, CheckPool
from leafmail.config import ChecksConfig, Config, RelayConfig
from leafmail.datarate import DataRate
from leafmail.policy import policy_for

pytestmark = pytest.mark.timeout(60)

GOOD = b"From: a@example.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nhi\r\n"
ADDRESSES = 110_000
LINE = b" ".join([b"a.b@c.d,"] * 10)  # folded, so no line passes 1000 octets
HOSTILE_TO = b"To: " + b"\r\n ".join([LINE] * (ADDRESSES // 10)) + b" v@mx.test"
HOSTILE = (
    b"From: a@example.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    + HOSTILE_TO
    + b"\r\nSubject: x\r\n\r\nbody\r\n"
)


# --- the pool itself ------------------------------------------------------------------


def worker_children() -> list[int]:
    """The pids of this process's children that are check workers, alive or zombie."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        try:
            listed = (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that ended since the listing
            continue
        for pid in listed:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_bytes().strip() == WORKER_NAME:
                    found.append(int(pid))
    return found


def test_a_job_over_its_cpu_budget_is_killed_reaped_and_replaced() -> None:
    async def run() -> None:
        # The wall-clock budget is far beyond the CPU one: on a loaded machine 1 s of
        # CPU can take many seconds, and the test is about who kills, not how fast.
        pool = CheckPool(workers=1, cpu_limit=1.0, time_limit=45.0)
        try:
            assert await pool.run("rfc5322", {"body": None, "smtputf8": False}, GOOD)
            (worker,) = pool._idle  # the worker the busy job will run in
            assert await pool.run("busy", {}, b"") is None
            # The kernel (RLIMIT_CPU: SIGXCPU), not the wall clock (the pool's SIGKILL).
            assert worker.ended.result() == -signal.SIGXCPU
            assert pool.killed == 1 and not pool._idle
            assert worker_children() == []  # killed and reaped, not left behind
            answer = await pool.run("rfc5322", {"body": None, "smtputf8": False}, GOOD)
            assert answer == {"problems": []}
            assert len(worker_children()) == 1
        finally:
            await pool.close()

    asyncio.run(run())


def test_a_job_over_its_time_budget_is_killed_by_the_parent() -> None:
    async def run() -> None:
        pool = CheckPool(workers=1, cpu_limit=60.0, time_limit=0.5)
        try:
            assert await pool.run("busy", {}, b"") is None
            assert pool.killed == 1
            answer = await pool.run("rfc5322", {"body": None, "smtputf8": False}, b"x\r\n")
            assert answer is not None and "no From field" in answer["problems"]
        finally:
            await pool.close()

    asyncio.run(run())


# --- header limits, before parsing ----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "size", "fields", "reply"),
    [
        (GOOD, 100, 10, None),
        (GOOD, 20, 10, HEADER_TOO_BIG),
        (GOOD, 100, 1, TOO_MANY_FIELDS),
        (b"A: 1\r\n 2\r\n\t3\r\nB: 4\r\n\r\n", 100, 2, None),  # folded lines are one field
        (b"A: 1\r\n" * 3, 100, 2, TOO_MANY_FIELDS),  # no body at all
        (b"A: " + b"x" * 200, 100, 10, HEADER_TOO_BIG),
        (HOSTILE, 102400, 1000, HEADER_TOO_BIG),
    ],
)
def test_header_limits(data: bytes, size: int, fields: int, reply: object) -> None:
    assert header_limit_problem(data, size, fields) == reply


# --- through a real server ------------------------------------------------------------


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


CONFIG = (
    "[relay]\nrelay_networks = []\n[smtp]\nmax_header_size = 1048576\n"
    '[checks]\nrfc5322 = "reject"\nreceived = "off"\nspf = "off"\ndkim = "off"\n'
    'workers = 1\ncpu_limit = "2s"\ntime_limit = "4s"\n'
)


def send(server: Leafmail, message: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(*server.address(), local_hostname=CLIENT, timeout=30) as client:
        client.ehlo()
        client.mail("a@example.test")
        client.rcpt("v@mx.test")
        return client.data(message)


def greeting_time(server: Leafmail) -> float:
    """How long a real client (smtplib) waits for its 220, connect included."""
    started = time.monotonic()
    client = smtplib.SMTP(*server.address(), local_hostname=CLIENT, timeout=10)
    waited = time.monotonic() - started
    client.close()
    return waited


class StallWatch(threading.Thread):
    """How late this process's threads got the CPU back while it ran (the largest
    oversleep of a 10 ms sleep): a stall of the whole machine, not of the server."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stall = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            due = time.monotonic() + 0.01
            time.sleep(0.01)
            self.stall = max(self.stall, time.monotonic() - due)


def check_bounded(server: Leafmail, hostile: bytes, answer: tuple[int, bytes]) -> None:
    """While `hostile` is checked, others get their 220 in time; it gets `answer`."""
    assert send(server, GOOD)[0] == 250  # the pool works, and has its worker
    result: list[tuple[int, bytes]] = []
    sender = threading.Thread(target=lambda: result.append(send(server, hostile)))
    watch = StallWatch()
    started = time.monotonic()
    watch.start()
    sender.start()
    waits = []
    while sender.is_alive() and time.monotonic() - started < 30:
        waits.append(greeting_time(server))
    sender.join(30)
    watch.done.set()
    watch.join()
    assert result, "the hostile message got no answer"
    code, text = result[0]
    assert (code, text[:5]) == answer, result
    assert waits, "the hostile message was answered before any other client connected"
    # Generous: a greeting normally takes milliseconds. A stall of the whole machine
    # (this process's too, as a loaded CI box has) is not the server's doing.
    assert max(waits) < 1.0 + watch.stall, (waits, watch.stall)
    assert send(server, GOOD)[0] == 250  # a fresh worker checks the next message
    assert "check over budget" in server.log()


def test_hostile_header_is_bounded_and_others_are_served(servers: LeafmailFactory) -> None:
    check_bounded(servers(CONFIG), HOSTILE, (451, b"4.7.0"))


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, str]:
    return make_dkim_key()


def dkim_bomb(pem: bytes) -> bytes:
    """Five signatures whose h= names 6,000 absent fields, over 900 present ones."""
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(900))
    message = GOOD.replace(b"\r\n\r\n", b"\r\n" + fields + b"\r\n", 1)
    names = [b"from"] + [b"x-absent-%d" % i for i in range(6000)]
    signature: bytes = dkim.sign(message, b"sel", b"example.test", pem, include_headers=names)
    return signature * 5 + message


def test_dkim_with_thousands_of_absent_fields_is_bounded(
    servers: LeafmailFactory, dkim_key: tuple[bytes, str]
) -> None:
    with LoopbackDNS({("sel._domainkey.example.test", "TXT"): [dkim_key[1]]}) as dns:
        # Only DKIM on: the temporary answer can come from nothing else.
        # The five signatures cost about 2 s of CPU on this machine's kind: the budget
        # must be well below that on a fast core too, or the bomb is simply verified.
        config = CONFIG.replace('dkim = "off"', 'dkim = "reject"')
        config = config.replace('cpu_limit = "2s"', 'cpu_limit = "0.4s"')
        config = config.replace('rfc5322 = "reject"', 'rfc5322 = "off"').replace(
            "max_header_size = 1048576", "max_header_size = 4194304\nmax_header_fields = 5000"
        )
        config += f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\ntimeout = 3\n'
        check_bounded(servers(config), dkim_bomb(dkim_key[0]), (451, b"4.7.0"))
        assert any(name == "sel._domainkey.example.test" for name, _ in dns.queries)


def test_default_header_limit_refuses_the_hostile_header(servers: LeafmailFactory) -> None:
    server = servers('[checks]\nrfc5322 = "reject"\n')
    code, text = send(server, HOSTILE)
    assert (code, text[:5]) == (552, b"5.3.4"), (code, text)


def test_one_huge_address_is_refused_within_the_budget(servers: LeafmailFactory) -> None:
    """A To: of "a.a.a." under the default header limit (100 KB) cost 11 s of CPU in
    the email package's parser, far past a 2 s budget: 451 after 2 s. Parsed in
    bounded parts (leafmail.checks.addresslist), it gets its answer at once."""
    line = b" ".join([b"a." * 30] * 2)
    hostile = HOSTILE.replace(HOSTILE_TO, b"To: " + b"\r\n ".join([line] * 800) + b"a <v@mx.test>")
    server = servers(CONFIG.replace("max_header_size = 1048576", "max_header_size = 102400"))
    code, text = send(server, hostile)
    assert (code, text[:5]) == (550, b"5.6.0"), (code, text)
    assert b"To address over 2048 characters" in text
    assert "check over budget" not in server.log()


# --- minimum data rate (smtpd_min_data_rate) --------------------------------------------


def test_data_rate_deadline_with_an_injected_clock() -> None:
    now = [100.0]
    rate = DataRate(min_rate=500, grace=10.0, clock=lambda: now[0])
    assert rate.remaining() is None
    rate.track(True)
    rate.add(1000)  # buys 2 s
    now[0] += 11.0
    assert rate.remaining() == pytest.approx(1.0)
    now[0] += 2.0
    remaining = rate.remaining()
    assert remaining is not None and remaining < 0
    rate.track(False)
    assert rate.remaining() is None


def test_a_client_trickling_data_is_cut_with_421(servers: LeafmailFactory) -> None:
    server = servers("[smtp]\nmin_data_rate = 1000\ndata_rate_grace = 0.3\n")
    with socket.create_connection(server.address(), timeout=10) as sock:
        reader = sock.makefile("rb", buffering=0)
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<v@mx.test>\r\nDATA\r\n")
        lines: list[bytes] = []
        while not lines or not lines[-1].startswith(b"354"):
            lines.append(reader.readline())
        started = time.monotonic()
        reply = b""
        sock.settimeout(0.05)
        for _ in range(100):  # 10 octets every 0.05 s: 200 octets/s, below 1000
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"x" * 8 + b"\r\n")  # the server may have closed already
            try:
                reply = sock.recv(512)
                break
            except TimeoutError:
                continue
        assert reply.startswith(b"421 4.4.2"), reply
        assert time.monotonic() - started < 3.0


# --- the pooled checks judge as the in-process ones ------------------------------------


@pytest.mark.parametrize("mode", ["tag", "reject"])
def test_pooled_content_checks_give_the_in_process_verdicts(mode: str) -> None:
    config = Config(
        hostname="mx.test",
        relay=RelayConfig(relay_networks=("127.0.0.1/32",)),
        checks=ChecksConfig(rfc5322=mode, received=mode, spf="off", dkim="off"),
    )
    messages = [GOOD, RECEIVED_MX + GOOD, hops(45) + GOOD, b"x\r\n", HOSTILE[:2000] + b"\r\n\r\n"]

    async def compare() -> None:
        pool = CheckPool(workers=1)
        pooled, local = policy_for(config, pool), policy_for(config)
        try:
            for data in messages:
                verdicts = []
                for policy in (pooled, local):
                    facts = CheckContext(ipaddress.ip_address("192.0.2.1"), data=data)
                    verdicts.append(await policy.judge_async(Stage.END_OF_DATA, facts))
                assert verdicts[0] == verdicts[1], data[:80]
                assert verdicts[0] != ACCEPT or data == GOOD
        finally:
            await pool.close()

    asyncio.run(compare())


def test_a_worker_that_cannot_allocate_gives_a_temporary_result() -> None:
    async def run() -> None:
        pool = CheckPool(workers=1, cpu_limit=10.0, time_limit=20.0)
        try:
            assert await pool.run("allocate", {"octets": 4 << 30}, b"") is None
            answer = await pool.run("rfc5322", {"body": None, "smtputf8": False}, GOOD)
            assert answer == {"problems": []}  # a fresh worker takes the next job
            assert pool.killed == 0  # retiring after MemoryError is not a budget kill
        finally:
            await pool.close()

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["tag", "reject"])
def test_pooled_content_checks_over_budget_defer_or_tag_temperror(mode: str) -> None:
    """A budget no job can meet (a microsecond): under "reject" each content check says
    451 4.7.0, under "tag" the message goes on with a temperror in each check's field."""
    config = Config(
        hostname="mx.test",
        relay=RelayConfig(relay_networks=("127.0.0.1/32",)),
        checks=ChecksConfig(rfc5322=mode, received=mode, spf="off", dkim="off"),
    )

    async def judge() -> object:
        pool = CheckPool(workers=1, time_limit=1e-6)
        try:
            facts = CheckContext(ipaddress.ip_address("192.0.2.1"), data=GOOD)
            return await policy_for(config, pool).judge_async(Stage.END_OF_DATA, facts)
        finally:
            await pool.close()

    verdict = asyncio.run(judge())
    if mode == "reject":
        assert verdict == Defer(OVER_BUDGET)
        return
    assert isinstance(verdict, Tag)
    assert sorted(verdict.fields) == [
        b"X-Leafmail-RFC5322: temperror (over budget)\r\n",
        b"X-Leafmail-Received: temperror (over budget)\r\n",
    ]
