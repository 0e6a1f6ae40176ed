"""Start a program as systemd's socket activation does: listeners on fd 3.., LISTEN_* set.

    python sd_launch.py READY_FD NAMES FD [FD ...] -- PROGRAM [ARG ...]

The listening sockets FD ... become descriptors 3, 4, ...; LISTEN_FDS counts them,
LISTEN_FDNAMES is NAMES (colon-separated; "-" for none) and LISTEN_PID is this process's
pid, which exec keeps, so the program sees variables meant for it. READY_FD is moved out
of the way and "{ready}" in the arguments is replaced by its new number.
"""

from __future__ import annotations

import fcntl
import os
import sys

HIGH = 100  # above any descriptor the listeners will land on


def main(argv: list[str]) -> None:
    split = argv.index("--")
    ready, names, fds, command = (
        int(argv[0]),
        argv[1],
        [int(a) for a in argv[2:split]],
        argv[split + 1 :],
    )
    ready_high = fcntl.fcntl(ready, fcntl.F_DUPFD, HIGH)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, HIGH) for fd in fds]
    for index, fd in enumerate(moved):
        os.dup2(fd, 3 + index)
        os.close(fd)
    for fd in (ready, *fds):
        if fd >= 3 + len(fds):  # the originals, where dup2 did not already replace them
            os.close(fd)
    os.set_inheritable(ready_high, True)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_PID"] = str(os.getpid())
    if names != "-":
        os.environ["LISTEN_FDNAMES"] = names
    argv = [a.replace("{ready}", str(ready_high)) for a in command]
    os.execv(argv[0], argv)  # noqa: S606 (exec, not a shell: the pid must stay LISTEN_PID)


if __name__ == "__main__":
    main(sys.argv[1:])
