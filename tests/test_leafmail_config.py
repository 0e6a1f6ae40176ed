"""leafmail's configuration and command line: precedence, errors and exit codes.

`leafmail.config.load` is tested directly with an explicit environment mapping; the
command is run as a real process for what only a process shows: one stderr line and
a sysexits code on errors (never a traceback), and flags beating LEAFMAIL_* variables
beating the file, observed from the outside (greeting, EHLO SIZE, where mail lands).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from leafmail_fixtures import (
    HOSTNAME,
    LeafmailFactory,
    RawSMTP,
    clean_env,
    leafmail_command,
    leafmail_servers,
    smtp_client,
    smtplib_send,
    toml_string,
    write_config,
)

from leafmail import config as configuration
from leafmail.auth import load_users
from netserver.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

MESSAGE = b"Subject: config\r\n\r\nbody\r\n"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def run_leafmail(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        leafmail_command(*args),
        input=stdin,
        env=clean_env(tmp_path, env),
        capture_output=True,
        timeout=15,
        check=False,
    )


def serve_with(tmp_path: Path, toml: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    """`leafmail serve` with this config; it must fail, so it never runs long."""
    path = write_config(tmp_path, toml)
    return run_leafmail(
        tmp_path,
        "serve",
        "--config",
        str(path),
        "--spool",
        str(tmp_path / "spool"),
        "--hostname",
        HOSTNAME,
        "--listen",
        "127.0.0.1:0",
        *extra,
    )


def one_line_error(done: subprocess.CompletedProcess[bytes], code: int) -> str:
    """Assert exit `code` with exactly one stderr line and no traceback; return it."""
    err = done.stderr.decode(errors="replace")
    assert done.returncode == code, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("leafmail"), err
    assert done.stdout == b""
    return lines[0]


def ehlo_size(address: tuple[str, int]) -> int:
    with RawSMTP(address) as client:
        client.greeting()
        for line in client.ehlo().lines:
            if line.startswith("SIZE "):
                return int(line.split()[1])
    raise AssertionError("no SIZE in EHLO")


def greeting(address: tuple[str, int]) -> str:
    with RawSMTP(address) as client:
        return client.greeting().text


# --- config.load with an explicit environment --------------------------------------------


def base_env(tmp_path: Path) -> dict[str, str]:
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
    }


def test_load_defaults(tmp_path: Path) -> None:
    config = configuration.load(None, base_env(tmp_path))
    assert config.source == "defaults"
    assert config.spool == str(tmp_path / "xdg-data" / "leafmail" / "spool")
    assert config.smtp.listen == ("127.0.0.1:2525",)
    assert config.smtp.max_recipients >= 100  # RFC 5321 4.5.3.1.8
    assert config.smtp.submission_listen == () and config.smtp.smtps_listen == ()
    assert config.smtp.tls_cert == "" and config.auth.users_file == ""
    assert not config.smtp.allow_plaintext_auth
    assert config.local_domains == (config.hostname.lower().rstrip("."),)
    policy = config.relay_policy()
    for ip in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1"):
        assert policy.decide(ip_address(ip)).allowed, ip
    for ip in ("10.0.0.1", "192.0.2.1", "::2", "2001:db8::1", "0.0.0.0"):
        assert not policy.decide(ip_address(ip)).allowed, ip


def test_load_reads_the_default_file_under_xdg_config_home(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    path = tmp_path / "xdg-config" / "leafmail" / "leafmail.toml"
    path.parent.mkdir(parents=True)
    path.write_text('hostname = "from.default.file"\n', encoding="utf-8")
    config = configuration.load(None, env)
    assert config.hostname == "from.default.file"
    assert config.source == str(path)


def test_load_leafmail_config_variable_then_explicit_path(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    default = tmp_path / "xdg-config" / "leafmail" / "leafmail.toml"
    default.parent.mkdir(parents=True)
    default.write_text('hostname = "default.test"\n', encoding="utf-8")
    by_env = write_config(tmp_path, 'hostname = "env.test"\n')
    by_flag = write_config(tmp_path, 'hostname = "flag.test"\n')
    env["LEAFMAIL_CONFIG"] = str(by_env)
    assert configuration.load(None, env).hostname == "env.test"
    assert configuration.load(str(by_flag), env).hostname == "flag.test"


def test_load_variables_beat_the_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        'hostname = "file.test"\nspool = "/from/file"\n[smtp]\nlisten = ["127.0.0.1:25"]\n',
    )
    env = base_env(tmp_path)
    config = configuration.load(str(path), env)
    assert (config.hostname, config.spool, config.smtp.listen) == (
        "file.test",
        "/from/file",
        ("127.0.0.1:25",),
    )
    env |= {
        "LEAFMAIL_HOSTNAME": "env.test",
        "LEAFMAIL_SPOOL": "/from/env",
        "LEAFMAIL_LISTEN": "127.0.0.1:2000, [::1]:2001,",
    }
    config = configuration.load(str(path), env)
    assert config.hostname == "env.test"
    assert config.spool == "/from/env"
    assert config.smtp.listen == ("127.0.0.1:2000", "[::1]:2001")
    assert config.local_domains == ("env.test",)


def test_load_ignores_os_environ_when_given_a_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEAFMAIL_SPOOL", "/from/os/environ")
    monkeypatch.setenv("LEAFMAIL_HOSTNAME", "os.environ.test")
    config = configuration.load(None, base_env(tmp_path))
    assert config.spool != "/from/os/environ"
    assert config.hostname != "os.environ.test"


def test_load_full_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        'hostname = "mx.example.org"\n'
        'spool = "/var/spool/leafmail"\n'
        "[smtp]\n"
        'listen = "127.0.0.1:25"\n'
        'submission_listen = ["127.0.0.1:587"]\n'
        'smtps_listen = ["127.0.0.1:465"]\n'
        'tls_cert = "/etc/cert.pem"\n'
        'tls_key = "/etc/key.pem"\n'
        "max_message_size = 1000000\n"
        "max_recipients = 50\n"
        "max_errors = 5\n"
        "allow_plaintext_auth = true\n"
        'bare_lf = "replace"\n'
        "[relay]\n"
        'local_domains = ["Example.ORG.", "mx.example.org"]\n'
        'relay_networks = ["192.0.2.0/24", "2001:db8::/32"]\n'
        "[auth]\n"
        'users_file = "/etc/leafmail/users"\n'
        'failure_delay = "2s"\nmax_failures = 3\nblock_time = "1h"\n'
        '[auth.senders]\nalice = ["alice@example.org", "@example.net"]\n',
    )
    config = configuration.load(str(path), base_env(tmp_path))
    smtp = config.smtp
    assert smtp.listen == ("127.0.0.1:25",)  # a single string is a list of one
    assert smtp.submission_listen == ("127.0.0.1:587",)
    assert smtp.smtps_listen == ("127.0.0.1:465",)
    assert (smtp.max_message_size, smtp.max_recipients, smtp.max_errors) == (1000000, 50, 5)
    assert smtp.allow_plaintext_auth and smtp.bare_lf == "replace"
    assert config.local_domains == ("example.org", "mx.example.org")
    assert config.auth.users_file == "/etc/leafmail/users"
    assert config.auth.senders == (("alice", ("alice@example.org", "@example.net")),)
    assert (config.auth.failure_delay, config.auth.max_failures) == (2.0, 3)
    assert config.auth.block_time == 3600.0
    policy = config.relay_policy()
    assert policy.decide(ip_address("192.0.2.77")).allowed
    assert policy.decide(ip_address("2001:db8::5")).allowed
    assert not policy.decide(ip_address("127.0.0.1")).allowed  # replaced, not added to


BAD_CONFIGS = {
    "toml syntax": ("[smtp\n", "line 1"),
    "unknown top key": ("bogus = 1\n", "'bogus'"),
    "unknown smtp key": ("[smtp]\nmax_mesage_size = 5\n", "smtp.max_mesage_size"),
    "unknown table": ("[delivery]\nx = 1\n", "delivery"),
    "wrong type int": ('[smtp]\nmax_recipients = "3"\n', "smtp.max_recipients"),
    "bool is not int": ("[smtp]\nmax_message_size = true\n", "smtp.max_message_size"),
    "wrong type list": ("[relay]\nrelay_networks = [1, 2]\n", "relay.relay_networks"),
    "wrong type bool": ('[smtp]\nallow_plaintext_auth = "yes"\n', "allow_plaintext_auth"),
    "table expected": ("smtp = 5\n", "smtp"),
    "tls_cert alone": ('[smtp]\ntls_cert = "/x.pem"\n', "tls_key"),
    "tls_key alone": ('[smtp]\ntls_key = "/x.pem"\n', "tls_cert"),
    "smtps without tls": ('[smtp]\nsmtps_listen = ["127.0.0.1:0"]\n', "smtps_listen"),
    "submission without users": (
        '[smtp]\nsubmission_listen = ["127.0.0.1:0"]\n',
        "users_file",
    ),
    "bad network": ('[relay]\nrelay_networks = ["300.1.2.3/8"]\n', "relay_networks"),
    "bad prefix": ('[relay]\nrelay_networks = ["127.0.0.1/33"]\n', "relay_networks"),
    "not a network": ('[relay]\nrelay_networks = ["the internet"]\n', "relay_networks"),
    "zero size": ("[smtp]\nmax_message_size = 0\n", "max_message_size"),
    "zero recipients": ("[smtp]\nmax_recipients = 0\n", "max_recipients"),
    "bad bare_lf": ('[smtp]\nbare_lf = "maybe"\n', "bare_lf"),
    "sender not an address": ('[auth.senders]\nbob = ["bob"]\n', "auth.senders.bob"),
    "senders not a list": ("[auth.senders]\nbob = 1\n", "auth.senders.bob"),
    "zero max_failures": ("[auth]\nmax_failures = 0\n", "auth.max_failures"),
    "zero header size": ("[smtp]\nmax_header_size = 0\n", "max_header_size"),
    "zero check workers": ("[checks]\nworkers = 0\n", "checks.workers"),
    "proxy_from name": ('[smtp]\nproxy_from = ["lb.example"]\n', "smtp.proxy_from"),
    "proxy_from bad net": ('[smtp]\nproxy_from = ["10.0.0.0/40"]\n', "smtp.proxy_from"),
    "bad shutdown_grace": ('[smtp]\nshutdown_grace = "soon"\n', "smtp.shutdown_grace"),
}


@pytest.mark.parametrize(("toml", "needle"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_load_rejects_bad_configs(tmp_path: Path, toml: str, needle: str) -> None:
    path = write_config(tmp_path, toml)
    with pytest.raises(ConfigError) as error:
        configuration.load(str(path), base_env(tmp_path))
    message = str(error.value)
    assert str(path) in message
    assert needle in message
    assert "\n" not in message


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such config file"):
        configuration.load(str(tmp_path / "absent.toml"), base_env(tmp_path))
    env = base_env(tmp_path) | {"LEAFMAIL_CONFIG": str(tmp_path / "absent.toml")}
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        configuration.load(None, env)


# --- `leafmail serve` errors: one line, sysexits ----------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "toml syntax",
        "unknown smtp key",
        "wrong type int",
        "tls_cert alone",
        "bad network",
        "submission without users",
    ],
)
def test_serve_bad_config_exits_78_with_one_line(tmp_path: Path, case: str) -> None:
    toml, needle = BAD_CONFIGS[case]
    line = one_line_error(serve_with(tmp_path, toml), 78)
    assert needle in line


def test_serve_unreadable_tls_files_and_users_file_exit_78(tmp_path: Path) -> None:
    missing = toml_string(tmp_path / "absent.pem")
    line = one_line_error(
        serve_with(tmp_path, f"[smtp]\ntls_cert = {missing}\ntls_key = {missing}\n"), 78
    )
    assert "TLS" in line
    users = tmp_path / "users"
    users.write_text("alice:plaintext-password\n", encoding="utf-8")
    line = one_line_error(serve_with(tmp_path, f"[auth]\nusers_file = {toml_string(users)}\n"), 78)
    assert f"{users}:1" in line  # names the file and line, never echoes the secret
    assert "plaintext-password" not in line
    line = one_line_error(
        serve_with(tmp_path, f"[auth]\nusers_file = {toml_string(tmp_path / 'nope')}\n"), 78
    )
    assert "nope" in line


def test_serve_missing_config_file_exits_78(tmp_path: Path) -> None:
    done = run_leafmail(
        tmp_path, "serve", "--config", str(tmp_path / "absent.toml"), "--listen", "127.0.0.1:0"
    )
    assert "absent.toml" in one_line_error(done, 78)
    done = run_leafmail(
        tmp_path,
        "serve",
        "--listen",
        "127.0.0.1:0",
        env={"LEAFMAIL_CONFIG": str(tmp_path / "absent-by-env.toml")},
    )
    assert "absent-by-env.toml" in one_line_error(done, 78)


def test_serve_empty_listen_exits_78(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[smtp]\nlisten = []\n")
    done = run_leafmail(tmp_path, "serve", "--config", str(path), "--spool", str(tmp_path / "s"))
    one_line_error(done, 78)


def test_serve_bad_listen_in_config_exits_78(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[smtp]\nlisten = ["nonsense"]\n')
    done = run_leafmail(tmp_path, "serve", "--config", str(path), "--spool", str(tmp_path / "s"))
    assert str(path) in one_line_error(done, 78)


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--bogus"],
        ["serve", "--listen"],
        ["serve", "--listen", "nonsense"],
        ["serve", "--listen", "127.0.0.1:99999"],
        ["serve", "--loop", "tokio"],
        ["serve", "--ready-fd", "987"],
        ["serve", "--ready-fd", "three"],
        [],
        ["frobnicate"],
        ["passwd"],
    ],
    ids=lambda args: " ".join(args) or "no command",
)
def test_bad_usage_exits_64(tmp_path: Path, args: list[str]) -> None:
    if args[:1] == ["serve"]:
        args = [*args, "--spool", str(tmp_path / "s"), "--hostname", HOSTNAME]
    one_line_error(run_leafmail(tmp_path, *args), 64)


@pytest.mark.parametrize("where", ["flag", "config"])
def test_bad_hostname_is_one_line(tmp_path: Path, where: str) -> None:
    spool = str(tmp_path / "s")
    if where == "flag":
        done = run_leafmail(
            tmp_path, "serve", "--hostname", "bad host", "--spool", spool, "--listen", "127.0.0.1:0"
        )
        one_line_error(done, 64)
    else:
        path = write_config(tmp_path, 'hostname = "bad host"\n')
        done = run_leafmail(
            tmp_path, "serve", "--config", str(path), "--spool", spool, "--listen", "127.0.0.1:0"
        )
        one_line_error(done, 78)


def test_negative_max_errors_is_a_config_error(tmp_path: Path) -> None:
    line = one_line_error(serve_with(tmp_path, "[smtp]\nmax_errors = -1\n"), 78)
    assert "max_errors" in line


def test_unusable_spool_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n", encoding="utf-8")
    done = run_leafmail(
        tmp_path,
        "serve",
        "--spool",
        str(blocker / "spool"),
        "--hostname",
        HOSTNAME,
        "--listen",
        "127.0.0.1:0",
    )
    err = done.stderr.decode(errors="replace")
    assert done.returncode in (73, 78), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(blocker) in err


def test_taken_port_exits_69(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_leafmail(
            tmp_path,
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--spool",
            str(tmp_path / "s"),
            "--hostname",
            HOSTNAME,
        )
    line = one_line_error(done, 69)
    assert str(port) in line


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["passwd", "--help"]])
def test_help_exits_0(tmp_path: Path, args: list[str]) -> None:
    done = run_leafmail(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"usage: leafmail")
    assert done.stderr == b""
    if args[0] == "serve":
        for flag in (b"--listen", b"--spool", b"--hostname", b"--config", b"--ready-fd"):
            assert flag in done.stdout


def test_show_help_names_the_id_and_the_exit_codes(tmp_path: Path) -> None:
    done = run_leafmail(tmp_path, "show", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.decode().split())
    assert "ID the queue id, as `leafmail queue` lists it" in text
    assert "65 for a malformed queue id, 67 when no such message" in text


def test_passwd_reads_stdin_and_prints_a_hash(tmp_path: Path) -> None:
    done = run_leafmail(tmp_path, "passwd", "dave", stdin=b"s3cret: with colon\n")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert out.startswith("dave:scrypt$") and out.count("\n") == 1
    assert "s3cret" not in out
    path = tmp_path / "users"
    path.write_text(out, encoding="utf-8")
    users = load_users(path)
    assert users.verify("dave", "s3cret: with colon")
    assert not users.verify("dave", "s3cret")
    assert not users.verify("eve", "s3cret: with colon")
    again = run_leafmail(tmp_path, "passwd", "dave", stdin=b"s3cret: with colon\n")
    assert again.stdout != done.stdout  # a fresh salt every time


@pytest.mark.parametrize(
    ("user", "stdin"),
    [
        ("dave", b"\n"),
        ("dave", b""),
        ("da:ve", b"pw\n"),
        ("da\tve", b"pw\n"),
        # each would print a line load_users refuses (""), skips ("#") or reads as another
        # name (" dave" is read as "dave")
        ("", b"pw\n"),
        ("#dave", b"pw\n"),
        (" dave", b"pw\n"),
        ("dave ", b"pw\n"),
    ],
)
def test_passwd_refuses_empty_passwords_and_bad_names(
    tmp_path: Path, user: str, stdin: bytes
) -> None:
    one_line_error(run_leafmail(tmp_path, "passwd", user, stdin=stdin), 64)


# --- precedence seen from outside the process ----------------------------------------------


def test_leafmail_spool_variable_is_used(servers: LeafmailFactory, tmp_path: Path) -> None:
    spool = tmp_path / "spool-from-env"
    server = servers.spawn(
        ["--hostname", HOSTNAME, "--listen", "127.0.0.1:0"],
        spool_path=spool,
        env={"LEAFMAIL_SPOOL": str(spool)},
    )
    with smtp_client(server) as client:
        qid = smtplib_send(client, "a@example.test", ["b@mx.test"], MESSAGE)
    assert server.queue_ids() == [qid]


def test_spool_flag_beats_variable_and_file(servers: LeafmailFactory, tmp_path: Path) -> None:
    by_flag, by_env, by_file = (tmp_path / n for n in ("flag-spool", "env-spool", "file-spool"))
    path = write_config(tmp_path, f"spool = {toml_string(by_file)}\n")
    argv = ["--config", str(path), "--spool", str(by_flag), "--hostname", HOSTNAME]
    server = servers.spawn(
        [*argv, "--listen", "127.0.0.1:0"],
        spool_path=by_flag,
        env={"LEAFMAIL_SPOOL": str(by_env)},
    )
    with smtp_client(server) as client:
        qid = smtplib_send(client, "a@example.test", ["b@mx.test"], MESSAGE)
    assert server.queue_ids() == [qid]
    assert not by_env.exists() and not by_file.exists()


def test_spool_variable_beats_file(servers: LeafmailFactory, tmp_path: Path) -> None:
    by_env, by_file = tmp_path / "env-spool", tmp_path / "file-spool"
    path = write_config(tmp_path, f"spool = {toml_string(by_file)}\n")
    server = servers.spawn(
        ["--config", str(path), "--hostname", HOSTNAME, "--listen", "127.0.0.1:0"],
        spool_path=by_env,
        env={"LEAFMAIL_SPOOL": str(by_env)},
    )
    with smtp_client(server) as client:
        qid = smtplib_send(client, "a@example.test", ["b@mx.test"], MESSAGE)
    assert server.queue_ids() == [qid]
    assert not by_file.exists()


def test_spool_from_the_file(servers: LeafmailFactory, tmp_path: Path) -> None:
    by_file = tmp_path / "file-spool"
    path = write_config(tmp_path, f"spool = {toml_string(by_file)}\n")
    server = servers.spawn(
        ["--config", str(path), "--hostname", HOSTNAME, "--listen", "127.0.0.1:0"],
        spool_path=by_file,
    )
    with smtp_client(server) as client:
        qid = smtplib_send(client, "a@example.test", ["b@mx.test"], MESSAGE)
    assert server.queue_ids() == [qid]


def test_config_flag_beats_leafmail_config(servers: LeafmailFactory, tmp_path: Path) -> None:
    by_env = write_config(tmp_path, "[smtp]\nmax_message_size = 11111\n")
    by_flag = write_config(tmp_path, "[smtp]\nmax_message_size = 22222\n")
    default = tmp_path / "xdg-config" / "leafmail" / "leafmail.toml"
    default.parent.mkdir(parents=True)
    default.write_text("[smtp]\nmax_message_size = 33333\n", encoding="utf-8")
    common = ["--spool", str(tmp_path / "s"), "--hostname", HOSTNAME, "--listen", "127.0.0.1:0"]
    env = {"LEAFMAIL_CONFIG": str(by_env)}
    server = servers.spawn(common, spool_path=tmp_path / "s")
    assert ehlo_size(server.address()) == 33333  # the default file
    server = servers.spawn(common, spool_path=tmp_path / "s", env=env)
    assert ehlo_size(server.address()) == 11111  # $LEAFMAIL_CONFIG over the default
    server = servers.spawn(["--config", str(by_flag), *common], spool_path=tmp_path / "s", env=env)
    assert ehlo_size(server.address()) == 22222  # --config over $LEAFMAIL_CONFIG


def test_hostname_and_listen_precedence(servers: LeafmailFactory, tmp_path: Path) -> None:
    path = write_config(tmp_path, 'hostname = "file.test"\n[smtp]\nlisten = ["127.0.0.4:0"]\n')
    spool = tmp_path / "s"
    base = ["--config", str(path), "--spool", str(spool)]
    server = servers.spawn(base, spool_path=spool)
    assert greeting(server.address("127.0.0.4")).startswith("file.test ")
    env = {"LEAFMAIL_HOSTNAME": "env.test", "LEAFMAIL_LISTEN": "127.0.0.3:0"}
    server = servers.spawn(base, spool_path=spool, env=env)
    assert [h for h, _ in server.addresses] == ["127.0.0.3"]
    assert greeting(server.address("127.0.0.3")).startswith("env.test ")
    server = servers.spawn(
        [*base, "--hostname", "flag.test", "--listen", "127.0.0.1:0"], spool_path=spool, env=env
    )
    assert [h for h, _ in server.addresses] == ["127.0.0.1"]
    assert greeting(server.address()).startswith("flag.test ")
