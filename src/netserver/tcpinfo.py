"""Byte counts and idle times read from the kernel (Linux ``TCP_INFO``).

When a child process owns the connection (fork mode, a command), the server never sees
the data, yet it still logs bytes each way and enforces the idle timeout: the kernel
keeps both in ``struct tcp_info`` on the server's own copy of the socket.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

TCP_INFO = getattr(socket, "TCP_INFO", 11)
_LAST_DATA = struct.Struct("=I4xI")  # tcpi_last_data_sent, (last_ack_sent), tcpi_last_data_recv
_LAST_DATA_OFFSET = 44
_BYTES = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received
_BYTES_OFFSET = 120
_SIZE = _BYTES_OFFSET + _BYTES.size
_NOTSENT = struct.Struct("=I")  # tcpi_notsent_bytes (Linux 4.6+)
_NOTSENT_OFFSET = 144
_SENT = struct.Struct("=QQ")  # tcpi_bytes_sent, tcpi_bytes_retrans (Linux 4.19+)
_SENT_OFFSET = 200
_FULL_SIZE = _SENT_OFFSET + _SENT.size
# A FIN takes a sequence number, and the kernel's byte counters are sequence deltas.
# States (include/net/tcp_states.h) in which the peer's FIN was received, and ours acked:
_PEER_FIN = {6, 7, 8, 9, 11}  # TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING
_OUR_FIN_ACKED = {5, 6, 7}  # FIN_WAIT2, TIME_WAIT, CLOSE
# States in which our FIN is queued and may not be sent yet: then it is in the unsent count.
_OUR_FIN_QUEUED = {4, 9, 11}  # FIN_WAIT1, LAST_ACK, CLOSING
_CLOSE = 7  # nothing more will be sent: what is still queued never crosses


@dataclass(frozen=True)
class TcpStats:
    """What the kernel says about one TCP connection."""

    bytes_sent: int
    bytes_received: int
    idle_ms: int


def read(sock: socket.socket) -> TcpStats | None:
    """TCP_INFO for `sock`, or None (not TCP, closed, or an older kernel)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _FULL_SIZE)
    except OSError:
        return None
    if len(raw) < _SIZE:
        return None
    last_sent, last_recv = _LAST_DATA.unpack_from(raw, _LAST_DATA_OFFSET)
    acked, received = _BYTES.unpack_from(raw, _BYTES_OFFSET)
    state = raw[0]
    received -= 1 if state in _PEER_FIN and received else 0
    if len(raw) >= _FULL_SIZE:
        # Data octets only: no SYN, no FIN, retransmissions taken out.
        sent_total, retrans = _SENT.unpack_from(raw, _SENT_OFFSET)
        sent = sent_total - retrans + _unsent(raw, state)
    else:
        sent = acked - (1 if state in _OUR_FIN_ACKED and acked else 0)
    return TcpStats(sent, received, min(last_sent, last_recv))


def _unsent(raw: bytes, state: int) -> int:
    """Data written but not sent yet, which the kernel still sends after the writer has
    gone: a child that wrote its last answer and exited while the client's window was
    full (the supervisor reads the counts at that moment) wrote all of it, and the
    client gets all of it, so `bytes_sent` counts it too. Not after a reset (state
    CLOSE: the queue was dropped), and without our FIN, which takes a sequence number."""
    if state == _CLOSE:
        return 0
    unsent: int = _NOTSENT.unpack_from(raw, _NOTSENT_OFFSET)[0]
    return unsent - (1 if unsent and state in _OUR_FIN_QUEUED else 0)
