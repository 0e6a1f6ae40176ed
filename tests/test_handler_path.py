"""`netserver serve --handler`: the current directory never shadows an installed module.

A server started as root from a directory where someone planted ``uvloop.py`` used to
import it (the directory was put first on ``sys.path``). The planted module here leaves
a marker file if it is ever imported; the handler module in the same directory must
still be found, since the directory stays searchable, last.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import RunningServer, launch_with_ready_fd
from netclient import exchange

PLANTED = """\
from pathlib import Path
Path({marker!r}).write_text("imported from the working directory")
raise ImportError("planted module")
"""
HANDLER = """\
import sys

def main() -> None:
    for line in sys.stdin:
        sys.stdout.write("cwd handler: " + line)
"""
# `python -m` puts the directory first itself; the installed script puts its bin/ first.
LAUNCHERS = {
    "python -m": [sys.executable, "-m", "netserver.cli"],
    "python -m package": [sys.executable, "-m", "netserver"],
    "script": [str(Path(sys.executable).with_name("netserver"))],
}


SERVICES = {
    "handler": (["--handler", "cwdhandler:main"], b"cwd handler: hi\n"),
    "command": (["--", "/bin/cat"], b"hi\n"),
}


@pytest.mark.parametrize("service", list(SERVICES))
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_planted_uvloop_in_cwd_is_not_imported(tmp_path: Path, launcher: str, service: str) -> None:
    args, expected = SERVICES[service]
    marker = tmp_path / "planted-was-imported"
    (tmp_path / "uvloop.py").write_text(PLANTED.format(marker=str(marker)))
    (tmp_path / "cwdhandler.py").write_text(HANDLER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc, addresses = launch_with_ready_fd(
        lambda fd: [
            *LAUNCHERS[launcher],
            "serve",
            "--ready-fd",
            str(fd),
            "--listen",
            "127.0.0.1:0",
            "--loop",
            "auto",
            *args,
        ],
        tmp_path / "server.log",
        env,
        cwd=tmp_path,
    )
    server = RunningServer(proc, addresses, tmp_path / "server.log")
    try:
        assert exchange(addresses[0], b"hi\n") == expected
    finally:
        assert server.stop() == 0, server.log()
    assert not marker.exists(), server.log()
