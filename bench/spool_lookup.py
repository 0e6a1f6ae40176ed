"""Creating and renaming a spool file by path through /proc/self/fd, or by directory descriptor.

Issue 12: the smtpd workers reach the spool through a descriptor the parent opened, as
``/proc/self/fd/N``, so a commit that names ``/proc/self/fd/N/tmp/QID`` walks procfs
(``/proc``, ``self``, the pid, ``fd``, the magic link) on each of its three lookups:
the create and both ends of the rename. `leafmail.spool.GroupCommitter` now creates and
renames relative to descriptors of tmp/ and the queue directory (``openat``,
``renameat``). This measures the CPU of each way per file, without the disk barriers
(which are the same either way): create with ``O_CREAT|O_EXCL``, write 1,700 bytes,
close, rename into a second directory. Kinds alternate round by round, each round in a
fresh directory pair under DIR, which is kept (deleting thousands of files slows the
next creations on ext4 without a journal: see `bench.inodes`).

    python -m bench.spool_lookup DIR [--files 2000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from pathlib import Path

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_BLOB = b"x" * 1700  # about a 1 KiB message with its envelope and header line


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_round(root: Path, kind: str, files: int) -> float:
    """CPU µs per file to create, write, close and rename `files` files one way."""
    (root / "tmp").mkdir(parents=True)
    (root / "queue").mkdir()
    handle = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    via = f"/proc/self/fd/{handle}"
    tmp, queue = os.open(root / "tmp", _DIR), os.open(root / "queue", _DIR)
    try:
        start = _cpu()
        for n in range(files):
            name = f"{n:024X}"
            if kind == "path":
                fd = os.open(f"{via}/tmp/{name}", _NEW, 0o600)
                os.write(fd, _BLOB)
                os.close(fd)
                os.rename(f"{via}/tmp/{name}", f"{via}/queue/{name}")
            else:
                fd = os.open(name, _NEW, 0o600, dir_fd=tmp)
                os.write(fd, _BLOB)
                os.close(fd)
                os.rename(name, name, src_dir_fd=tmp, dst_dir_fd=queue)
        return (_cpu() - start) / files * 1e6
    finally:
        for fd in (handle, tmp, queue):
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.spool_lookup", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("dir", type=Path, help="a new or empty directory on the spool's disk")
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    results: dict[str, list[float]] = {"path": [], "descriptor": []}
    for n in range(args.rounds):
        kinds = ("path", "descriptor") if n % 2 == 0 else ("descriptor", "path")
        for kind in kinds:
            results[kind].append(one_round(args.dir / f"{n}-{kind}", kind, args.files))
    for kind, figures in results.items():
        shown = ", ".join(f"{x:.1f}" for x in figures)
        print(f"{kind}: {shown} µs/file (median {statistics.median(figures):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
