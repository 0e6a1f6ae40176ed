"""A small authoritative DNS server on loopback, so tests never touch real DNS.

`LoopbackDNS` serves whatever records a test gives it, over UDP and TCP on the same
port of 127.0.0.1 (or another loopback address), from one daemon thread::

    records = {
        ("host.example.test", "A"): ["192.0.2.10"],
        (reverse_name("192.0.2.10"), "PTR"): ["host.example.test"],
        ("example.test", "MX"): ["10 mx.example.test"],
        ("example.test", "TXT"): ['"v=spf1 -all"'],
    }
    with LoopbackDNS(records) as server:
        resolver = DnsResolver(["127.0.0.1"], port=server.port)

Names are absolute whether or not they end in a dot, and so are names inside rdata
(``mx.example.test`` in the MX above).  Rdata is in zone-file text form, so TXT
strings keep their quotes.  The server is authoritative for everything: an unknown
name gets NXDOMAIN, a known name without the asked type gets an empty NOERROR, and a
CNAME is followed within the records.  Names listed in *servfail* answer SERVFAIL,
for testing temporary failures.

The sockets are bound when the constructor returns, so ``.port`` is usable at once
and a query sent before `start` waits in the socket buffer instead of racing.  Every
question received is logged in `queries`, so a test can also assert that *no*
lookup happened.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME

Records = Mapping[tuple[str, str], Sequence[str]]

_CLASSIC_UDP_LIMIT = 512  # RFC 1035 4.2.1, for queries without EDNS
_TCP_LIMIT = 65535
_MAX_CNAME_CHAIN = 8
_TCP_IDLE_TIMEOUT = 10.0
_BIND_ATTEMPTS = 20


def reverse_name(address: str) -> str:
    """The PTR owner name for an IPv4 or IPv6 address, e.g. for a records key."""
    return dns.reversename.from_address(address).to_text()


class LoopbackDNS:
    """An authoritative DNS server for tests; use as a context manager."""

    def __init__(
        self,
        records: Records | None = None,
        *,
        ttl: int = 300,
        host: str = "127.0.0.1",
        servfail: Iterable[str] = (),
    ) -> None:
        self._ttl = ttl
        self._lock = threading.Lock()
        self._zone: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._servfail = {dns.name.from_text(name) for name in servfail}
        self._queries: list[tuple[str, str]] = []
        self._connections: set[socket.socket] = set()
        for (name, rdtype), values in (records or {}).items():
            self.set_records(name, rdtype, values)
        self.host = host
        self._udp, self._tcp = _bind_udp_and_tcp(host)
        self.port: int = self._udp.getsockname()[1]
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=f"LoopbackDNS:{self.port}")
        self._thread.daemon = True
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LoopbackDNS:
        """Start answering; returns self so ``LoopbackDNS(r).start()`` reads well."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and close every socket; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._wake_writer.send(b"x")
            self._thread.join()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _shutdown_quietly(conn)
        for sock in (self._udp, self._tcp, self._wake_reader, self._wake_writer):
            sock.close()

    def __enter__(self) -> LoopbackDNS:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ records

    def set_records(self, name: str, rdtype: str, values: Sequence[str]) -> None:
        """Replace the *rdtype* records of *name*; an empty *values* removes them."""
        owner = dns.name.from_text(name)
        kind = dns.rdatatype.RdataType.make(rdtype)
        rrset = dns.rrset.from_text_list(
            owner,
            self._ttl,
            dns.rdataclass.IN,
            kind,
            values,
            origin=dns.name.root,
            relativize=False,
        )
        with self._lock:
            types = self._zone.setdefault(owner, {})
            if values:
                types[kind] = rrset
            else:
                types.pop(kind, None)
            if not types:
                del self._zone[owner]

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Questions received so far as (name without final dot, type), oldest first."""
        with self._lock:
            return list(self._queries)

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in (self._udp, self._tcp, self._wake_reader):
                selector.register(sock, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_reader:
                        return
                    if key.fileobj is self._udp:
                        self._answer_udp()
                    else:
                        self._accept_tcp()

    def _answer_udp(self) -> None:
        try:
            wire, peer = self._udp.recvfrom(_TCP_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        reply = self._reply(wire, tcp=False)
        if reply is not None:
            self._udp.sendto(reply, peer)

    def _accept_tcp(self) -> None:
        try:
            conn, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        with self._lock:
            self._connections.add(conn)
        worker = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
        worker.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        """Answer length-prefixed queries on one connection until the client stops."""
        conn.setblocking(True)
        conn.settimeout(_TCP_IDLE_TIMEOUT)
        try:
            while True:
                header = _recv_exactly(conn, 2)
                wire = (
                    None if header is None else _recv_exactly(conn, int.from_bytes(header, "big"))
                )
                reply = None if wire is None else self._reply(wire, tcp=True)
                if reply is None:
                    return
                conn.sendall(reply)
        except OSError:
            return
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _reply(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """The wire answer to *wire*, or None to drop it (garbage, or not a query)."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            return None
        if query.flags & dns.flags.QR:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.set_rcode(self._fill(query, response))
        if tcp:
            return response.to_wire(
                max_size=_TCP_LIMIT, prefer_truncation=True, prepend_length=True
            )
        limit = query.payload if query.edns >= 0 else _CLASSIC_UDP_LIMIT
        # Too big for UDP sets TC, and the client retries over TCP.
        return response.to_wire(max_size=limit, prefer_truncation=True)

    def _fill(self, query: dns.message.Message, response: dns.message.Message) -> dns.rcode.Rcode:
        """Put the answer records into *response* and return the rcode to send."""
        if query.opcode() != dns.opcode.QUERY:
            return dns.rcode.NOTIMP
        if len(query.question) != 1:
            return dns.rcode.FORMERR
        question = query.question[0]
        name_text = question.name.to_text(omit_final_dot=True).lower()
        with self._lock:
            self._queries.append((name_text, dns.rdatatype.to_text(question.rdtype)))
        if question.rdclass != dns.rdataclass.IN:
            return dns.rcode.REFUSED
        rcode, answer = self._lookup(question.name, question.rdtype)
        response.answer.extend(answer)
        return rcode

    def _lookup(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> tuple[dns.rcode.Rcode, list[dns.rrset.RRset]]:
        """Answer one question from the records, following CNAMEs."""
        answer: list[dns.rrset.RRset] = []
        name = qname
        with self._lock:
            for _ in range(_MAX_CNAME_CHAIN):
                if name in self._servfail:
                    return dns.rcode.SERVFAIL, []
                rrsets = self._zone.get(name, {})
                if rdtype == dns.rdatatype.ANY and rrsets:
                    return dns.rcode.NOERROR, [*answer, *rrsets.values()]
                if rdtype in rrsets:
                    return dns.rcode.NOERROR, [*answer, rrsets[rdtype]]
                cname = rrsets.get(dns.rdatatype.CNAME)
                if cname is None:
                    return self._empty_rcode(name), answer
                answer.append(cname)
                name = _cname_target(cname)
        return dns.rcode.SERVFAIL, []  # a CNAME loop or an absurdly long chain

    def _empty_rcode(self, name: dns.name.Name) -> dns.rcode.Rcode:
        """NOERROR if *name* exists (even only as a parent of others), else NXDOMAIN.

        Returning NXDOMAIN for an empty non-terminal would claim the whole subtree is
        absent (RFC 8020), which would mislead DNSBL-style lookups.  Caller holds
        the lock.
        """
        exists = any(owner.is_subdomain(name) for owner in self._zone)
        return dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN


def _cname_target(rrset: dns.rrset.RRset) -> dns.name.Name:
    for rdata in rrset:
        if isinstance(rdata, CNAME):
            return rdata.target
    raise AssertionError("a CNAME rrset without a CNAME record")


def _bind_udp_and_tcp(host: str) -> tuple[socket.socket, socket.socket]:
    """Bind UDP on a free port and TCP on the same port, retrying if TCP's is taken.

    One port for both matters because a resolver that gets a truncated UDP answer
    retries over TCP on the same port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(_BIND_ATTEMPTS):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen()
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise OSError(f"could not bind UDP and TCP to one port on {host}")


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    """Read exactly *size* bytes, or None if the peer closes first."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = conn.recv(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _shutdown_quietly(conn: socket.socket) -> None:
    """Wake a connection thread blocked in recv; it closes the socket itself."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
