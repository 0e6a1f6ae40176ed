"""The aliases file: parsing (with errors that name file and line), expansion and reload.

Real files in tmp_path; the local-user predicate is a plain set. Delivery through the
aliases (commands, files, forwards) is tested in test_local_delivery.py.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from leafmail.aliases import (
    MAX_DEPTH,
    MAX_INCLUDE_SIZE,
    Aliases,
    CommandTarget,
    Expansion,
    FileTarget,
    IncludeFile,
    LocalName,
    Problem,
    RemoteTarget,
    UserTarget,
    lookup_name,
)
from netserver.errors import ConfigError

USERS = frozenset({"alice", "bob", "carol", "postmaster"})
DOMAINS = ("mx.test", "example.org")


def aliases_file(tmp_path: Path, text: str, name: str = "aliases") -> Aliases:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return Aliases(str(path), DOMAINS)


def expand(aliases: Aliases, name: str) -> Expansion:
    return aliases.expand(name, USERS.__contains__)


def users(expansion: Expansion) -> list[str]:
    return [t.name for t in expansion.targets if isinstance(t, UserTarget)]


# --- parsing ---------------------------------------------------------------------


def test_entries_comments_continuations_and_case(tmp_path: Path) -> None:
    aliases = aliases_file(
        tmp_path,
        "# the staff\n"
        "\n"
        "Staff: alice,\n"
        "   bob,\n"
        "  # a comment inside an entry\n"
        "\tcarol\n"
        "POSTMASTER: alice\n",
    )
    table = aliases.table()
    assert set(table) == {"staff", "postmaster"}
    assert table["staff"] == (LocalName("alice"), LocalName("bob"), LocalName("carol"))
    assert "STAFF" in aliases and "Staff+tag" in aliases and "nobody" not in aliases


def test_target_kinds(tmp_path: Path) -> None:
    include = tmp_path / "list.txt"
    aliases = aliases_file(
        tmp_path,
        f"all: \\Alice, /var/tmp/archive, :include:{include}, Bob@MX.test, "
        "carol+x@example.org, dave@remote.example\n"
        "cmd: \"|/usr/bin/filter --opt=a,b 'two words'\", |/bin/true x\n",
    )
    owner = os.stat(tmp_path / "aliases")
    table = aliases.table()
    assert table["all"][0] == UserTarget("alice")
    assert table["all"][1] == FileTarget("/var/tmp/archive", owner.st_uid, owner.st_gid)
    assert table["all"][3:] == (
        LocalName("bob"),
        LocalName("carol"),
        RemoteTarget("dave@remote.example"),
    )
    assert table["cmd"] == (
        CommandTarget(("/usr/bin/filter", "--opt=a,b", "two words"), owner.st_uid, owner.st_gid),
        CommandTarget(("/bin/true", "x"), owner.st_uid, owner.st_gid),
    )


def test_command_arguments_are_split_with_shlex_not_a_shell(tmp_path: Path) -> None:
    aliases = aliases_file(tmp_path, 'x: "|/bin/echo a;b $(id) `id` \'c d\' \\"e f\\""\n')
    (target,) = aliases.table()["x"]
    assert isinstance(target, CommandTarget)
    assert target.argv == ("/bin/echo", "a;b", "$(id)", "`id`", "c d", "e f")


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("ok: alice\nno colon here\n", 2, "expected 'name: target"),
        ("  alice\n", 1, "continuation line"),
        ("a: alice\nb:\n", 2, "no targets"),
        ("a: alice\nb: bob\nA: carol\n", 3, "already defined on line 1"),
        ("a: |\n", 1, "empty command"),
        ('a: "|/bin/echo \'x"\n', 1, "bad command"),
        ("a: :include:relative/path\n", 1, "absolute path"),
        ('a: "unterminated\n', 1, "unterminated"),
        ("a: bad@@address\n", 1, "bad address"),
        ("a: two words\n", 1, "quote targets"),
        ("bad name: alice\n", 1, "bad alias name"),
        ("# c\n\nx: alice,\n  \\\n", 3, "bad local name"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path: Path, text: str, line: int, needle: str) -> None:
    aliases = aliases_file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        aliases.table()
    assert str(caught.value).startswith(f"{tmp_path / 'aliases'}:{line}: ")
    assert needle in str(caught.value)


def test_missing_and_non_utf8_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Aliases(str(tmp_path / "nope"), DOMAINS).table()
    (tmp_path / "latin1").write_bytes(b"caf\xe9: alice\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Aliases(str(tmp_path / "latin1"), DOMAINS).table()


def test_lookup_name() -> None:
    assert lookup_name("Alice+Lists") == "alice"
    assert lookup_name("+alice") == "+alice"  # nothing before the +: not an extension
    assert lookup_name("PostMaster") == "postmaster"


# --- expansion -------------------------------------------------------------------


def test_chains_expand_to_users_without_duplicates(tmp_path: Path) -> None:
    aliases = aliases_file(tmp_path, "a: b, c\nb: c, alice\nc: bob, alice\n")
    result = expand(aliases, "A+ext")
    assert users(result) == ["bob", "alice"]
    assert result.problems == ()


def test_loop_is_a_problem_not_a_hang(tmp_path: Path) -> None:
    aliases = aliases_file(tmp_path, "a: b\nb: a\n")
    assert expand(aliases, "a") == Expansion((), (Problem("5.4.6", "alias loop at a"),))


def test_self_reference_means_the_users_mailbox(tmp_path: Path) -> None:
    aliases = aliases_file(tmp_path, "alice: alice, bob\n")
    assert users(expand(aliases, "alice")) == ["alice", "bob"]


def test_depth_is_limited(tmp_path: Path) -> None:
    chain = "".join(f"n{i}: n{i + 1}\n" for i in range(MAX_DEPTH + 5)) + f"n{MAX_DEPTH + 5}: bob\n"
    aliases = aliases_file(tmp_path, chain)
    result = expand(aliases, "n0")
    assert result.targets == ()
    assert result.problems[0].status == "5.4.6"
    assert users(expand(aliases, f"n{6}")) == ["bob"]  # a short enough chain is fine


def test_unknown_users_are_problems_and_other_branches_still_count(tmp_path: Path) -> None:
    aliases = aliases_file(tmp_path, "team: alice, zed\n")
    result = expand(aliases, "team")
    assert users(result) == ["alice"]
    assert result.problems == (Problem("5.1.1", "no such user: zed"),)
    assert expand(aliases, "nobody-here").problems == (
        Problem("5.1.1", "no such user: nobody-here"),
    )
    assert users(expand(aliases, "bob")) == ["bob"]  # not an alias: the user itself


def test_include_nested_and_looping(tmp_path: Path) -> None:
    inner = tmp_path / "inner.txt"
    outer = tmp_path / "outer.txt"
    inner.write_text(f"# inner\ncarol\n:include:{outer}\n", encoding="utf-8")
    outer.write_text(f'alice, "|/bin/cat -"\n\nbob@mx.test\n:include:{inner}\n')
    aliases = aliases_file(tmp_path, f"list: :include:{outer}\n")
    result = expand(aliases, "list")
    assert users(result) == ["alice", "bob", "carol"]
    assert [t.argv for t in result.targets if isinstance(t, CommandTarget)] == [("/bin/cat", "-")]
    assert [p.status for p in result.problems] == ["5.4.6"]  # outer -> inner -> outer


def test_missing_include_defers_that_branch(tmp_path: Path) -> None:
    aliases = aliases_file(tmp_path, f"list: alice, :include:{tmp_path}/gone\n")
    result = expand(aliases, "list")
    assert users(result) == ["alice"]
    assert result.problems[0].status == "4.3.5"
    assert "gone" in result.problems[0].text


def test_include_errors_name_the_include_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("alice\nsome one\n", encoding="utf-8")
    aliases = aliases_file(tmp_path, f"list: :include:{bad}\n")
    (problem,) = expand(aliases, "list").problems
    assert problem.status == "4.3.5" and f"{bad}:2:" in problem.text


# --- reload ------------------------------------------------------------------------


def test_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    aliases = aliases_file(tmp_path, "x: alice\n")
    path = tmp_path / "aliases"
    assert users(expand(aliases, "x")) == ["alice"]
    stamp = os.stat(path).st_mtime_ns
    path.write_text("x: bob\n", encoding="utf-8")  # same size: the mtime tells
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert users(expand(aliases, "x")) == ["bob"]
    path.write_text("x: bob\nbroken\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=":2:"):
        expand(aliases, "x")


def test_unchanged_file_is_not_parsed_again(tmp_path: Path) -> None:
    aliases = aliases_file(tmp_path, "x: alice\n")
    assert aliases.table() is aliases.table()


# --- include files: bounded, de-duplicated, regular files only (issue 12 item 3) ------


def test_includes_that_name_each_other_many_times_are_read_once(tmp_path: Path) -> None:
    """Five files each naming the next 60 times froze the daemon (60**4 reads)."""
    reads: list[str] = []
    files = [tmp_path / f"level{i}" for i in range(5)]
    files[-1].write_text("alice\n", encoding="utf-8")
    for here, below in itertools.pairwise(files):
        here.write_text(f":include:{below}\n" * 60, encoding="utf-8")
    aliases = aliases_file(tmp_path, f"list: :include:{files[0]}\n")
    reader = aliases.reader

    def counting(path: str, uid: int, gid: int) -> IncludeFile:
        reads.append(path)
        return reader(path, uid, gid)

    aliases.reader = counting
    result = expand(aliases, "list")
    assert users(result) == ["alice"] and result.problems == ()
    assert sorted(reads) == sorted(str(f) for f in files)  # each file once


def test_fan_out_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_text("".join(f"u{i}@remote.example\n" for i in range(5000)), encoding="utf-8")
    aliases = aliases_file(tmp_path, f"list: :include:{big}\n")
    result = expand(aliases, "list")
    assert len(result.targets) < 1000
    assert result.problems == (Problem("5.3.5", "expands to over 1000 targets"),)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: os.mkfifo(p), "not a regular file"),
        (lambda p: p.mkdir(), "not a regular file"),
        (lambda p: p.write_bytes(b"alice\n" * (MAX_INCLUDE_SIZE // 6 + 1)), "larger than"),
        (lambda p: (p.write_text("alice\n"), p.chmod(0o666)), "world-writable"),
        (lambda p: p.symlink_to("/etc/passwd"), "Too many levels of symbolic links"),
    ],
)
def test_unsafe_include_files_are_refused_without_waiting(
    tmp_path: Path, make: Callable[[Path], object], needle: str
) -> None:
    target = tmp_path / "include"
    make(target)
    aliases = aliases_file(tmp_path, f"list: bob, :include:{target}\n")
    result = expand(aliases, "list")
    assert users(result) == ["bob"]
    (problem,) = result.problems
    assert problem.status == "4.3.5" and needle in problem.text


def test_the_aliases_file_itself_may_be_a_symlink_but_not_a_fifo(tmp_path: Path) -> None:
    aliases_file(tmp_path, "x: alice\n", name="real")
    (tmp_path / "aliases").symlink_to(tmp_path / "real")  # /etc/aliases -> ... is common
    assert users(expand(Aliases(str(tmp_path / "aliases"), DOMAINS), "x")) == ["alice"]
    os.mkfifo(tmp_path / "fifo")  # a FIFO would block whoever opens it: refused at once
    with pytest.raises(ConfigError, match="not a regular file"):
        Aliases(str(tmp_path / "fifo"), DOMAINS).table()
