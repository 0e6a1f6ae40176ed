"""Shared by the `netserver run` tests: start the supervisor on a config, as a real process.

Readiness is the supervisor's own READY line on --ready-fd (written once every service
listens), never a sleep.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, RunningServer, launch_with_ready_fd

IS_ROOT = os.geteuid() == 0


def current_user() -> str:
    """Our user name: `user = ...` with it runs a service as we are (root says so)."""
    return pwd.getpwuid(os.geteuid()).pw_name


def write_config(tmp_path: Path, text: str, name: str = "services.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def start_run(
    config: Path, tmp_path: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> RunningServer:
    """`netserver run CONFIG` with --ready-fd; returns once every service is up."""
    log_path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.log')))}.log"
    proc, addresses = launch_with_ready_fd(
        lambda fd: [
            sys.executable,
            "-m",
            "netserver.cli",
            "run",
            "--ready-fd",
            str(fd),
            *args,
            str(config),
        ],
        log_path,
        {**os.environ, **(env or {})},
    )
    return RunningServer(proc, addresses, log_path)


def run_fails(config: Path) -> subprocess.CompletedProcess[str]:
    """`netserver run CONFIG` expected to exit at once (a config error)."""
    return subprocess.run(
        [sys.executable, "-m", "netserver.cli", "run", str(config)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def service_pid(log: str, name: str) -> int:
    """The pid of the last process started for service `name`, from the supervisor's log."""
    pids = re.findall(rf"service started\S* service={re.escape(name)} pid=(\d+)", log)
    assert pids, log
    return int(pids[-1])
