"""The spawner: a small process that starts, watches and reaps the commands of `ExecMode`.

Why a process of its own: `posix_spawn` is vfork-based, so its caller is suspended until
the child has exec'd, and CPython holds the GIL meanwhile. In the supervisor that wait
sat on the accept path of every connection (67 % of its wall time under load, see
bench/RESULTS.md); here it stalls only this process, while the supervisor goes on
accepting and judging. tcpserver's `fork()` returns at once; this is the same split.

The supervisor forks its spawners (execute.SPAWNERS) when the mode starts. Each closes
every descriptor but its channel and stdio (it holds nothing of the supervisor's: no
listener, no other client's socket), then serves the channel, a SOCK_SEQPACKET pair:

* supervisor -> spawner: `CONN_TCP`/`CONN_UNIX` + connection id + the ucspi variables
  as ``NAME=value`` separated by NUL, with the socket attached (SCM_RIGHTS);
  `TERMINATE` (end every command now); end of file (no more connections: exit once
  the last command has ended).
* spawner -> supervisor: `END` records, several to a packet: id, exit code, bytes in
  and out (-1: unknown), and how the connection ended (`OUTCOMES`).

For each connection the spawner builds the environment (the supervisor's, filtered of
stale ucspi names, plus the variables sent), spawns the command with the socket on fd 0
and 1, and when it exits reaps it and reports. It learns which commands ended from
SIGCHLD, read from a signalfd in its epoll set (`netserver.childexits`), not from a
pidfd per command: that was three system calls per connection (pidfd_open, epoll_ctl,
close), against a read and a `waitid` per wake-up and one `waitid` per command. The
supervisor closed its own copy of the socket when it sent it. With an idle timeout the
spawner keeps a copy, to read the idle time from TCP_INFO, and reads the byte counts
from it at the end; without one (``--timeout 0``) it closes its copy at once, so the
client sees the end the moment the command exits, as with tcpserver, and the log line
has no byte counts (proposal D in bench/RESULTS.md: waiting for the spawner to wake up
and close cost a quarter of the connection rate on a busy machine).

Which command serves which connection is also written in a `Roster`, memory shared
with the supervisor: if the spawner dies, its commands go on (they now belong to init)
and the supervisor reads the roster to watch them itself until they end, so their
connections stay counted (limits, ``--max-conns``) and are logged when they really end.

When no gate needs the supervisor (execute.ExecMode with a `DirectService`), each
spawner also keeps the listening sockets and accepts on them itself, as Postfix's smtpd
and tcpserver do: it judges the client with the address rules (`DirectService.judge`),
counts it in the limits table the spawners share (modes.shared; one seat each), spawns
the command, and when it ends counts it out and writes the log line; its roster then
names the table entry and the two ends, so the supervisor can carry on if it dies.
`STOP_ACCEPTING` (a stop, or a reload with other rules) closes its listeners: it exits
once its last command has ended. So does the end of the channel (the supervisor died).

The spawner reads no byte a client sends and runs as whatever user the supervisor
already is (after ``--user``). It ignores SIGINT, SIGTERM and SIGHUP, which a terminal
or a service manager sends the whole group: the supervisor decides when commands end.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import mmap
import operator
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .. import tcpinfo
from ..childexits import ChildExits
from ..children import receive_ready
from ..connlog import ConnRecord, ServerLog
from ..endpoint import KNOWN_ADDRESSES, Endpoint, IPAddress, parse_ip
from ..linger import Lingerer
from ..listen.accept import local_end
from ..listen.listeners import Listener
from .base import DEFAULT_SIGNALS, KILL_AFTER, RESET_SIGNALS, status_for_exit
from .direct import RECHECK, DirectService
from .launch import Launcher, posix_spawn_on
from .reactor import EpollReactor
from .shared import FULL

CONN_TCP, CONN_UNIX, TERMINATE, STOP_ACCEPTING = b"C", b"U", b"T", b"S"
CONN_HEAD = struct.Struct("=cQH")  # kind, connection id, socket family; then the variables
END = struct.Struct("=QiqqB")  # connection id, exit code, bytes in, bytes out, outcome
OUTCOMES = ("", "idle-timeout", "terminated", "spawn-failed")  # "": by the exit code
IDLE, TERMINATED, SPAWN_FAILED = 1, 2, 3
MAX_MSG = 65536
MAX_RECORDS = 4096 // END.size  # per report packet
_PEERCRED = struct.Struct("3i")
SLOT = struct.Struct("=Qi4x")  # a roster entry: connection id, pid (0: free)
# Beside it, for a connection the spawner accepted itself: when, and the two ends
# (IP version, packed address, port each; version 0: a unix socket).
FACTS = struct.Struct("=dB16sHB16sH")
UNBOUNDED_SLOTS = 65536  # roster size when the server has no connection cap
# The variables of a TCP client the spawner accepted itself, in `ucspi_variables`' order.
_ACCEPTED_NAMES = frozenset(
    (b"PROTO", b"TCPLOCALIP", b"TCPLOCALPORT", b"TCPREMOTEIP", b"TCPREMOTEPORT")
)
# A command's own variables: by name, or for a TCP client we accepted, as NAME=value items.
Variables = dict[bytes, bytes] | tuple[bytes, ...]


def ucspi_variables(record: ConnRecord) -> str:
    """The ucspi-tcp variables of a connection, as NAME=value separated by NUL.

    TCPREMOTEHOST and TCPLOCALHOST are set only when the name is known (see tcpd.envnames);
    the UNIXREMOTE* credentials are read from the socket by whoever spawns.
    """
    peer, local = record.peer, record.local
    if peer.ip is None or local.ip is None:
        return f"PROTO=UNIX\0UNIXLOCALPATH={local.path or ''}"
    text = (
        f"PROTO={peer.proto}\0TCPLOCALIP={local.host}\0TCPLOCALPORT={local.port}"
        f"\0TCPREMOTEIP={peer.host}\0TCPREMOTEPORT={peer.port}"
    )
    if record.remote_host is not None:
        text += f"\0TCPREMOTEHOST={record.remote_host}"
    if record.local_host is not None:
        text += f"\0TCPLOCALHOST={record.local_host}"
    return text


class Roster:
    """Which command serves which connection: a table of slots in anonymous shared
    memory, written only by the spawner (free lists stay on its side) and read by the
    supervisor once the spawner is dead (`entries`).

    No message per command: a slot is written after the spawn and cleared before the
    reap, so an entry names a process that has not been reaped by the spawner (its pid
    cannot have been reused). The spawner finds an ended command with
    ``waitid(WNOWAIT)``, which leaves it a zombie, clears its slot, and only then reaps
    it (`childexits.ChildExits`): had it reaped first and died before the clear, the
    supervisor could watch, and at a stop signal, a process that took the pid over. With
    every slot taken a command is simply not listed: if its spawner dies it is counted
    out at once, as it ends unwatched.
    """

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.mem = mmap.mmap(-1, self.slots * SLOT.size)  # MAP_SHARED | MAP_ANONYMOUS
        self.facts = mmap.mmap(-1, self.slots * FACTS.size)
        self.used = 0  # slots below this have been handed out at least once
        self.free: list[int] = []  # cleared ones, handed out again first

    def put(
        self,
        cid: int,
        pid: int,
        record: ConnRecord | None = None,
        ends: tuple[_Address, _Address] | None = None,
    ) -> int:
        """List `pid` as serving connection `cid` (with `record` and its two ends'
        addresses, peer and local: one we accepted); its slot, or -1 when none is free."""
        if self.free:
            slot = self.free.pop()
        elif self.used < self.slots:
            slot = self.used
            self.used += 1
        else:
            return -1
        if record is not None:
            peer, local = ends or (_Address.of(record.peer.ip), _Address.of(record.local.ip))
            FACTS.pack_into(
                self.facts,
                slot * FACTS.size,
                record.started,
                peer.version,
                peer.packed,
                record.peer.port or 0,
                local.version,
                local.packed,
                record.local.port or 0,
            )
        SLOT.pack_into(self.mem, slot * SLOT.size, cid, pid)
        return slot

    def clear(self, slot: int) -> None:
        if slot >= 0:
            SLOT.pack_into(self.mem, slot * SLOT.size, 0, 0)
            self.free.append(slot)

    def entries(self) -> Iterator[tuple[int, int]]:
        """(connection id, pid) of every listed command."""
        for cid, pid in SLOT.iter_unpack(self.mem):
            if pid > 0:
                yield cid, pid

    def accepted(self, mode_name: str) -> Iterator[tuple[int, int, ConnRecord]]:
        """(table entry, pid, log record) of every listed command of a spawner that
        accepted its connections itself (the record as it was at the spawn)."""
        for slot, (entry, pid) in enumerate(SLOT.iter_unpack(self.mem)):
            if pid > 0:
                started, *ends = FACTS.unpack_from(self.facts, slot * FACTS.size)
                peer, local = _endpoint(*ends[:3]), _endpoint(*ends[3:])
                yield entry, pid, ConnRecord(peer, local, mode_name, started)

    def close(self) -> None:
        self.mem.close()
        self.facts.close()


@dataclass(frozen=True, slots=True)
class _Address:
    """One address as the spawner writes it, worked out once per address it sees: the
    ucspi-tcp PROTO and text for the environment, the IP version (0: a unix socket)
    and packed form for the roster.

    Asking `Endpoint.host`, `ip.version` or `ip.packed` per connection costs a memo
    look-up keyed by the address object, whose `__hash__` is Python, or a conversion:
    with a peer and a local end asked in turn, no look-up hit the memo's last key
    (bench/RESULTS.md, the spawner's Python per connection)."""

    ip: IPAddress | None
    proto: bytes = b"UNIX"
    text: bytes = b""
    version: int = 0
    packed: bytes = b""
    proto_item: bytes = b"PROTO=UNIX"  # the environment's items, as a client's address
    remote_item: bytes = b""  # TCPREMOTEIP=

    @classmethod
    def of(cls, ip: IPAddress | None) -> _Address:
        if ip is None:
            return _UNIX
        proto = b"TCP6" if ip.version == 6 else b"TCP"
        text = str(ip).encode()
        items = b"PROTO=" + proto, b"TCPREMOTEIP=" + text
        return cls(ip, proto, text, ip.version, ip.packed, *items)


_UNIX = _Address(None)


@dataclass(frozen=True, slots=True)
class _Local:
    """The end a client reached, as the spawner writes it: its address, and its two
    variables (TCPLOCALIP, TCPLOCALPORT) as items ready for the environment."""

    endpoint: Endpoint
    address: _Address
    items: tuple[bytes, bytes]

    @classmethod
    def of(cls, local: Endpoint) -> _Local:
        address = _Address.of(local.ip)
        port = b"TCPLOCALPORT=%d" % (local.port or 0)
        return cls(local, address, (b"TCPLOCALIP=" + address.text, port))


def _endpoint(version: int, packed: bytes, port: int) -> Endpoint:
    if version == 4:
        return Endpoint(ipaddress.IPv4Address(packed[:4]), port)
    if version == 6:
        return Endpoint(ipaddress.IPv6Address(packed), port)
    return Endpoint()


@dataclass(slots=True)
class _Running:
    """One command: its connection id, pid, our copy of its socket if kept, and its
    slot in the roster."""

    cid: int  # with `record`: the connection's entry in the shared limits table
    pid: int
    sock: socket.socket | None
    slot: int = -1
    outcome: int = 0
    serial: int = 0  # ours alone: a pid (once reaped) and an entry are both reused
    record: ConnRecord | None = None  # a connection we accepted ourselves


@dataclass(frozen=True)
class Program:
    """What the spawner runs, fixed when it is forked."""

    path: str
    argv: tuple[str, ...]
    env: Mapping[bytes, bytes]  # the supervisor's environment without ucspi names
    timeout: float | None  # idle timeout for TCP connections; None or 0: none
    mode_name: str = "exec"  # the server's, for the log lines of connections we accept


class Spawner:
    """The spawner's loop: one epoll over the channel, the signalfd that tells of ended
    commands and, when it accepts itself, the listeners.

    The listeners are watched with EPOLLEXCLUSIVE: a client wakes one spawner that is
    waiting, not every one (with plain poll both woke for each client and one lost the
    race to accept: 489 of 1,376 accepts failed, see bench/RESULTS.md). A spawner busy
    with a spawn is not waiting, so the kernel wakes another; a stopped one (SIGSTOP)
    has left its wait too (epoll_wait returns EINTR on a stop), so it takes no wake-up
    from the others.
    """

    def __init__(
        self,
        chan: socket.socket,
        command: Program,
        log: ServerLog,
        roster: Roster,
        direct: DirectService | None = None,
    ) -> None:
        self.chan = chan
        self.command = command
        self.log = log
        self.roster = roster
        self.poll = select.epoll()
        self.reactor = EpollReactor(self.poll)  # refused clients drain there
        self.lingerer = Lingerer(self.reactor)
        self.running: dict[int, _Running] = {}  # by pid
        self.exits = ChildExits()
        self.launcher = Launcher.make(command.path, command.argv, command.env, DEFAULT_SIGNALS)
        # The items of a client we accepted go to the launcher as they are: none of
        # their names may be a variable of the fixed environment (which is filtered of
        # ucspi names: see execute.ExecMode; this is for a Program made otherwise).
        self._items_fit = _ACCEPTED_NAMES.isdisjoint(command.env)
        self._timed = bool(command.timeout)  # an idle timeout: our copy of a TCP socket kept
        # when, sequence, pid and the command's serial (a pid is reused once reaped), what
        self.timers: list[tuple[float, int, int, int, str]] = []
        self._seq = 0
        self.reports: list[bytes] = []
        self.listening = True  # taking connections (from the channel or the listeners)
        self.chan_open = True
        self.direct = direct
        self.listeners = {} if direct is None else {ln.sock.fileno(): ln for ln in direct.listeners}
        # fd, family, the two ends and the peer's address, of a client held for room
        self._held: tuple[int, int, Endpoint, Endpoint, _Address] | None = None
        self._peers: dict[str, _Address] = {}  # client addresses by their text
        self._locals: dict[int, _Local] = {}  # by id() of the Endpoint
        self._here = _Local.of(Endpoint())  # the last one asked for
        self._watching = False
        self._local = Endpoint()

    def run(self) -> int:
        """Serve until the channel is closed (or, accepting ourselves, we are told to
        stop accepting) and every command has ended."""
        self.chan.setblocking(False)
        self.poll.register(self.chan.fileno(), select.EPOLLIN)
        self.poll.register(self.exits.fd, select.EPOLLIN)
        self._watch(True)
        while self.listening or self.running:
            for fd, _events in self.poll.poll(self._poll_timeout()):
                if fd == self.chan.fileno():
                    self._messages()
                elif fd in self.listeners:
                    self._accept(self.listeners[fd])
                elif fd == self.exits.fd:
                    self._reap()
                else:
                    self.reactor.ready(fd)
            self._run_timers()
            self.reactor.run_due()
            self._report()
        self.lingerer.close()
        self.exits.close()
        return 0

    # -- accepting ourselves (modes.direct's table and judge) -----------------------------
    def _watch(self, yes: bool) -> None:
        if yes == self._watching or not self.listeners:
            return
        self._watching = yes
        for fd in self.listeners:
            if yes:
                self.poll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            else:
                self.poll.unregister(fd)

    def _stop_accepting(self) -> None:
        """Our copies of the listeners closed: the port is the supervisor's alone."""
        self._watch(False)
        for listener in self.listeners.values():
            listener.sock.close()
        self.listeners = {}
        if self._held is not None:
            os.close(self._held[0])
            self._held = None

    def _accept(self, listener: Listener) -> None:
        """Clients waiting on `listener`, while the table has room (a burst at most).

        The descriptor is taken as it comes (`_accept`, the C call under
        socket.accept): the command needs only the descriptor, and a socket object
        costs an enum conversion of the family and type, and a getsockname the
        constructor makes to check the descriptor (a third of the Python and one of
        the system calls per connection). One is built when it is needed: to ask a
        wildcard listener's connection which address it reached, or to refuse.
        """
        assert self.direct is not None
        family = listener.family
        for _ in range(16):
            if self._held is not None or self.direct.table.full:
                self._wait_for_room()
                return
            try:
                fd, addr = listener.sock._accept()  # type: ignore[attr-defined]  # (above)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE and the like: look again a little later
                self.log.error("accept failed", error=str(exc))
                self._wait_for_room()
                return
            if family == socket.AF_UNIX:
                peer, seen = Endpoint.from_sockaddr(family, addr), _UNIX
            else:  # (host, port[, flow, scope]): the address by its text, known or new
                seen = self._peers.get(addr[0]) or self._peer(addr[0])
                peer = Endpoint(seen.ip, addr[1])
            local = listener.local
            if local is None:
                sock = _wrap(fd, family)
                local = local_end(listener, sock, self._local)
                sock.detach()  # the descriptor stays ours: not closed with the object
                if local is None:
                    os.close(fd)
                    continue
                self._local = local
            refused = self.direct.judge(peer, local)
            if refused is not None:
                reason, cause = refused
                self._refuse(fd, family, peer, reason, self.direct.refusals.line(cause))
                continue
            self._admit(fd, family, peer, local, seen)

    def _peer(self, text: str) -> _Address:
        """A client address not seen yet (or forgotten): parsed, remembered by its text
        (at most KNOWN_ADDRESSES of them: emptied when full, as a `BoundedMemo`)."""
        seen = _Address.of(parse_ip(text.split("%", 1)[0]))
        if len(self._peers) >= KNOWN_ADDRESSES:
            self._peers.clear()
        self._peers[text] = seen
        return seen

    def _local_of(self, local: Endpoint) -> _Local:
        """The end a client reached, as we write it: worked out once per Endpoint (a
        listener's own, or `local_end`'s, which is the same object while it repeats)."""
        known = self._here
        if known.endpoint is local:  # the same end as the last client's (most often)
            return known
        known = self._locals.get(id(local), known)
        if known.endpoint is not local:
            known = _Local.of(local)
            if len(self._locals) >= KNOWN_ADDRESSES:
                self._locals.clear()
            self._locals[id(local)] = known  # the value holds `local`: its id stays its own
        self._here = known
        return known

    def _refuse(self, fd: int, family: int, peer: Endpoint, reason: str, line: str | None) -> None:
        self.log.refused(peer, reason)
        self.lingerer.refuse(_wrap(fd, family), line)

    def _admit(self, fd: int, family: int, peer: Endpoint, local: Endpoint, seen: _Address) -> None:
        assert self.direct is not None
        entry = self.direct.table.admit(peer)
        if entry == FULL:  # the last place went in the meantime: held, unread
            self._held = (fd, family, peer, local, seen)
            self._wait_for_room()
            return
        if isinstance(entry, str):
            self._refuse(fd, family, peer, entry, self.direct.refusals.limit)
            return
        record = ConnRecord(peer, local, self.command.mode_name)
        if seen.ip is None or local.ip is None:  # a unix socket
            variables = _variables(os.fsencode(ucspi_variables(record)))
            self._spawn(entry, True, variables, fd, family, record)
            return
        # `ucspi_variables`, in its order, from what is known of both addresses (a
        # connection accepted here has no host names: those need the supervisor), as
        # the environment's items: only the port is new for each connection
        here = self._local_of(local)
        port = b"TCPREMOTEPORT=%d" % (peer.port or 0)
        items = (seen.proto_item, *here.items, seen.remote_item, port)
        self._spawn(entry, False, items, fd, family, record, (seen, here.address))

    def _wait_for_room(self) -> None:
        """Full: stop watching; look again when a command ends or after RECHECK."""
        self._watch(False)
        self._seq += 1
        heapq.heappush(self.timers, (time.monotonic() + RECHECK, self._seq, -1, 0, "room"))

    def _room(self) -> None:
        if not self.listeners or self._watching:
            return
        assert self.direct is not None
        held, self._held = self._held, None
        if held is not None:
            self._admit(*held)
        if self._held is None and not self.direct.table.full:
            self._watch(True)
        elif not any(t[4] == "room" for t in self.timers):
            self._wait_for_room()

    # -- messages from the supervisor -----------------------------------------------------
    def _messages(self) -> None:
        while self.chan_open:
            received = receive_ready(self.chan, MAX_MSG, 2)
            if received is None:
                return
            data, fds = received
            if not data:  # the supervisor is done (or gone): finish what runs
                self._stop_accepting()
                self.listening = self.chan_open = False
                self.poll.unregister(self.chan.fileno())
                for fd in fds:
                    os.close(fd)
                return
            kind = data[:1]
            if kind == TERMINATE:
                self._terminate()
            elif kind == STOP_ACCEPTING:
                self._stop_accepting()
                self.listening = False
            elif fds and kind in (CONN_TCP, CONN_UNIX) and len(data) >= CONN_HEAD.size:
                _kind, cid, family = CONN_HEAD.unpack_from(data)
                variables = _variables(data[CONN_HEAD.size :])
                self._spawn(cid, kind == CONN_UNIX, variables, fds[0], family)
                fds = fds[1:]
            for fd in fds:
                os.close(fd)

    def _spawn(
        self,
        cid: int,
        unix: bool,
        variables: Variables,
        fd: int,
        family: int,
        record: ConnRecord | None = None,
        ends: tuple[_Address, _Address] | None = None,
    ) -> None:
        """Start the command for connection `cid` on `fd`, with `variables` (and the
        peer's credentials for a unix socket) added to its environment; with `record`,
        one we accepted, whose two ends' addresses are `ends` (worked out if not given)."""
        # A socket object only when one is needed (credentials, the idle timeout).
        keep = self._timed and family != socket.AF_UNIX
        sock = _wrap(fd, family) if keep or unix else None
        if sock is not None and unix and isinstance(variables, dict):
            variables.update(peer_credentials(sock))
        pid = 0
        try:
            pid = self._start(variables, fd)
        except OSError as exc:
            self._failed(cid, exc, record)
        if not keep or not pid:  # the client sees the end as soon as the command exits
            if sock is not None:
                sock.close()
            else:
                os.close(fd)
            sock = None
        if not pid:
            return
        # Listed at once: the supervisor's view if we die.
        slot = self.roster.put(cid, pid, record, ends)
        self._seq += 1
        # Reaped only from `_reap`, back in the loop: it is listed before it can be.
        run = self.running[pid] = _Running(cid, pid, sock, slot, 0, self._seq, record)
        if sock is not None:
            self._after(self.command.timeout or 0.0, run, "idle")

    def _start(self, variables: Variables, fd: int) -> int:
        """The command started on `fd`: by the launcher, or where the C library has no
        posix_spawn to call, by `os.posix_spawn` (see modes.launch)."""
        if isinstance(variables, tuple):  # items of a client we accepted (TCP)
            if self.launcher is not None and self._items_fit:
                return self.launcher.spawn_items(fd, variables)
            variables = dict(map(_NAME_VALUE, variables))
        if self.launcher is not None:
            return self.launcher.spawn(fd, variables)
        env = dict(self.command.env)
        env.update(variables)
        return spawn(self.command, env, fd)

    def _failed(self, cid: int, exc: OSError, record: ConnRecord | None) -> None:
        self.log.error("cannot start a process", error=str(exc))
        if record is None:
            self.reports.append(END.pack(cid, 0, -1, -1, SPAWN_FAILED))
        else:
            record.status = OUTCOMES[SPAWN_FAILED]
            self._count_out(cid, record)

    def _count_out(self, entry: int, record: ConnRecord) -> None:
        """A connection we accepted has ended: out of the table, logged, room again."""
        assert self.direct is not None
        self.direct.table.release(entry)
        self.log.connection(record)
        self._room()

    # -- commands that end -----------------------------------------------------------------
    def _reap(self) -> None:
        """Every command that has ended: off the roster, then reaped, then reported."""
        for pid, code in self.exits.ended():
            run = self.running.pop(pid, None)
            if run is not None:
                self.roster.clear(run.slot)  # before the reap: a listed pid is never reused
            self.exits.reap(pid)
            if run is not None:
                self._exited(run, code)

    def _exited(self, run: _Running, code: int) -> None:
        record, sent, received = run.record, -1, -1
        if run.sock is not None:  # our copy, kept for the idle timeout: the byte counts
            stats = tcpinfo.read(run.sock)
            run.sock.close()
            if stats is not None:
                sent, received = stats.bytes_sent, stats.bytes_received
        if record is None:
            self.reports.append(END.pack(run.cid, code, received, sent, run.outcome))
            return
        if received >= 0:
            record.bytes_in, record.bytes_out = received, sent
        record.status = OUTCOMES[run.outcome] or status_for_exit(code)
        self._count_out(run.cid, record)

    def _report(self) -> None:
        """Send what ended since the last pass, in as few packets as it takes."""
        while self.reports:
            packet = b"".join(self.reports[:MAX_RECORDS])
            del self.reports[:MAX_RECORDS]
            try:
                self._send(packet)
            except OSError:  # the supervisor is gone: nobody to tell
                self.reports.clear()

    def _send(self, packet: bytes) -> None:
        """Send, waiting while the channel is full (the supervisor reads it soon)."""
        while True:
            try:
                self.chan.send(packet)
                return
            except (BlockingIOError, InterruptedError):
                select.select([], [self.chan], [], 1.0)

    # -- timeouts and termination ----------------------------------------------------------
    def _after(self, delay: float, run: _Running, what: str) -> None:
        self._seq += 1
        when = time.monotonic() + delay
        heapq.heappush(self.timers, (when, self._seq, run.pid, run.serial, what))

    def _poll_timeout(self) -> float:
        """Seconds until the first timer (rounded up to epoll's milliseconds); -1: none."""
        due = [self.timers[0][0]] if self.timers else []
        draining = self.reactor.timeout()
        if draining is not None:
            due.append(draining)
        if not due:
            return -1.0
        return max(0.0, min(due) - time.monotonic() + 0.001)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _when, _seq, pid, serial, what = heapq.heappop(self.timers)
            if what == "room":
                self._room()
                continue
            run = self.running.get(pid)
            if run is None or run.serial != serial:
                continue  # ended (the pid may be another command's now)
            if what == "kill":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.pid, signal.SIGKILL)
            else:
                self._check_idle(run)

    def _check_idle(self, run: _Running) -> None:
        """End a command whose connection saw no data either way for the timeout."""
        timeout = self.command.timeout or 0.0
        stats = None if run.sock is None else tcpinfo.read(run.sock)
        idle = 0.0 if stats is None else stats.idle_ms / 1000.0
        if idle >= timeout:
            run.outcome = run.outcome or IDLE
            self._end(run)
        else:
            self._after(timeout - idle, run, "idle")

    def _end(self, run: _Running) -> None:
        """TERM now (the client sees the end at once), KILL after KILL_AFTER seconds."""
        if run.sock is not None:
            with contextlib.suppress(OSError):
                run.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGTERM)
        self._after(KILL_AFTER, run, "kill")

    def _terminate(self) -> None:
        for run in self.running.values():
            run.outcome = TERMINATED
            self._end(run)


_NAME_VALUE = operator.methodcaller("split", b"=", 1)


def _variables(text: bytes) -> dict[bytes, bytes]:
    """``NAME=value`` items separated by NUL, as a dict (a name with no ``=``: empty).

    Split in C (`map` of `bytes.split`): a loop of `partition` in Python was a tenth of
    the spawner's Python work per connection. An item without ``=`` or with no name
    (never sent: the supervisor and `ucspi_variables` write each one whole) takes the
    slow path, with the old rules."""
    try:
        env: dict[bytes, bytes] = dict(map(_NAME_VALUE, text.split(b"\0")))
    except ValueError:  # an item without "=", or an empty one
        env = {b"": b""}
    if b"" not in env:
        return env
    env = {}  # the slow path also drops an empty name (posix_spawn would refuse it)
    for item in text.split(b"\0"):
        name, _, value = item.partition(b"=")
        if name:
            env[name] = value
    return env


def _wrap(fd: int, family: int) -> socket.socket:
    """A socket object for an accepted descriptor (family and type given: the
    constructor asks the kernel only to check that it is a socket)."""
    return socket.socket(family, socket.SOCK_STREAM, 0, fd)


def spawn(command: Program, env: Mapping[bytes, bytes], fd: int) -> int:
    """Start `command` on the socket `fd` (its stdin and stdout); its pid, or OSError."""
    return posix_spawn_on(command.path, command.argv, env, fd, DEFAULT_SIGNALS)


def peer_credentials(sock: socket.socket) -> dict[bytes, bytes]:
    """UNIXREMOTEPID/UID/GID of a unix-socket client (none if the kernel has no pid)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return {}
    pid, uid, gid = _PEERCRED.unpack(raw)
    if pid <= 0:
        return {}
    return {
        b"UNIXREMOTEPID": str(pid).encode(),
        b"UNIXREMOTEUID": str(uid).encode(),
        b"UNIXREMOTEGID": str(gid).encode(),
    }


def spawner_main(
    chan: socket.socket,
    command: Program,
    log: ServerLog,
    roster: Roster,
    direct: DirectService | None = None,
) -> int:
    """Everything the forked spawner does; returns its exit code (never raises).

    With `direct` (its table's seat taken) it keeps the listeners and accepts itself."""
    signal.set_wakeup_fd(-1)
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    kept = [] if direct is None else [*direct.fds(), direct.table.fd]
    keep = sorted({chan.fileno(), *kept})
    low = 3
    for fd in keep:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    return Spawner(chan, command, log, roster, direct).run()
