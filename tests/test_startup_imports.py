"""What a short `leafmail` command loads: neither the daemon nor the delivery side.

cron, mail(1) and git send-email run `leafmail sendmail` once a message, and scripts run
the queue tools in loops, so what each start imports is paid at every run: all of
netserver and leafmail once cost `sendmail -t` twice the CPU it costs now (figures in
README, "Start-up" under "sendmail"). Each command runs here in a real subprocess, on a
real spool, and reports the modules it had loaded when it was done; the check that it
did its work keeps the test from passing on a command that failed early.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from leafmail_fixtures import CLI_TIMEOUT, clean_env

from leafmail.spool import Spool
from leafmail.states import QueueState

# Run the CLI as `leafmail` runs it, then write the names in sys.modules to argv[1].
REPORTER = (
    "import json, sys\n"
    "from leafmail.cli import main\n"
    "status = main(sys.argv[2:])\n"
    "sys.stdout.flush()\n"
    "with open(sys.argv[1], 'w') as out:\n"
    "    json.dump(sorted(sys.modules), out)\n"
    "sys.exit(status)\n"
)

# Modules of the daemon, its SMTP server and checks, the delivery side, and the heavy
# standard library they bring (asyncio alone is ~40 ms of CPU a start).
NOT_AT_START = (
    "leafmail.daemon",
    "leafmail.smtpd",
    "leafmail.receive",
    "leafmail.checks",
    "leafmail.qmgr",
    "leafmail.queue",
    "leafmail.message",
    "leafmail.delivery",
    "leafmail.flush",
    "leafmail.privsep",
    "netserver.server",
    "netserver.modes",
    "netserver.aio",
    "netserver.smtp.protocol",
    "asyncio",
    "ssl",
    "multiprocessing",
)

MESSAGE = b"From: alice@src.test\nTo: bob@dst.test\nSubject: cron\n\nhello\n"


def loaded_by(tmp_path: Path, spool: Path, args: list[str], stdin: bytes = b"") -> list[str]:
    """The modules `leafmail ARGS` had loaded at its end; it must have exited 0."""
    report = tmp_path / "modules.json"
    config = tmp_path / "leafmail.toml"
    config.write_text("")
    env = {"LEAFMAIL_SPOOL": str(spool), "LEAFMAIL_CONFIG": str(config)}
    proc = subprocess.run(
        [sys.executable, "-c", REPORTER, str(report), *args],
        cwd=ROOT,
        env=clean_env(tmp_path, env),
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    modules: list[str] = json.loads(report.read_text())
    return modules


def unwanted(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == u or m.startswith(u + ".") for u in NOT_AT_START)]


def test_sendmail_loads_neither_the_daemon_nor_delivery(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    modules = loaded_by(tmp_path, spool, ["sendmail", "-t"], MESSAGE)
    assert unwanted(modules) == []
    assert "leafmail.sendmail" in modules  # the command ran, and through this path
    [qid] = Spool(spool).ids(QueueState.QUEUE)
    assert b"hello" in Spool(spool).get(qid).data


@pytest.mark.parametrize("tool", ["queue", "hold", "release", "delete"])
def test_the_queue_tools_load_neither_the_daemon_nor_delivery(tmp_path: Path, tool: str) -> None:
    spool_dir = tmp_path / "spool"
    loaded_by(tmp_path, spool_dir, ["sendmail", "bob@dst.test"], MESSAGE)
    spool = Spool(spool_dir)
    [qid] = spool.ids(QueueState.QUEUE)
    if tool == "release":
        spool.move(qid, QueueState.QUEUE, QueueState.HOLD)
    args = [tool] if tool == "queue" else [tool, qid]
    modules = loaded_by(tmp_path, spool_dir, args)
    assert unwanted(modules) == []
    assert "leafmail.cli" in modules
    after = {"queue": "queue", "hold": "hold", "release": "queue", "delete": None}[tool]
    assert spool.find(qid) == after


def test_the_check_can_fail(tmp_path: Path) -> None:
    """`leafmail flush` needs the delivery side: the same check finds it there."""
    modules = loaded_by(tmp_path, tmp_path / "spool", ["flush", "--no-daemon"])
    assert "leafmail.delivery" in unwanted(modules)


@pytest.mark.parametrize("package", ["netserver", "netserver.smtp", "leafmail"])
def test_each_lazy_name_is_where_its_typed_import_says(package: str) -> None:
    """The run-time table of a package's public names (`netserver.lazy`) and the imports
    type checkers read under TYPE_CHECKING name the same homes, and every name loads."""
    module = importlib.import_module(package)
    source = Path(module.__file__ or "").read_text()
    typed: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.level == 1
                typed.update({alias.name: f".{stmt.module}" for alias in stmt.names})
    homes: dict[str, str] = vars(module)["_HOMES"]
    assert typed == homes
    assert sorted(module.__all__) == sorted(homes)
    for name, home in homes.items():
        value = getattr(module, name)
        assert value is getattr(importlib.import_module(home, package), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = module.no_such_name
