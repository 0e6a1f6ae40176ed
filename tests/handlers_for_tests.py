"""Handlers the integration tests serve (``--handler handlers_for_tests:NAME``).

The tests start the server with ``PYTHONPATH=tests`` so this module imports by its
plain name, the same name the test process (which has tests/ on sys.path) sees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from netserver import CallbackConnection, Callbacks, Connection


def ask() -> None:
    """Two prompts answered with input(): the prompt must reach the client unflushed."""
    name = input("name? ")
    print(f"hello, {name}!")
    colour = input("colour? ")
    print(f"{name} likes {colour}")


def child_echo() -> None:
    """A subprocess writes straight to fd 1, which is the socket in fork/prefork mode."""
    subprocess.run(["echo", "from-child"], check=True)


def child_reads() -> None:
    """A subprocess reads the client's line from fd 0 and answers on fd 1."""
    subprocess.run(["sh", "-c", 'read line; echo "child got $line"'], check=True)


def pid_then_echo() -> None:
    """Say which process serves (before blocking on a read), then echo one line."""
    print(os.getpid())
    sys.stdout.write(sys.stdin.readline())


def peer(conn: Connection) -> None:
    """Report both endpoints as the server sees them."""
    conn.write(f"{conn.peer} {conn.local}\n".encode())


def sigpipe() -> None:
    """Report the process's SIGPIPE disposition (default in a fork/prefork child)."""
    default = signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL
    print("SIGPIPE default" if default else "SIGPIPE not default")


def fail() -> None:
    """Raise, so the log shows the traceback and status=error."""
    print("about to fail")
    raise RuntimeError("handler failed on purpose")


def exit_3() -> None:
    """Leave with sys.exit(3)."""
    print("bye")
    sys.exit(3)


def binary_stdio() -> None:
    """Binary stdio, the usual Python idiom: sys.stdin.buffer and sys.stdout.buffer."""
    sys.stdout.buffer.write(sys.stdin.buffer.readline())


def close_streams() -> None:
    """Echo lines; on "close", say so and close sys.stdout and sys.stdin."""
    for line in sys.stdin:
        if line == "close\n":
            sys.stdout.write("closing\n")
            sys.stdout.close()
            sys.stdin.close()
            return
        sys.stdout.write(line)


class ShowPeer(Callbacks):
    """Callback form: greets with the client's address as netserver sees it, then echoes."""

    def __init__(self, conn: CallbackConnection) -> None:
        super().__init__(conn)
        conn.write(f"{conn.peer.host} {conn.peer.port}\n".encode())

    def data_received(self, data: bytes) -> None:
        self.conn.write(data)


class FailingCallbacks(Callbacks):
    """Callback form: the first chunk raises."""

    def data_received(self, data: bytes) -> None:
        raise RuntimeError("callback failed on purpose")


class ByeOnStop(Callbacks):
    """Callback form: echoes, and says bye and closes when the server stops."""

    def data_received(self, data: bytes) -> None:
        self.conn.write(data)

    def stop_requested(self) -> None:
        self.conn.write(b"bye\n")
        self.conn.close()
