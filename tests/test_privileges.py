"""Privilege drop: services and `serve --user` run as the configured user, root only on request.

The drops themselves need root; as another user those tests skip, and the refusals
that need no root still run.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, ServerFactory
from inetd_support import IS_ROOT, current_user, run_fails, start_run, write_config
from netclient import exchange

from netserver import privileges
from netserver.errors import EX_CONFIG, ConfigError

needs_root = pytest.mark.skipif(not IS_ROOT, reason="dropping privileges needs root")
ID_COMMAND = 'command = ["/bin/sh", "-c", "id -u; id -g; id -G; echo $USER"]'


def _nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


@needs_root
def test_run_drops_to_nobody(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f'[[service]]\nname = "who"\nlisten = ["127.0.0.1:0"]\nuser = "nobody"\n{ID_COMMAND}\n',
    )
    server = start_run(config, tmp_path)
    try:
        uid, gid, groups, user = exchange(server.addresses[0]).decode().split("\n")[:4]
    finally:
        server.stop()
    assert int(uid) == _nobody().pw_uid
    assert int(gid) == _nobody().pw_gid
    assert "0" not in groups.split()
    assert user == "nobody"


@needs_root
def test_run_as_root_only_when_the_config_says_so(tmp_path: Path) -> None:
    text = '[[service]]\nname = "who"\nlisten = ["127.0.0.1:0"]\ncommand = ["/bin/true"]\n'
    result = run_fails(write_config(tmp_path, text))
    assert result.returncode == EX_CONFIG
    assert "'who'" in result.stderr and "user" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    server = start_run(write_config(tmp_path, text + 'user = "root"\n', "root.toml"), tmp_path)
    server.stop()
    assert "service runs as root, as its config says" in server.log()


@needs_root
def test_serve_user_flag_drops_after_binding(netserver_proc: ServerFactory) -> None:
    server = netserver_proc(
        ["--listen", "127.0.0.1:0", "--user", "nobody", "--", "/bin/sh", "-c", "id -u"]
    )
    assert int(exchange(server.addresses[0])) == _nobody().pw_uid


@needs_root
def test_drop_cannot_be_undone() -> None:
    """In a child: after `drop`, setuid(0) fails and every id is nobody's."""
    code = (
        "import os\nfrom netserver import privileges\n"
        "privileges.drop(privileges.resolve('nobody'))\n"
        "try:\n    os.setuid(0)\nexcept PermissionError:\n    print('stuck', os.getresuid())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    uid = _nobody().pw_uid
    assert out.strip() == f"stuck ({uid}, {uid}, {uid})"


def test_switching_user_without_root_is_refused(tmp_path: Path) -> None:
    if IS_ROOT:
        pytest.skip("as root the switch is allowed")
    text = '[[service]]\nname = "x"\nlisten = ["127.0.0.1:0"]\nuser = "nobody"\n'
    result = run_fails(write_config(tmp_path, text + 'command = ["/bin/true"]\n'))
    assert result.returncode == EX_CONFIG
    assert "user" in result.stderr


def test_unknown_user_and_group_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown user"):
        privileges.resolve("no-such-user-x")
    with pytest.raises(ConfigError, match="unknown group"):
        privileges.resolve(current_user(), "no-such-group-x")


def test_resolve_defaults_to_the_login_group_and_its_groups() -> None:
    me = pwd.getpwuid(os.geteuid())
    identity = privileges.resolve(me.pw_name)
    assert identity.uid == me.pw_uid and identity.gid == me.pw_gid
    assert me.pw_gid in identity.groups
    explicit = privileges.resolve(me.pw_name, str(me.pw_gid), [])
    assert explicit.groups == (me.pw_gid,)
