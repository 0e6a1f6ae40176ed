"""Real unprivileged users for tests that need a second local user (root only).

`ensure_user` creates a system account whose name starts with ``lmt`` the first time and
finds it afterwards, so reruns and parallel tests share it. `run_as` runs a `leafmail`
command as that user through tests/run_as.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (a second real user)")
RUN_AS = ROOT / "tests" / "run_as.py"
_LOCKED = 10  # useradd: cannot lock /etc/passwd (another useradd runs)


def ensure_user(
    name: str, home: Path | None = None, groups: tuple[str, ...] = ()
) -> pwd.struct_passwd:
    """The account `name` (created without a home or a login shell if missing). With
    `home`, that is its home directory (the directory is not made here); with `groups`
    (lmt..., made with groupadd if missing) it is a member of them too."""
    assert name.startswith("lmt") and all(g.startswith("lmt") for g in groups), name
    for group in groups:
        _admin(["groupadd", "-f", group])
    entry = _account(name, ["--home-dir", str(home)] if home is not None else [])
    if home is not None and entry.pw_dir != str(home):
        _admin(["usermod", "--home", str(home), name])
    for group in groups:
        _admin(["usermod", "-a", "-G", group, name])
    return pwd.getpwnam(name)


def _account(name: str, extra: list[str]) -> pwd.struct_passwd:
    """The account, found or made with useradd (again while another holds the lock)."""
    for _ in range(20):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        command = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        if _admin([*command, *extra, name], ok=(0, 9, _LOCKED)) == _LOCKED:
            time.sleep(0.1)  # another test's useradd holds /etc/passwd: a moment
    return pwd.getpwnam(name)


def _admin(command: list[str], ok: tuple[int, ...] = (0,)) -> int:
    """Run a user-administration command; its exit status, which must be in `ok`
    (useradd's 9: the account exists, made meanwhile)."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode not in ok:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.returncode


def run_as(
    user: str,
    args: list[str],
    *,
    env: dict[str, str],
    stdin: bytes = b"",
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[bytes]:
    """``leafmail ARGS`` as `user` (every uid and gid that user's, no way back)."""
    return subprocess.run(
        [sys.executable, str(RUN_AS), user, *args],
        input=stdin,
        cwd="/",
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A fresh directory other users may traverse and read, removed afterwards
    (pytest's tmp_path lies under root's private 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="lmt-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _hidden_on_the_way(path: Path) -> list[tuple[Path, str]]:
    """Each directory on the way to `path` that other users cannot search, with the
    name of the step below it that leads on."""
    steps = path.resolve().parts
    found = []
    for depth in range(1, len(steps)):
        above = Path(*steps[:depth])
        if not os.stat(above).st_mode & 0o001:
            found.append((above, steps[depth]))
    return found


def as_user_seeing(user: pwd.struct_passwd, paths: list[Path], views: Path) -> list[str]:
    """A command prefix that runs a program as `user` (every id theirs, no groups) in a
    private mount namespace where `paths` can be reached.

    A directory on the way that others cannot search (here /root, 0700, which holds the
    interpreter) is covered there by a searchable tmpfs into which only the steps towards
    `paths` are bound back from its real contents (kept reachable under `views`, an empty
    directory of root's). Nothing changes outside the namespace, and the user reaches
    nothing else under it.
    """

    def q(path: Path) -> str:
        return shlex.quote(str(path))

    hidden: dict[Path, set[str]] = {}
    for path in paths:
        for above, step in _hidden_on_the_way(path):
            hidden.setdefault(above, set()).add(step)
    script = ["set -e"]
    for number, (above, steps) in enumerate(sorted(hidden.items())):
        view = views / str(number)
        view.mkdir()
        script += [
            f"mount --bind {q(above)} {q(view)}",
            f"mount -t tmpfs -o mode=0755 lmt {q(above)}",
        ]
        for step in sorted(steps):
            make = "mkdir" if (above / step).is_dir() else "touch"
            script += [
                f"{make} {q(above / step)}",
                f"mount --bind {q(view / step)} {q(above / step)}",
            ]
    script.append(
        f'exec setpriv --reuid={user.pw_uid} --regid={user.pw_gid} --clear-groups -- "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script), "sh"]
