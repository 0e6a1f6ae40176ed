"""`netserver.childexits`: ended children read from a signalfd, each seen before its reap.

Each check runs in a forked child of the test process: `ChildExits` blocks SIGCHLD and
reports (and its caller reaps) every child of the process that makes it, which in the
pytest process would include other tests' servers. The child sends what it saw back
through a pipe; the assertions are made here.
"""

from __future__ import annotations

import json
import os
import select
import signal

import pytest

from netserver.childexits import ChildExits

SHORT = 10.0  # seconds the forked check may take (it waits on real commands)


def _state(pid: int) -> str:
    """The process state letter of `pid` (Z: a zombie), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return "gone"
    return raw[raw.rindex(b")") + 2 :].split()[0].decode()


def _check() -> dict[str, object]:
    """Start three commands (exit 0, exit 3, killed by KILL), wait on the signalfd, and
    record for each ended one its code and its state before and after the reap."""
    exits = ChildExits()
    poll = select.epoll()
    poll.register(exits.fd, select.EPOLLIN)
    scripts = {"zero": "exit 0", "three": "exit 3", "killed": "kill -KILL $$"}
    pids = {
        os.posix_spawn("/bin/sh", ["sh", "-c", text], {}, setsigmask=()): name
        for name, text in scripts.items()
    }
    seen: dict[str, object] = {}
    while len(seen) < len(pids):
        if not poll.poll(SHORT):
            break
        for pid, code in exits.ended():
            before = _state(pid)
            reaped = exits.reap(pid)
            seen[pids[pid]] = [code, before, reaped, _state(pid)]
    seen["after"] = list(exits.ended())  # nothing left: no child at all
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    seen["sigchld blocked"] = signal.SIGCHLD in blocked
    exits.close()
    return seen


@pytest.mark.slow  # forks, and starts commands
def test_an_ended_child_is_named_while_still_a_zombie_and_reaped_after() -> None:
    """The rule the spawner's roster depends on: `ended` names a child that is still a
    zombie (its pid cannot have been reused), `reap` collects it; codes as
    `waitstatus_to_exitcode` gives them (minus the signal for a killed one)."""
    out, into = os.pipe()
    pid = os.fork()
    if pid == 0:  # the forked check: never back into pytest
        code = 1
        try:
            os.close(out)
            os.write(into, json.dumps(_check()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(into)
    with os.fdopen(out, "rb") as stream:
        seen = json.loads(stream.read() or b"{}")
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert seen["zero"] == [0, "Z", True, "gone"]
    assert seen["three"] == [3, "Z", True, "gone"]
    assert seen["killed"] == [-signal.SIGKILL, "Z", True, "gone"]
    assert seen["after"] == []
    assert seen["sigchld blocked"] is True
