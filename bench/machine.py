"""The facts about the machine a run happened on, printed with every result.

Benchmark figures mean nothing without them: core count and CPU model bound what is
possible, the kernel sets the cost of loopback TCP and of fork/exec, and the versions
say what was measured.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata


def cpu_model() -> str:
    """The first "model name" in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _disk_stat(path: str | os.PathLike[str]) -> list[int]:
    """The counters of the disk under `path` (/sys/dev/block/MAJ:MIN/stat), or none."""
    dev = os.stat(path).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as stat:
            return [int(field) for field in stat.read().split()]
    except (OSError, ValueError):
        return []


def disk_flushes(path: str | os.PathLike[str]) -> int | None:
    """Flush requests completed so far by the disk under `path` (field 16 of its
    /sys/dev/block/MAJ:MIN/stat), or None where the kernel does not say: on a disk with
    a write-back cache each durability barrier costs one."""
    fields = _disk_stat(path)
    return fields[15] if len(fields) > 15 else None


def disk_writes(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(write requests completed, 512-octet sectors written) so far by the disk under
    `path` (fields 5 and 7 of its stat), or None where the kernel does not say.

    Every block a commit's barrier writes (the data, and on ext4 without a journal the
    inode, bitmap and directory blocks) is a request the kernel submits and completes,
    in system time; per message, it tells a run whose files lie scattered (more blocks
    a batch) from one whose files lie together. The count is the whole disk's: what else
    writes to it meanwhile adds to it.
    """
    fields = _disk_stat(path)
    return (fields[4], fields[6]) if len(fields) > 6 else None


def package_version(name: str) -> str:
    """An installed Python distribution's version, or "not installed"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def tcpserver_version() -> str:
    """ucspi-tcp's Debian package version (tcpserver itself has no --version)."""
    if shutil.which("tcpserver") is None:
        return "not installed"
    if shutil.which("dpkg-query") is not None:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "ucspi-tcp"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0 and done.stdout:
            return f"ucspi-tcp {done.stdout}"
    return "installed, version unknown"


def describe() -> list[tuple[str, str]]:
    """(label, value) pairs for the report header."""
    load = os.getloadavg()
    return [
        ("cpus", str(os.cpu_count())),
        ("cpu model", cpu_model()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("python", f"{platform.python_implementation()} {sys.version.split()[0]}"),
        ("uvloop", package_version("uvloop")),
        ("netserver", package_version("netserver")),
        ("tcpserver", tcpserver_version()),
        ("load average at start", " ".join(f"{x:.2f}" for x in load)),
    ]
