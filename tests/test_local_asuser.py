"""Local delivery as the recipient (issue 12 item 3), with real users, as root.

Every test here makes the real accounts it needs with useradd (names lmt..., homes under
/tmp/lmt-homes) and delivers through the real `LocalAgent`: a forked child takes the
user's groups, gid and uid before it opens a mailbox, reads an :include: file or runs a
command. The checks read what the kernel recorded: file owners and modes, and the
credentials a command saw in /proc/self/status. As an ordinary user there is nothing to
switch to, so the module is skipped, with that reason.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import stat
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from localusers import PYTHON, ROOT, ensure_user, fresh_home, owner_of, remove_scratch, scratch

from leafmail.config import Config, _build
from leafmail.delivery import Outcome, Result
from leafmail.delivery.asuser import run_as
from leafmail.delivery.local import LocalAgent
from leafmail.envelope import Envelope, Recipient
from leafmail.spool import Spool
from netserver.errors import ConfigError
from netserver.privileges import Identity

pytestmark = pytest.mark.skipif(not ROOT, reason="switching users needs root (CI runs as root)")

HOST = "mx.test"
MESSAGE = b"From: <s@remote.example>\r\nSubject: hi\r\n\r\nbody\r\n"
VIRTUAL = "lmtvirt"
ALICE = "lmtalice"
DEFAULT = "lmtdflt"  # default_user: commands and files of root's aliases


def agent_for(tmp: Path, *, path: str, users: Sequence[str] = (), **local: Any) -> LocalAgent:
    table: dict[str, Any] = {"path": path, "users": list(users), "virtual_user": VIRTUAL}
    table.update(local)
    config: Config = _build({"hostname": HOST, "local": table}, "test")
    return LocalAgent(
        config.local, config.local_domains, Spool(tmp / "spool"), default_user=DEFAULT
    )


def deliver(agent: LocalAgent, *rcpts: str) -> list[Result]:
    envelope = Envelope("s@remote.example", tuple(Recipient(r) for r in rcpts))
    results = asyncio.run(agent.deliver(envelope, MESSAGE, range(len(rcpts))))
    return [results[i] for i in range(len(rcpts))]


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A directory of root's (0755) that every user can enter and none may write; it
    and every other scratch directory of the test are removed afterwards."""
    for name in (VIRTUAL, DEFAULT):
        ensure_user(name)
    yield scratch()
    remove_scratch()


def tree(path: Path) -> list[Path]:
    return [path, *sorted(path.rglob("*"))]


# --- mailboxes ------------------------------------------------------------------------


def test_maildir_is_made_by_the_user_in_their_home(tmp: Path) -> None:
    alice = ensure_user(ALICE)
    home = fresh_home(alice)
    (result,) = deliver(agent_for(tmp, path="{home}/Maildir"), f"{ALICE}@{HOST}")
    assert result.outcome is Outcome.DELIVERED, result.text
    box = home / "Maildir"
    for path in tree(box):
        assert owner_of(path) == (alice.pw_uid, alice.pw_gid), path
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    (name,) = os.listdir(box / "new")
    assert (box / "new" / name).read_bytes().endswith(b"Subject: hi\n\nbody\n")  # LF


def test_no_maildir_is_planted_in_a_root_owned_or_another_users_home(tmp: Path) -> None:
    """The attack: an account whose home is /bin, /var/www or someone else's home."""
    system_home = scratch()  # root's, 0755, as /bin or /var/www
    victim = ensure_user(ALICE)
    victim_home = fresh_home(victim)
    ensure_user("lmtsys", home=system_home)
    ensure_user("lmtsquat", home=victim_home)
    agent = agent_for(tmp, path="{home}/Maildir")
    for result in deliver(agent, f"lmtsys@{HOST}", f"lmtsquat@{HOST}"):
        assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.3.0")
        assert "Permission denied" in result.text
    assert os.listdir(system_home) == [] and os.listdir(victim_home) == []


def test_a_parent_with_user_in_it_is_made_as_the_user_where_they_may(tmp: Path) -> None:
    """/srv/mail/{user}/Maildir (issue 13 item 8): made as the user under a directory
    they may write; named in the error under one they may not."""
    alice = ensure_user(ALICE)
    open_spool = scratch(mode=0o1777)  # like /tmp: anyone may make their directory
    agent = agent_for(tmp, path=f"{open_spool}/{{user}}/Maildir")
    assert deliver(agent, f"{ALICE}@{HOST}")[0].outcome is Outcome.DELIVERED
    assert owner_of(open_spool / ALICE) == (alice.pw_uid, alice.pw_gid)
    closed = scratch()  # root's 0755: alice may not make her directory there
    (result,) = deliver(agent_for(tmp, path=f"{closed}/{{user}}/Maildir"), f"{ALICE}@{HOST}")
    assert result.outcome is Outcome.DEFERRED
    assert f"cannot create {closed}/{ALICE}: Permission denied" in result.text
    assert os.listdir(closed) == []


def test_mbox_in_a_group_writable_spool_is_written_with_its_group(tmp: Path) -> None:
    """Debian's /var/mail is root:mail 2775: the user writes with the spool's group, as
    Postfix's local(8) does; nothing is made as root and given away."""
    alice = ensure_user(ALICE)
    spool_group = ensure_user("lmtmail")  # its user group stands for "mail"
    var_mail = scratch(mode=0o2775)
    os.chown(var_mail, 0, spool_group.pw_gid)
    var_mail.chmod(0o2775)
    agent = agent_for(tmp, path=f"{var_mail}/{{user}}", mailbox="mbox")
    assert deliver(agent, f"{ALICE}@{HOST}")[0].outcome is Outcome.DELIVERED
    assert owner_of(var_mail / ALICE) == (alice.pw_uid, spool_group.pw_gid)
    assert stat.S_IMODE(os.stat(var_mail / ALICE).st_mode) == 0o600
    assert not (var_mail / f"{ALICE}.lock").exists()
    closed = scratch()  # root's 0755: no group may write it, so delivery cannot
    (result,) = deliver(agent_for(tmp, path=f"{closed}/{{user}}", mailbox="mbox"), ALICE)
    assert result.outcome is Outcome.DEFERRED and "Permission denied" in result.text
    assert os.listdir(closed) == []


def test_someone_elses_mbox_is_refused(tmp: Path) -> None:
    alice = ensure_user(ALICE)
    spool = scratch(alice)
    (spool / ALICE).write_bytes(b"")
    os.chown(spool / ALICE, pwd.getpwnam(VIRTUAL).pw_uid, 0)  # not alice's
    (spool / ALICE).chmod(0o666)  # she could write it, but it is not hers
    (result,) = deliver(agent_for(tmp, path=f"{spool}/{{user}}", mailbox="mbox"), ALICE)
    assert result.outcome is Outcome.DEFERRED and "belongs to uid" in result.text
    assert (spool / ALICE).read_bytes() == b""


def test_users_without_an_account_are_written_as_the_virtual_user(tmp: Path) -> None:
    virtual = pwd.getpwnam(VIRTUAL)
    boxes = scratch(virtual)
    agent = agent_for(tmp, path=f"{boxes}/{{user}}", users=["nosuchaccount"])
    assert deliver(agent, f"nosuchaccount@{HOST}")[0].outcome is Outcome.DELIVERED
    for path in tree(boxes / "nosuchaccount"):
        assert owner_of(path) == (virtual.pw_uid, virtual.pw_gid)


@pytest.mark.parametrize("spec", ["root", "0:0", "0:5", "5:0", "lmt-no-such-user"])
def test_the_virtual_user_is_never_root_and_must_exist(tmp: Path, spec: str) -> None:
    with pytest.raises(ConfigError, match="virtual_user"):
        agent_for(tmp, path=f"{tmp}/{{user}}", users=["nosuchaccount"], virtual_user=spec)


def test_roots_own_mailbox_is_written_as_root_as_postfix_does(tmp: Path) -> None:
    boxes = scratch()
    agent = agent_for(tmp, path=f"{boxes}/{{user}}", mailbox="mbox")
    assert deliver(agent, f"root@{HOST}")[0].outcome is Outcome.DELIVERED
    assert owner_of(boxes / "root")[0] == 0


# --- commands, files and includes ------------------------------------------------------

WHOAMI = """
import sys
fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
with open(sys.argv[1], "w") as out:
    out.write(" ".join(fields[k].split()[0] for k in ("Uid", "Gid")) + "\\n")
    out.write(" ".join(fields["Uid"].split()) + "|" + " ".join(fields["Groups"].split()))
"""


def whoami(directory: Path) -> str:
    script = directory / "whoami.py"
    script.write_text(textwrap.dedent(WHOAMI), encoding="utf-8")
    script.chmod(0o644)
    return f"{PYTHON} {script}"


def test_commands_run_as_the_include_owner_with_their_groups(tmp: Path) -> None:
    alice = ensure_user(ALICE, groups=("lmtextra",))
    extra = [g for g in os.getgrouplist(ALICE, alice.pw_gid) if g != alice.pw_gid]
    out = scratch(alice, mode=0o700)
    members = out / "members"
    members.write_text(f'"|{whoami(tmp)} {out}/alice.txt"\n', encoding="utf-8")
    os.chown(members, alice.pw_uid, alice.pw_gid)
    dflt = pwd.getpwnam(DEFAULT)
    dflt_out = scratch(dflt, mode=0o700)
    (tmp / "aliases").write_text(
        f'list: :include:{members}\nroots: "|{whoami(tmp)} {dflt_out}/root.txt"\n',
        encoding="utf-8",
    )
    agent = agent_for(tmp, path=f"{tmp}/{{user}}", aliases=str(tmp / "aliases"))
    results = deliver(agent, f"list@{HOST}", f"roots@{HOST}")
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 2, results
    first, second = (out / "alice.txt").read_text().splitlines()
    assert first == f"{alice.pw_uid} {alice.pw_gid}"
    uids, groups = second.split("|")
    assert set(uids.split()) == {str(alice.pw_uid)}  # real, effective, saved, fs: no root
    assert extra and {str(g) for g in extra} <= set(groups.split())
    assert (dflt_out / "root.txt").read_text().splitlines()[0] == f"{dflt.pw_uid} {dflt.pw_gid}"


@pytest.mark.parametrize("name", [DEFAULT, "root"])
def test_default_user_comes_from_the_config_and_is_never_root(tmp: Path, name: str) -> None:
    out = scratch(pwd.getpwnam(DEFAULT), mode=0o700)
    (tmp / "aliases").write_text(f'who: "|{whoami(tmp)} {out}/who.txt"\n', encoding="utf-8")
    table = {"path": f"{tmp}/{{user}}", "aliases": str(tmp / "aliases"), "default_user": name}
    config = _build({"hostname": HOST, "local": table}, "test")
    agent = LocalAgent(config.local, config.local_domains, Spool(tmp / "s"))
    (result,) = deliver(agent, f"who@{HOST}")
    if name == "root":
        assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.3.5")
        assert "must not be root" in result.text and not (out / "who.txt").exists()
    else:
        dflt = pwd.getpwnam(DEFAULT)
        assert result.outcome is Outcome.DELIVERED, result.text
        assert (out / "who.txt").read_text().splitlines()[0] == f"{dflt.pw_uid} {dflt.pw_gid}"


def via_include(tmp: Path, owner: pwd.struct_passwd, directory: Path, text: str) -> Result:
    """Deliver to "list", which root's aliases file expands through an include file
    that `owner` owns (in `directory`) and that holds `text`."""
    members = directory / "members"
    members.write_text(text, encoding="utf-8")
    os.chown(members, owner.pw_uid, owner.pw_gid)
    (tmp / "aliases").write_text(f"list: :include:{members}\n", encoding="utf-8")
    agent = agent_for(tmp, path=f"{tmp}/{{user}}", aliases=str(tmp / "aliases"))
    (result,) = deliver(agent, f"list@{HOST}")
    return result


def test_a_users_include_cannot_disclose_a_root_only_file(tmp: Path) -> None:
    """The attack: alice's include names :include:/root-only/file; its lines must never
    reach the bounce text (it is read as alice: permission denied)."""
    alice = ensure_user(ALICE)
    secret_dir = scratch(mode=0o700)  # root's
    secret = secret_dir / "secret"
    secret.write_text("topsecretline\n", encoding="utf-8")
    secret.chmod(0o600)
    result = via_include(tmp, alice, scratch(alice), f":include:{secret}\n")
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.3.5")
    assert "Permission denied" in result.text and "topsecret" not in result.text


def test_a_file_target_of_a_users_include_is_written_as_that_user(tmp: Path) -> None:
    alice = ensure_user(ALICE)
    mine = scratch(alice)
    result = via_include(tmp, alice, mine, f"{mine}/archive\n{tmp}/planted\n")
    assert result.outcome is Outcome.DEFERRED  # the second file: root's directory
    assert owner_of(mine / "archive") == (alice.pw_uid, alice.pw_gid)
    assert not (tmp / "planted").exists()


def test_a_fifo_include_is_refused_at_once(tmp: Path) -> None:
    os.mkfifo(tmp / "fifo")
    (tmp / "aliases").write_text(f"list: :include:{tmp}/fifo\n", encoding="utf-8")
    agent = agent_for(tmp, path=f"{tmp}/{{user}}", aliases=str(tmp / "aliases"))
    (result,) = deliver(agent, f"list@{HOST}")  # no writer ever opens the FIFO: a wait would hang
    assert result.outcome is Outcome.DEFERRED and "not a regular file" in result.text


# --- the primitive --------------------------------------------------------------------


def test_the_child_has_every_id_of_the_user_and_none_of_root() -> None:
    alice = ensure_user(ALICE, groups=("lmtextra",))
    groups = tuple(os.getgrouplist(ALICE, alice.pw_gid))
    who = Identity(ALICE, alice.pw_uid, alice.pw_gid, groups, alice.pw_dir)

    def ids() -> dict[str, Any]:
        return {"uid": os.getresuid(), "gid": os.getresgid(), "groups": sorted(os.getgroups())}

    seen = asyncio.run(run_as(who, ids, timeout=10))
    assert seen["uid"] == [alice.pw_uid] * 3 and seen["gid"] == [alice.pw_gid] * 3
    assert seen["groups"] == sorted(groups) and 0 not in seen["groups"]
    assert os.getresuid() == (0, 0, 0)  # the parent keeps root


def test_a_child_past_its_deadline_is_killed(tmp: Path) -> None:
    pidfile = tmp / "pid"

    def hang() -> dict[str, Any]:
        pidfile.write_text(str(os.getpid()))
        while True:
            signal.pause()

    with pytest.raises(TimeoutError):
        asyncio.run(run_as(None, hang, timeout=0.5))
    with pytest.raises(ProcessLookupError):  # killed and reaped by run_as itself
        os.kill(int(pidfile.read_text()), 0)
