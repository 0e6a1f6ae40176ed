"""The shipped systemd units pass `systemd-analyze verify`, drop-ins included.

The unit is copied with ExecStart pointing at this checkout's `leafmail` (verify
insists the program exists) and checked with its drop-in directory next to it; any
warning (an unknown key, a bad value) fails the test, not only errors.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

UNITS = ROOT / "contrib" / "systemd"


@pytest.fixture
def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("no systemd-analyze here (.ci/run installs systemd)")
    return found


def test_leafmail_unit_and_drop_in_verify_clean(analyze: str, tmp_path: Path) -> None:
    program = Path(sys.executable).parent / "leafmail"
    assert program.exists()
    text = (UNITS / "leafmail.service").read_text()
    assert "ExecStart=/usr/bin/leafmail serve" in text
    (tmp_path / "leafmail.service").write_text(
        text.replace("ExecStart=/usr/bin/leafmail", f"ExecStart={program}")
    )
    shutil.copytree(UNITS / "leafmail.service.d", tmp_path / "leafmail.service.d")
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "leafmail.service")],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_the_unit_runs_the_parent_as_root_with_a_cut_bounding_set() -> None:
    """No User= (the parent drops the workers itself); each capability is explained."""
    text = (UNITS / "leafmail.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert "User" not in settings
    caps = settings["CapabilityBoundingSet"].split()
    assert "CAP_SYS_ADMIN" not in caps and caps
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for cap in caps:
        assert cap in comments, f"{cap} is granted without a reason"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_the_drop_ins_the_unit_names_are_shipped() -> None:
    """A comment that sends the operator to a drop-in names a file that exists."""
    text = (UNITS / "leafmail.service").read_text()
    comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
    named = re.findall(r"[\w.-]+/[\w.-]+\.conf|[\w.-]+\.conf", comments)
    assert named
    for name in named:
        assert (UNITS / name).is_file(), f"the unit names {name}, which is not shipped"
