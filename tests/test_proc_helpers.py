"""The helpers that read other processes' state from /proc, on processes that end.

A child listed a moment ago may have exited and been reaped by the time its /proc
entries are read (a retiring worker or spawner does that while a test waits for it to
let go of the listener). A full-suite run failed on it: holds_socket raised
FileNotFoundError on the /proc/PID/fd of a spawner that had just retired, inside the
wait for exactly that (test_exec_direct::test_reloaded_access_rules_reach_the_spawners).
"""

from __future__ import annotations

import os
import socket
import subprocess

from lifecycle_handlers import holds_socket


def test_a_process_gone_holds_no_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        inode = str(os.fstat(listener.fileno()).st_ino)
        assert holds_socket(os.getpid(), inode)  # the helper does see a holder
        gone = subprocess.Popen(["true"])
        gone.wait()  # reaped: /proc has no entry for it (or one for an unrelated process)
        assert not holds_socket(gone.pid, inode)
