"""An exec spawner's own cost per connection, in this process: its loop, nothing else.

`bench.exec_cpu` measures the spawners of a running server, whose CPU time moves with
whatever else the machine runs. This runs `Spawner.run` itself, as a spawner that
accepts on its listener (a `DirectService` with ``--max-conns 1000``, no log line), in
this process, while a client process makes `--connections` connections (8 at a time)
that each read `/bin/echo hi` to its end. It prints this process's CPU per connection,
and with ``--opcodes`` the Python opcodes per connection (slow: `sys.settrace`).

Under callgrind, the instructions per connection are the difference of two runs
divided by the difference of their counts (start-up cancels out):

    python -m bench.exec_inproc --connections 3000
    valgrind --tool=callgrind python -m bench.exec_inproc --connections 400
    valgrind --tool=callgrind python -m bench.exec_inproc --connections 700

The main branch is measured the same way with ``PYTHONPATH=<its src>``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import resource
import socket
import subprocess
import sys
import threading
from types import FrameType
from typing import Any

from netserver.connlog import ServerLog
from netserver.endpoint import Endpoint
from netserver.limits import Limits
from netserver.listen.listeners import Listener, ListenSpec
from netserver.modes.direct import DirectService
from netserver.modes.shared import SharedLimits
from netserver.modes.spawner import Program, Roster, Spawner
from netserver.refusals import RefusalLines

CLIENTS = 8
_CLIENT = """
import socket, sys, threading
port, count = int(sys.argv[1]), int(sys.argv[2])
def one_client():
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as c:
            while c.recv(100):
                pass
threads = [threading.Thread(target=one_client) for _ in range(int(sys.argv[3]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def spawner(listening: socket.socket, chan: socket.socket) -> Spawner:
    """A spawner that accepts on `listening` itself, as `ExecMode` forks them."""
    port = listening.getsockname()[1]
    local = Endpoint(ipaddress.ip_address("127.0.0.1"), port)
    listener = Listener(listening, ListenSpec(f"127.0.0.1:{port}", "tcp", "127.0.0.1", port), local)
    table = SharedLimits(Limits(max_conns=1000), 2)
    table.take_seat(0)
    env = {k: v for k, v in os.environb.items() if not k.startswith((b"TCP", b"PROTO"))}
    program = Program("/bin/echo", ("echo", "hi"), env, None)
    log = ServerLog(open(os.devnull, "w"), connections=False)  # noqa: SIM115 (lives with us)
    service = DirectService([listener], table, RefusalLines())
    return Spawner(chan, program, log, Roster(1000), service)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--opcodes", action="store_true", help="count Python opcodes too")
    args = parser.parse_args()
    each = max(1, args.connections // CLIENTS)
    done = each * CLIENTS
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    listening.setblocking(False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    port = str(listening.getsockname()[1])

    def clients() -> None:  # then the end of the channel: the spawner finishes and returns
        subprocess.run([sys.executable, "-c", _CLIENT, port, str(each), str(CLIENTS)], check=True)
        theirs.close()

    opcodes = 0

    def count(frame: FrameType, event: str, _arg: Any) -> Any:
        nonlocal opcodes
        frame.f_trace_opcodes = True
        opcodes += event == "opcode"
        return count

    loop = spawner(listening, ours)
    thread = threading.Thread(target=clients)
    thread.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    if args.opcodes:
        sys.settrace(count)
    loop.run()
    sys.settrace(None)
    after = resource.getrusage(resource.RUSAGE_SELF)
    thread.join()
    user = (after.ru_utime - before.ru_utime) * 1e6 / done
    system = (after.ru_stime - before.ru_stime) * 1e6 / done
    print(
        f"{done} connections: {user + system:.1f} µs CPU each (user {user:.1f}, sys {system:.1f})"
    )
    if args.opcodes:
        print(f"{opcodes / done:.0f} Python opcodes per connection (under the tracer)")


if __name__ == "__main__":
    main()
