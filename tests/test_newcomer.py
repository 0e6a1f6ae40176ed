"""The newcomer's path: `make run`, then the README's next commands, exactly as written.

The real `make run` starts the daemon (on port 0, with --ready-fd through RUN_FLAGS, and
its spool in a temporary checkout-like directory through RUN_SPOOL); the Quickstart's
command lines are taken from README.md and run by bash in that directory, whose .venv is
a link to the checkout's, with the port the daemon got in place of 2525. That the
defaults agree (RUN_SPOOL is the checkout's ./spool, as the README's $PWD/spool) is
checked on `make -n run`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, launch_with_ready_fd
from leafmail_fixtures import clean_env

# Bounds on waiting, not performance limits: `make run` starts four processes and the
# Quickstart runs four Python commands, which on a loaded machine (two busy loops beside
# the other suites) took up to 14 s in all; a budget of 30 s left too little room.
TIMEOUT = 90.0
pytestmark = pytest.mark.timeout(4 * TIMEOUT)
EXPORT = 'export PATH="$PWD/.venv/bin:$PATH" LEAFMAIL_SPOOL="$PWD/spool"'


def quickstart_commands() -> list[str]:
    """The indented command lines of the Quickstart that follow `make run` and `make test`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    assert commands[:2] == [
        "make run     # starts the project's main job on 127.0.0.1:2525",
        "make test    # ruff, mypy --strict and the test suite",
    ]
    return [c for c in commands[2:] if not c.startswith(".venv/bin/netserver")]


def test_make_run_uses_the_spool_the_readme_exports() -> None:
    shown = subprocess.run(
        ["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert shown.returncode == 0, shown.stderr
    assert f"--spool {ROOT}/spool " in shown.stdout
    assert "--listen 127.0.0.1:2525 " in shown.stdout
    assert 'export PATH="$PWD/.venv/bin:$PATH" LEAFMAIL_SPOOL="$PWD/spool"' in shown.stdout
    assert (
        quickstart_commands()[0] == 'export PATH="$PWD/.venv/bin:$PATH" LEAFMAIL_SPOOL="$PWD/spool"'
    )


def test_the_readme_commands_work_against_make_run(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    env = clean_env(tmp_path)
    proc, words = launch_with_ready_fd(
        lambda fd: [
            "setsid",  # its own process group, so that make and the daemon stop together
            "make",
            "-s",
            "run",
            f"RUN_SPOOL={checkout / 'spool'}",
            "RUN_LISTEN=127.0.0.1:0",
            f"RUN_FLAGS=--ready-fd {fd}",
        ],
        tmp_path / "make-run.log",
        env,
        ready_timeout=TIMEOUT,
    )
    try:
        port = words[0].rpartition(":")[2]
        script = "set -e\n" + "\n".join(c.replace("2525", port) for c in quickstart_commands())
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=checkout,
            env={**env, "PWD": str(checkout)},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(TIMEOUT)
    assert done.returncode == 0, done.stderr
    listing, _, shown = done.stdout.partition("\n-- ")
    assert re.search(r"^[0-9A-F]{24} +active .*<me@localhost>$", listing, re.M), done.stdout
    assert "<you@example.org>" in listing
    info = json.loads(shown[shown.index("{") : shown.index("\n}\n") + 3])
    assert info["envelope"]["sender"] == "me@localhost"
    assert shown.endswith("Subject: hi\n\nhello\n")  # (text mode reads CRLF as LF)
