"""Telling whoever started us that the sockets are listening.

Two ways, both optional: ``--ready-fd N`` (s6-style: one line ``READY ADDR ...`` written
to descriptor N, which is then closed, so a test or script can read the ports the kernel
picked for port 0) and systemd's ``NOTIFY_SOCKET`` (Type=notify). Shared by the
``netserver`` and ``leafmail`` commands.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

from .endpoint import Endpoint
from .errors import UsageError

ReadyCallback = Callable[[list[Endpoint]], None]


def ready_fd_writer(fd: int | None) -> ReadyCallback | None:
    """A callback writing the READY line to `fd`; UsageError if `fd` is not open."""
    if fd is None:
        return None
    try:
        os.set_inheritable(fd, False)  # never passed on to a handler's programs
    except OSError:
        raise UsageError(f"--ready-fd {fd}: not an open descriptor") from None

    def ready(addresses: list[Endpoint]) -> None:
        line = "READY " + " ".join(str(a) for a in addresses) + "\n"
        with contextlib.suppress(OSError):
            os.write(fd, line.encode())
            os.close(fd)

    return ready


def sd_notify(message: bytes) -> None:
    """Send a message to systemd's NOTIFY_SOCKET; no-op without one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message, path)
