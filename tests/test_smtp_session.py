"""leafmail's SMTP session as loop callbacks (issue 12: 10,000 idle sessions in 90 MB).

An idle session must hold no task: a task, its coroutine frames and the future it
waits on cost about 1.5 KB a session. A task exists only while something waits (a check
that waits for the network, the spool's commit); input that arrives meanwhile is held
and answered in order. These run leafmail's `ReceiveService` on a real netserver
listener (event-loop mode) with real SMTP clients on loopback.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from leafmail.checks import ACCEPT, AsyncCheck, CheckContext, Reject, Stage, Verdict
from leafmail.receive import Policy, ReceiveService
from leafmail.session import OpenSessions, ReceiveSession
from leafmail.spool import GroupCommitter, Spool
from netserver import CallbackHandler, Server
from netserver.admit.access import AccessPolicy
from netserver.modes.eventloop import EventLoopMode
from netserver.server import RunOptions
from netserver.smtp import ServerConfig
from netserver.smtp.replies import Reply

IO_TIMEOUT = 10.0
SESSIONS = 5
REFUSED = Reply(550, "5.1.1", "No such user here")


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (every line of a multiline one)."""
    lines = b""
    while True:
        line = await reader.readline()
        assert line, "connection closed while a reply was expected"
        lines += line
        if line[3:4] != b"-":
            return lines


def _serve(service: ReceiveService, check: Callable[[Server, int], Awaitable[None]]) -> None:
    """Serve `service` on port 0 in this loop, run `check`, then stop the server."""

    async def main() -> None:
        ready = asyncio.Event()
        options = RunOptions(loop="asyncio", signals=False, on_ready=lambda _ends: ready.set())
        server = Server(
            CallbackHandler(service.session), "127.0.0.1:0", mode="async", options=options
        )
        serving = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                await ready.wait()
            port = server.addresses[0].port
            assert port is not None
            async with asyncio.timeout(IO_TIMEOUT):
                await check(server, port)
        finally:
            server.stop()
            await serving

    asyncio.run(main())


def test_idle_sessions_hold_no_task() -> None:
    """After the greeting and EHLO, no task is left for any session: each is parked."""
    service = ReceiveService(ServerConfig(hostname="mx.test"), None, Policy())  # type: ignore[arg-type]

    async def check(server: Server, port: int) -> None:
        before = asyncio.all_tasks()  # the server's own, and this one
        clients = []
        for _ in range(SESSIONS):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            clients.append(writer)
            assert (await _reply(reader)).startswith(b"220 ")
            writer.write(b"EHLO client.test\r\n")
            assert (await _reply(reader)).startswith(b"250-mx.test")
        mode = server.mode
        assert isinstance(mode, EventLoopMode)
        assert mode.active() == SESSIONS
        assert len(mode.parked) == SESSIONS
        assert not mode.tasks
        assert not service.running
        assert asyncio.all_tasks() == before
        for writer in clients:
            writer.close()

    _serve(service, check)


def test_a_check_that_waits_holds_pipelined_commands_and_answers_in_order(
    tmp_path: Path,
) -> None:
    """A RCPT check that waits (as a DNS lookup does) runs in a task; the commands that
    arrive meanwhile are held, then answered in order; the message is spooled."""
    judged: list[str] = []
    started, release = asyncio.Event(), asyncio.Event()

    async def waiting_recipients(facts: CheckContext) -> Verdict:
        started.set()
        await release.wait()  # a lookup's wait, until the test has sent more
        judged.append(str(facts.recipient))
        return Reject(REFUSED) if str(facts.recipient).startswith("nobody@") else ACCEPT

    checks: list[AsyncCheck] = [waiting_recipients]
    spool = Spool(tmp_path / "spool")
    committer = GroupCommitter(spool)
    service = ReceiveService(
        ServerConfig(hostname="mx.test"), committer, Policy(async_stages={Stage.RCPT: checks})
    )

    async def check(server: Server, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _reply(reader)
        writer.write(b"EHLO client.test\r\n")
        assert b"PIPELINING" in await _reply(reader)
        writer.write(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<one@mx.test>\r\n")
        await started.wait()
        writer.write(b"RCPT TO:<nobody@mx.test>\r\nRCPT TO:<two@mx.test>\r\nDATA\r\n")
        mode = server.mode
        assert isinstance(mode, EventLoopMode)
        (conn,) = mode.parked
        session = conn.callbacks
        assert isinstance(session, ReceiveSession)
        while not session.held:  # until the server has read them (bounded by the timeout)
            await asyncio.sleep(0)
        assert session.busy and service.running
        release.set()
        codes = [(await _reply(reader))[:3] for _ in range(5)]
        assert codes == [b"250", b"250", b"550", b"250", b"354"]
        writer.write(b"Subject: held\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert (await _reply(reader)).startswith(b"250 ")
        assert (await _reply(reader)).startswith(b"221 ")
        assert await reader.read() == b""
        writer.close()
        assert judged == ["one@mx.test", "nobody@mx.test", "two@mx.test"]
        assert not service.running

    try:
        _serve(service, check)
    finally:
        committer.close()
    (queued,) = list(spool.root.joinpath("queue").iterdir())
    assert b"Subject: held" in queued.read_bytes()


@pytest.mark.parametrize(
    ("relay_networks", "runs"), [("127.0.0.1/32", False), ("192.0.2.0/24", True)]
)
def test_a_trusted_client_skips_the_checks_that_wait(relay_networks: str, runs: bool) -> None:
    """Every check that waits accepts a trusted client unseen, so for a client in the
    relay networks none is started: MAIL is answered at once, with no task. Another
    client's MAIL still goes through them."""
    judged: list[str] = []

    async def origin(facts: CheckContext) -> Verdict:
        judged.append(str(facts.sender))
        return ACCEPT

    checks: list[AsyncCheck] = [origin]
    policy = Policy(
        async_stages={Stage.MAIL: checks}, trusted=AccessPolicy(allow=(relay_networks,))
    )
    service = ReceiveService(ServerConfig(hostname="mx.test"), None, policy)  # type: ignore[arg-type]

    async def check(server: Server, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _reply(reader)
        writer.write(b"EHLO client.test\r\n")
        await _reply(reader)
        writer.write(b"MAIL FROM:<a@client.test>\r\n")
        assert (await _reply(reader)).startswith(b"250 ")
        assert not service.running
        writer.write(b"QUIT\r\n")
        assert (await _reply(reader)).startswith(b"221 ")
        writer.close()

    _serve(service, check)
    assert judged == (["a@client.test"] if runs else [])


def test_a_stop_says_421_to_an_idle_session_and_waits_for_a_transaction() -> None:
    """At a stop an idle session hears 421 at once; one in a transaction finishes it
    first, and hears 421 when it ends."""
    service = ReceiveService(ServerConfig(hostname="mx.test"), None, Policy())  # type: ignore[arg-type]

    async def check(server: Server, port: int) -> None:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        for reader, writer in ((idle_r, idle_w), (busy_r, busy_w)):
            await _reply(reader)
            writer.write(b"EHLO client.test\r\n")
            await _reply(reader)
        busy_w.write(b"MAIL FROM:<a@client.test>\r\n")
        assert (await _reply(busy_r)).startswith(b"250 ")
        server.stop()
        assert (await _reply(idle_r)).startswith(b"421 ")
        assert await idle_r.read() == b""
        busy_w.write(b"RSET\r\n")
        assert (await _reply(busy_r)).startswith(b"250 ")
        assert (await _reply(busy_r)).startswith(b"421 ")
        assert await busy_r.read() == b""
        for writer in (idle_w, busy_w):
            writer.close()

    _serve(service, check)


def test_the_250_reaches_the_client_before_the_queue_manager_is_told(tmp_path: Path) -> None:
    """Once the commit is durable the client's 250 goes out at once: the queue manager's
    announcement (which wakes another process) waits behind it, not the other way round."""
    spool = Spool(tmp_path / "spool")
    committer = GroupCommitter(spool)
    client = socket.socket()
    client.setblocking(False)
    waiting_at_announcement: list[bytes] = []

    def announce(qid: str) -> None:
        try:  # what the client could read right now, left for it to read
            waiting_at_announcement.append(client.recv(4096, socket.MSG_PEEK))
        except BlockingIOError:
            waiting_at_announcement.append(b"")

    service = ReceiveService(
        ServerConfig(hostname="mx.test"), committer, Policy(), on_spooled=announce
    )

    async def check(server: Server, port: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(client, ("127.0.0.1", port))
        answered = b""
        for command in (b"EHLO c.test", b"MAIL FROM:<a@c.test>", b"RCPT TO:<b@mx.test>", b"DATA"):
            answered += await _raw_reply(loop, client)
            await loop.sock_sendall(client, command + b"\r\n")
        answered += await _raw_reply(loop, client)
        assert answered.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        await loop.sock_sendall(client, b"Subject: s1\r\n\r\nbody\r\n.\r\n")
        queued = await _raw_reply(loop, client)
        (qid,) = spool.ids()
        assert queued == b"250 2.0.0 OK queued as %s\r\n" % qid.encode()
        assert waiting_at_announcement == [queued]
        client.close()

    try:
        _serve(service, check)
    finally:
        committer.close()


async def _raw_reply(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """One reply read from a raw socket (each of these replies is one line)."""
    got = b""
    while not got.endswith(b"\r\n") or got.rsplit(b"\r\n", 2)[-2][3:4] == b"-":
        chunk = await loop.sock_recv(sock, 4096)
        assert chunk, "connection closed while a reply was expected"
        got += chunk
    return got


class _BarrierThreads(Spool):
    """A real spool that records which thread ran each lone commit's barrier."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.threads: list[str] = []

    def sync_renamed(self, fds: list[int], dir_fd: int) -> None:
        self.threads.append(threading.current_thread().name)
        super().sync_renamed(fds, dir_fd)


async def _send_message(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One transaction on an open session; the reply to the message."""
    writer.write(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
    codes = [(await _reply(reader))[:3] for _ in range(3)]
    assert codes == [b"250", b"250", b"354"]
    writer.write(b"Subject: s1\r\n\r\nbody\r\n.\r\n")
    return await _reply(reader)


async def _greeted(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new session, greeted and past EHLO."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await _reply(reader)).startswith(b"220 ")
    writer.write(b"EHLO client.test\r\n")
    assert (await _reply(reader)).startswith(b"250-mx.test")
    return reader, writer


async def _quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"QUIT\r\n")
    assert (await _reply(reader)).startswith(b"221 ")
    assert await reader.read() == b""
    writer.close()


def test_the_only_session_of_a_worker_commits_on_its_loop(tmp_path: Path) -> None:
    """The services count their open sessions and the committer reads the count: a
    message of the only session open is made durable on the loop (no thread to wake),
    one of a session among others in the commit thread (the barrier would block them);
    the count follows the sessions' ends, so alone again it is the loop's again."""
    spool = _BarrierThreads(tmp_path / "spool")
    sessions = OpenSessions()
    committer = GroupCommitter(spool, sessions=sessions)
    service = ReceiveService(
        ServerConfig(hostname="mx.test"), committer, Policy(), sessions=sessions
    )

    async def until(count: int) -> None:
        while sessions() != count:  # the server's side of a close (bounded by the timeout)
            await asyncio.sleep(0)

    async def check(server: Server, port: int) -> None:
        one_r, one_w = await _greeted(port)
        assert sessions() == 1
        assert (await _send_message(one_r, one_w)).startswith(b"250 ")
        two_r, two_w = await _greeted(port)
        assert sessions() == 2
        assert (await _send_message(one_r, one_w)).startswith(b"250 ")
        await _quit(two_r, two_w)
        await until(1)
        assert (await _send_message(one_r, one_w)).startswith(b"250 ")
        one_w.close()  # no QUIT: the client just goes
        await until(0)

    try:
        _serve(service, check)
    finally:
        committer.close()
    loop_thread = threading.main_thread().name
    assert spool.threads == [loop_thread, "leafmail-write", loop_thread]
    assert len(spool.ids()) == 3 and os.listdir(tmp_path / "spool" / "tmp") == []
