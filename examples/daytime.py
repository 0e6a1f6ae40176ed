"""Daytime (RFC 867): send the current date and time as one line, then close.

The RFC fixes no format; this one follows its example, ``Weekday, Month Day, Year
HH:MM:SS-Zone``, in the server's local time. Whatever the client sends is ignored.

    netserver serve --listen 127.0.0.1:1313 --handler examples.daytime:main
    netserver serve --listen 127.0.0.1:1313 --handler examples.daytime:async_main
"""

from __future__ import annotations

import time

from netserver import AsyncConnection

FORMAT = "%A, %B %d, %Y %H:%M:%S-%Z"


def daytime(when: float | None = None) -> str:
    """The daytime string for `when` (seconds since the epoch; now by default)."""
    return time.strftime(FORMAT, time.localtime(when))


def main() -> None:
    """Stdio form (fork, prefork, thread modes): print the time and return."""
    print(daytime(), end="\r\n")


async def async_main(conn: AsyncConnection) -> None:
    """Async form, for event-loop mode."""
    conn.write(f"{daytime()}\r\n".encode("ascii", "replace"))
    await conn.drain()
