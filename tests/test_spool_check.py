"""The spool is checked at start, not trusted (issue 12.5), and clean-up never follows links.

The attack these reproduce: a root daemon started on a spool owned by another user,
whose tmp/ is a symbolic link to a directory of files, used to delete those files at
start-up; a world-writable queue/ let any local user plant mail. Now `leafmail serve`
and the queue tools refuse such a spool with exit 78 and one line saying why, and the
files survive. Safe differences (a missing state directory, a mode that only lets
others read) are repaired, and each repair is said.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from leafmail_fixtures import run_leafmail_text
from system_users import ensure_user, needs_root

from leafmail.envelope import Envelope, Recipient
from leafmail.pickup import _open_public
from leafmail.spool import Spool, SpoolError
from leafmail.spoolcheck import STATE_DIRS, check_spool
from netserver.errors import EX_CONFIG, ConfigError

ME = os.geteuid()
OTHER = "lmtspool"


KEPT = Envelope(
    sender="a@src.test",
    recipients=(Recipient("b@example.test", ("FAILURE",), None),),
)


def make_spool(path: Path) -> Path:
    assert check_spool(path, ME) == []  # a new spool is not a repair
    return path


def victim(tmp_path: Path) -> Path:
    """A directory of files that are not the spool's to delete."""
    where = tmp_path / "precious"
    where.mkdir()
    for name in ("a", "b", "0123456789ABCDEF01234567"):
        (where / name).write_text(f"keep {name}\n")
    return where


def intact(where: Path) -> bool:
    names = sorted(p.name for p in where.iterdir())
    return names == ["0123456789ABCDEF01234567", "a", "b"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def with_link(spool: Path, target: Path, name: str = "tmp") -> None:
    """Make the spool's state directory `name` a symbolic link to `target`."""
    (spool / name).rmdir()
    (spool / name).symlink_to(target)


def serve(tmp_path: Path, spool: Path) -> subprocess.CompletedProcess[str]:
    """`leafmail serve` on `spool`; it must refuse, so it never runs long."""
    return run_leafmail_text(tmp_path, "serve", "--spool", str(spool), "--listen", "127.0.0.1:0")


def refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == EX_CONFIG, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


# --- check_spool --------------------------------------------------------------------------


def test_a_new_spool_is_made_private_with_every_state_directory(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "new" / "spool")
    assert mode(spool) == 0o700
    for name in STATE_DIRS:
        assert mode(spool / name) == 0o700, name
    assert check_spool(spool, ME) == []  # and a good spool is left alone


def test_missing_state_directories_are_created_and_said(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    (spool / "hold").rmdir()
    (spool / "corrupt").rmdir()
    (note,) = check_spool(spool, ME)
    assert "hold/, corrupt/" in note and "missing" in note
    assert mode(spool / "hold") == mode(spool / "corrupt") == 0o700


def test_the_queue_tools_create_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_spool(tmp_path / "none", ME, create=False)
    assert not (tmp_path / "none").exists()


def test_a_symlinked_state_directory_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    spool = make_spool(tmp_path / "spool")
    target = victim(tmp_path)
    with_link(spool, target)
    with pytest.raises(ConfigError, match=r"tmp/ is a symbolic link \(to '/.*/precious'\)"):
        check_spool(spool, ME)
    assert intact(target)


@pytest.mark.parametrize("name", ["queue", "status"])
def test_a_world_writable_state_directory_is_refused(tmp_path: Path, name: str) -> None:
    spool = make_spool(tmp_path / "spool")
    (spool / name).chmod(0o777)
    with pytest.raises(ConfigError, match=rf"{name} is group- or world-writable \(mode 0777\)"):
        check_spool(spool, ME)
    assert mode(spool / name) == 0o777  # refused, not "repaired": someone may have written


def test_a_group_writable_spool_is_refused(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    spool.chmod(0o770)
    with pytest.raises(ConfigError, match="group- or world-writable"):
        check_spool(spool, ME)


def test_a_state_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    (spool / "deferred").rmdir()
    (spool / "deferred").write_text("")
    with pytest.raises(ConfigError, match="deferred is not a directory"):
        check_spool(spool, ME)


def test_modes_that_only_let_others_read_are_tightened_and_said(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    spool.chmod(0o755)
    (spool / "queue").chmod(0o750)
    notes = check_spool(spool, ME)
    assert mode(spool) == 0o711  # others may still pass through to public/
    assert mode(spool / "queue") == 0o700
    assert any("from 0755 to 0711" in n for n in notes), notes
    assert any("queue/ from 0750 to 0700" in n for n in notes), notes


def test_the_submission_sockets_modes_pass_the_start_check_as_they_are(tmp_path: Path) -> None:
    """The spool is 0700 until the daemon opens its submission socket (leafmail.pickup):
    then 0711, so that other users reach public/submit (public/ 0755) through it but can
    list nothing, as OpenSMTPD's 0711 spool. The start check must take those modes as
    they are, or each restart would tighten what the socket needs and loosen it again."""
    spool = make_spool(tmp_path / "spool")
    assert mode(spool) == 0o700
    _open_public(spool)
    assert (mode(spool), mode(spool / "public")) == (0o711, 0o755)
    assert check_spool(spool, ME) == []
    _open_public(spool)  # the next start
    assert (mode(spool), mode(spool / "public")) == (0o711, 0o755)
    assert check_spool(spool, ME) == []


def test_a_writable_public_directory_is_refused(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    (spool / "public").mkdir()
    (spool / "public").chmod(0o777)
    with pytest.raises(ConfigError, match="public is group- or world-writable"):
        check_spool(spool, ME)


@needs_root
def test_a_spool_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    other = ensure_user(OTHER)
    spool = make_spool(tmp_path / "spool")
    os.chown(spool / "queue", other.pw_uid, -1)
    with pytest.raises(ConfigError, match=rf"queue is owned by uid {other.pw_uid} \({OTHER}\)"):
        check_spool(spool, ME)


@needs_root
def test_root_prepares_a_new_spool_for_the_daemon_user(tmp_path: Path) -> None:
    other = ensure_user(OTHER)
    spool = tmp_path / "spool"
    assert check_spool(spool, other.pw_uid) == []
    assert spool.stat().st_uid == other.pw_uid
    assert all((spool / name).stat().st_uid == other.pw_uid for name in STATE_DIRS)


# --- clean-up never follows a link ---------------------------------------------------------


def test_clean_tmp_refuses_a_symlinked_tmp(tmp_path: Path) -> None:
    spool = Spool(make_spool(tmp_path / "spool"))
    target = victim(tmp_path)
    with_link(spool.root, target)
    with pytest.raises(SpoolError, match="not a directory"):
        spool.clean_tmp()
    assert intact(target)


def test_clean_status_refuses_a_symlinked_status(tmp_path: Path) -> None:
    spool = Spool(make_spool(tmp_path / "spool"))
    target = victim(tmp_path)
    with_link(spool.root, target, "status")
    with pytest.raises(SpoolError, match="not a directory"):
        spool.clean_status()
    assert intact(target)


def test_clean_tmp_unlinks_links_not_their_targets(tmp_path: Path) -> None:
    spool = Spool(make_spool(tmp_path / "spool"))
    target = victim(tmp_path)
    tmp = spool.root / "tmp"
    (tmp / "to-a-file").symlink_to(target / "a")
    (tmp / "to-a-dir").symlink_to(target)
    (tmp / "leftover").write_bytes(b"half a message")
    (tmp / "a-directory").mkdir()
    assert spool.clean_tmp() == 3
    assert sorted(p.name for p in tmp.iterdir()) == ["a-directory"]
    assert intact(target)


def test_clean_status_unlinks_an_orphan_link_not_its_target(tmp_path: Path) -> None:
    spool = Spool(make_spool(tmp_path / "spool"))
    target = victim(tmp_path)
    orphan = spool.root / "status" / "0123456789ABCDEF01234567"
    orphan.symlink_to(target / "0123456789ABCDEF01234567")
    assert spool.clean_status() == 1
    assert not orphan.is_symlink()
    assert intact(target)


# --- the daemon and the queue tools refuse with 78 --------------------------------------------


@needs_root
def test_root_daemon_refuses_another_users_spool_with_a_symlinked_tmp(tmp_path: Path) -> None:
    """The attack: today's daemon emptied `precious` at start-up; now nothing is removed."""
    other = ensure_user(OTHER)
    spool = make_spool(tmp_path / "spool")
    target = victim(tmp_path)
    with_link(spool, target)
    for path in (spool, *(spool / n for n in STATE_DIRS if n != "tmp")):
        os.chown(path, other.pw_uid, other.pw_gid)
    os.lchown(spool / "tmp", other.pw_uid, other.pw_gid)
    refused(serve(tmp_path, spool), f"owned by uid {other.pw_uid} ({OTHER})", "refusing")
    assert intact(target)


def test_daemon_refuses_its_own_spool_with_a_symlinked_tmp(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    target = victim(tmp_path)
    with_link(spool, target)
    refused(serve(tmp_path, spool), "tmp/ is a symbolic link")
    assert intact(target)


def test_daemon_refuses_a_world_writable_queue(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    (spool / "queue").chmod(0o777)
    refused(serve(tmp_path, spool), "queue is group- or world-writable")


@pytest.mark.parametrize("tool", [["queue"], ["show", "0123456789ABCDEF01234567"], ["flush"]])
def test_queue_tools_refuse_a_world_writable_queue(tmp_path: Path, tool: list[str]) -> None:
    spool = make_spool(tmp_path / "spool")
    (spool / "queue").chmod(0o777)
    refused(run_leafmail_text(tmp_path, *tool, "--spool", str(spool)), "group- or world-writable")


def test_clean_tmp_unlinks_a_second_name_whose_link_count_is_right(tmp_path: Path) -> None:
    """After e2fsck, a rename's unwritten removal is a tmp/ name counted as a second
    link: unlinking it leaves the committed message whole under its queue name."""
    spool = Spool(make_spool(tmp_path / "spool"))
    qid = spool.commit(KEPT, b"Subject: kept\r\n\r\nbody\r\n")
    os.link(spool.root / "queue" / qid, spool.root / "tmp" / qid)
    assert spool.clean_tmp() == 1
    assert spool.tmp_leftovers() == []
    assert spool.get(qid).data == b"Subject: kept\r\n\r\nbody\r\n"


def test_a_tmp_name_of_a_committed_file_counted_once_is_never_unlinked(
    tmp_path: Path,
) -> None:
    """Before e2fsck, the same leftover shares the queue file's inode while the inode
    counts one link: unlinking it would free the message under its queue name. The
    tmp/ name's own lstat is then the queue file's (same device, inode, one link)."""
    spool = Spool(make_spool(tmp_path / "spool"))
    qid = spool.commit(KEPT, b"Subject: kept\r\n\r\nbody\r\n")
    counted_once = os.lstat(spool.root / "queue" / qid)
    assert counted_once.st_nlink == 1
    assert spool._committed_under_one_link(qid, counted_once)
    assert not spool._committed_under_one_link("0" * 24, counted_once)
    with_second_link = os.stat_result((*counted_once[:3], 2, *counted_once[4:]))
    assert not spool._committed_under_one_link(qid, with_second_link)
