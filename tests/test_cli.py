"""The `netserver` command line: errors, exit codes (sysexits), `check`, `--help`.

Errors in `serve` run the real program in a subprocess (what a user sees: one line on
stderr, the sysexits code, never a traceback); `check` and `--help` call `cli.main`
in-process, which is the same code without the interpreter start-up.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from dnsserver import LoopbackDNS, reverse_name

from netserver import cli
from netserver.errors import EX_CONFIG, EX_UNAVAILABLE, EX_USAGE

SERVE = ("serve", "--listen", "127.0.0.1:0")
ECHO = ("--handler", "examples.echo:main")


def netserver(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real `netserver` program; a server that starts by mistake times out."""
    return subprocess.run(
        [sys.executable, "-m", "netserver.cli", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`cli.main(args)` here, as a CompletedProcess; an uncaught exception fails the test.

    For errors found before anything is bound; the same code as the real program
    without an interpreter start-up per case.
    """
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("netserver: ")
    for word in words:
        assert word in lines[0]
    assert result.stdout == ""


def assert_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """argparse errors: usage, then one error line naming the problem; exit 64."""
    assert result.returncode == EX_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("netserver")
    assert ": error: " in last
    for word in words:
        assert word in last


# -- serve: usage errors (64) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((*SERVE, "--mode", "bogus", *ECHO), ("--mode", "bogus")),
        ((*SERVE, "--max-conns", "-1", *ECHO), ("--max-conns",)),
        ((*SERVE, "--timeout", "soon", *ECHO), ("--timeout",)),
        ((*SERVE, "--restart-max", "0", *ECHO), ("--restart-max", "more than 0")),
        ((*SERVE, "--restart-max", "nan", *ECHO), ("--restart-max", "nan")),
        ((*SERVE, "--restart-max", "inf", *ECHO), ("--restart-max", "inf")),
        ((*SERVE, "--log-format", "xml", *ECHO), ("--log-format",)),
        (("bogus-command",), ("bogus-command",)),
        ((), ()),
    ],
)
def test_argparse_errors_exit_64(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    assert_usage_error(in_process(capsys, *args), *words)


def test_usage_error_in_a_real_process() -> None:
    assert_usage_error(netserver(*SERVE, "--mode", "bogus", *ECHO), "--mode", "bogus")


@pytest.mark.parametrize(
    "listen", ["127.0.0.1", "127.0.0.1:99999", "[::1:7000", "::1:7000", "host:port", "unix:"]
)
def test_malformed_listen_address_exits_64(listen: str) -> None:
    assert_one_line_error(netserver("serve", "--listen", listen, *ECHO), EX_USAGE, "listen address")


def test_handler_and_command_together_exit_64() -> None:
    assert_one_line_error(netserver(*SERVE, *ECHO, "--", "cat"), EX_USAGE, "not both")


def test_no_handler_exits_64(capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(in_process(capsys, *SERVE), EX_USAGE, "nothing to serve")


def test_ready_fd_not_open_exits_64() -> None:
    assert_one_line_error(netserver(*SERVE, "--ready-fd", "99", *ECHO), EX_USAGE, "99")


# -- serve: configuration errors (78) -----------------------------------------------------


@pytest.mark.parametrize("rule", ["10.0.0.0/33", "10.0.0.0/8/8", "300.1.2.3", "[::1", "bad_name!"])
def test_malformed_allow_rule_exits_78(capsys: pytest.CaptureFixture[str], rule: str) -> None:
    assert_one_line_error(in_process(capsys, *SERVE, "--allow", rule, *ECHO), EX_CONFIG)


def test_malformed_deny_rule_in_a_real_process() -> None:
    assert_one_line_error(
        netserver(*SERVE, "--deny", "10.0.0.0/33", *ECHO), EX_CONFIG, "10.0.0.0/33"
    )


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        ("no_such_module_xyz:main", ("no_such_module_xyz",)),
        ("examples.echo:nope", ("nope",)),
        ("examples.echo", ("MODULE:CALLABLE",)),
        ("examples.echo:__doc__", ("not callable",)),
        ("examples.echo:async_main", ("fork",)),  # async handler, default fork mode
    ],
)
def test_bad_handler_exits_78(
    capsys: pytest.CaptureFixture[str], handler: str, words: tuple[str, ...]
) -> None:
    mode = ("--mode", "fork") if handler.endswith("async_main") else ()
    result = in_process(capsys, *SERVE, *mode, "--handler", handler)
    assert_one_line_error(result, EX_CONFIG, *words)


def test_unimportable_handler_in_a_real_process() -> None:
    result = netserver(*SERVE, "--handler", "no_such_module_xyz:main")
    assert_one_line_error(result, EX_CONFIG, "no_such_module_xyz")


def test_stdio_handler_in_async_mode_exits_78(capsys: pytest.CaptureFixture[str]) -> None:
    result = in_process(capsys, *SERVE, "--mode", "async", *ECHO)
    assert_one_line_error(result, EX_CONFIG, "async")


def test_missing_command_exits_78() -> None:
    assert_one_line_error(netserver(*SERVE, "--", "/nonexistent"), EX_CONFIG, "/nonexistent")


def test_port_in_use_exits_69() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = netserver("serve", "--listen", f"127.0.0.1:{port}", *ECHO)
    assert_one_line_error(result, EX_UNAVAILABLE, "cannot listen")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to ~107 bytes."""
    with tempfile.TemporaryDirectory(prefix="ns-") as name:
        yield Path(name)


def test_missing_command_leaves_no_socket_file(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    result = netserver("serve", "--listen", f"unix:{path}", "--", "/nonexistent")
    assert_one_line_error(result, EX_CONFIG, "/nonexistent")
    assert not path.exists()


# -- check ---------------------------------------------------------------------------


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(["check", *args])
    out, err = capsys.readouterr()
    assert err == ""
    return code, out.splitlines()


@pytest.mark.parametrize(
    ("args", "code", "client"),
    [
        (("192.0.2.9",), 0, "192.0.2.9"),  # no rules: everyone
        (("--allow", "192.0.2.0/24", "192.0.2.9"), 0, "192.0.2.9"),
        (("--allow", "192.0.2.0/24", "198.51.100.1"), 1, "198.51.100.1"),
        (("--allow", "ALL", "--deny", "192.0.2.9", "192.0.2.9"), 1, "192.0.2.9"),
        (("--allow", "ALL", "--deny", "192.0.2.9", "192.0.2.10"), 0, "192.0.2.10"),
        (("--allow", "2001:db8::/32", "2001:db8::1"), 0, "2001:db8::1"),
        (("--allow", "[2001:db8::]/32", "[2001:db8::1]"), 0, "2001:db8::1"),
        (("--deny", "2001:db8::/32", "2001:db9::1"), 0, "2001:db9::1"),
        (("--deny", "192.0.2.0/24", "::ffff:192.0.2.9"), 1, "192.0.2.9"),  # v4-mapped
        (("--allow", "::ffff:192.0.2.0/120", "192.0.2.9"), 0, "192.0.2.9"),
        (("--allow", ".example.com", "--name", "host.example.com", "192.0.2.9"), 0, None),
        (("--allow", ".example.com", "--name", "example.com", "192.0.2.9"), 1, None),
        (("--allow", ".example.com", "--name", "host.example.org", "192.0.2.9"), 1, None),
        (("--deny", "host.example.com", "--name", "HOST.Example.com.", "192.0.2.9"), 1, None),
    ],
)
def test_check_decisions(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], code: int, client: str | None
) -> None:
    got, lines = check(capsys, *args)
    assert got == code
    assert len(lines) == 2
    assert lines[0].startswith(f"client: {client or '192.0.2.9'}")
    assert lines[1].startswith("allowed: " if code == 0 else "refused: ")


def test_check_shows_the_names_it_judged(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = check(
        capsys, "--allow", ".example.com", "--name", "Host.Example.com", "192.0.2.9"
    )
    assert code == 0
    assert lines[0] == "client: 192.0.2.9 (host.example.com)"


def test_check_looks_names_up_with_dns_server(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --name, a name rule makes `check` ask DNS (here a loopback server)."""
    records = {
        (reverse_name("192.0.2.10"), "PTR"): ["host.example.test"],
        ("host.example.test", "A"): ["192.0.2.10"],
        (reverse_name("192.0.2.11"), "PTR"): ["liar.example.test"],  # not confirmed
        ("liar.example.test", "A"): ["192.0.2.99"],
    }
    with LoopbackDNS(records) as dns:
        server = f"127.0.0.1:{dns.port}"
        ok, ok_lines = check(
            capsys, "--allow", ".example.test", "--dns-server", server, "192.0.2.10"
        )
        bad, _ = check(capsys, "--allow", ".example.test", "--dns-server", server, "192.0.2.11")
    assert (ok, bad) == (0, 1)
    assert ok_lines[0] == "client: 192.0.2.10 (host.example.test)"


def test_check_reads_an_access_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rules = tmp_path / "access"
    rules.write_text("# comment\ndeny 10.9.0.0/16\nallow 10.0.0.0/8\n")
    assert check(capsys, "--access-file", str(rules), "10.1.2.3")[0] == 0
    assert check(capsys, "--access-file", str(rules), "10.9.2.3")[0] == 1
    assert check(capsys, "--access-file", str(rules), "192.0.2.1")[0] == 1


def test_check_errors_in_a_real_process(tmp_path: Path) -> None:
    """Exit codes as the shell sees them, with one line and no traceback."""
    assert_one_line_error(netserver("check", "not-an-ip"), EX_USAGE, "not-an-ip")
    assert_one_line_error(netserver("check", "--allow", "10.0.0.0/33", "10.0.0.1"), EX_CONFIG)
    missing = tmp_path / "missing"
    assert_one_line_error(netserver("check", "--access-file", str(missing), "10.0.0.1"), EX_CONFIG)
    refused = netserver("check", "--deny", "ALL", "10.0.0.1")
    assert refused.returncode == 1
    assert refused.stdout.splitlines()[1].startswith("refused: ")


# -- help ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flags"),
    [
        ((), ("serve", "check", "Exit codes (sysexits): 0 ok, 64 usage, 69", "78")),
        (
            ("serve",),
            (
                "--listen",
                "--mode",
                "--handler",
                "--allow",
                "--deny",
                "--access-file",
                "--max-conns",
                "--max-per-source",
                "--rate-per-source",
                "--timeout",
                "--max-line",
                "--grace",
                "--log-format",
                "--ready-fd",
                "--workers-min",
                "--workers-max",
                "--recycle",
            ),
        ),
        (("check",), ("--allow", "--deny", "--name", "--access-file", "address")),
        (
            ("import-inetd",),
            ("--services", "--hosts-allow", "/etc/hosts.allow", "--hosts-deny", "Exit codes"),
        ),
    ],
)
def test_help_exits_0_and_lists_flags(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], flags: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("554 " + "x" * 4500, ("--refuse-access", "4504 octets, more than 1000")),
        ("554 a\x07b", ("--refuse-access", "control character")),
        ("554 \udcff", ("--refuse-access", "not UTF-8")),
    ],
)
def test_a_refusal_line_that_cannot_be_sent_is_a_usage_error(
    text: str, words: tuple[str, ...]
) -> None:
    """Before, a 4,500-octet line started the server, and a client refused behind PROXY
    with workers never heard it (test_refusal_lines::test_the_longest_refusal_line_...);
    a line of bytes that are not UTF-8 raised when a client was refused."""
    assert_usage_error(netserver(*SERVE, *ECHO, "--refuse-access", text), *words)
