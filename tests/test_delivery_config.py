"""The [delivery] table of leafmail's config: parsing, defaults, checks and secrets.

Configs are real TOML, parsed with `tomllib` and built with `leafmail.config._build`, or
written to a file and read with `load(path, env)` with an explicit environment, so the
machine's LEAFMAIL_* variables never leak in. Every error must be a ConfigError that
names the key at fault (the CLI turns it into exit 78).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from leafmail.config import (
    Config,
    DeliveryConfig,
    _build,
    delivery_problem,
    load,
    smarthost_password,
    split_hostport,
)
from leafmail.delivery.smarthost import SmarthostSettings
from leafmail.retry import RetryPolicy
from netserver.errors import ConfigError
from netserver.strictconf import parse_duration

WHERE = "test.toml"
SECRET = "s3cret-from-the-environment"  # noqa: S105 (a test value)


def build(delivery: str, top: str = 'hostname = "mx.test"\n') -> Config:
    """A Config from a [delivery] table body (TOML text)."""
    return _build(tomllib.loads(f"{top}[delivery]\n{delivery}"), WHERE)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "leafmail.toml"
    path.write_text('hostname = "mx.test"\n' + text, encoding="utf-8")
    return path


def no_env(tmp_path: Path) -> dict[str, str]:
    """An environment with nothing of ours in it (and the XDG dirs in tmp_path)."""
    return {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_DATA_HOME": str(tmp_path / "data")}


# --- defaults ------------------------------------------------------------------------


def test_defaults_without_a_delivery_table() -> None:
    config = _build(tomllib.loads('hostname = "mx.test"\n'), WHERE)
    d = config.delivery
    assert d == DeliveryConfig()
    assert (d.mode, d.smarthost, d.tls, d.ca_file, d.username, d.password_file) == (
        "",
        "",
        "starttls",
        "",
        "",
        "",
    )
    assert d.concurrency == 4
    assert (d.retry_initial, d.retry_max, d.max_queue_lifetime) == (300.0, 14400.0, 432000.0)
    assert d.delay_warning == 0.0
    assert (d.connect_timeout, d.command_timeout, d.deadline) == (30.0, 300.0, 900.0)
    assert d.effective_mode == "offline"
    assert delivery_problem(d) is None


def test_empty_delivery_table_is_the_defaults() -> None:
    assert build("").delivery == DeliveryConfig()


def test_no_config_file_at_all_gives_the_defaults(tmp_path: Path) -> None:
    config = load(None, no_env(tmp_path))
    assert config.delivery == DeliveryConfig()


@pytest.mark.parametrize(
    ("table", "mode"),
    [
        ("", "offline"),
        ('smarthost = "smtp.example.test"', "smarthost"),
        ('mode = "offline"\nsmarthost = "smtp.example.test"', "offline"),
        ('mode = "smarthost"\nsmarthost = "smtp.example.test"', "smarthost"),
        ('mode = ""\nsmarthost = "smtp.example.test"', "smarthost"),
    ],
)
def test_effective_mode(table: str, mode: str) -> None:
    assert build(table).delivery.effective_mode == mode


def test_every_key_is_read() -> None:
    d = build(
        'mode = "smarthost"\n'
        'smarthost = "smtp.example.test:2525"\n'
        'tls = "smtps"\n'
        'ca_file = "/etc/ssl/ca.pem"\n'
        'username = "alice"\n'
        'password_file = "/run/secrets/pw"\n'
        "concurrency = 8\n"
        'retry_initial = "1m"\n'
        'retry_max = "2h"\n'
        'max_queue_lifetime = "3d"\n'
        'delay_warning = "4h"\n'
        'connect_timeout = "10s"\n'
        "command_timeout = 120\n"
        "deadline = 600.5\n"
    ).delivery
    assert d == DeliveryConfig(
        mode="smarthost",
        smarthost="smtp.example.test:2525",
        tls="smtps",
        ca_file="/etc/ssl/ca.pem",
        username="alice",
        password_file="/run/secrets/pw",  # noqa: S106 (a path, not a password)
        concurrency=8,
        retry_initial=60.0,
        retry_max=7200.0,
        max_queue_lifetime=259200.0,
        delay_warning=14400.0,
        connect_timeout=10.0,
        command_timeout=120.0,
        deadline=600.5,
    )
    policy = RetryPolicy.from_config(d)
    assert (policy.initial, policy.maximum, policy.lifetime, policy.delay_warning) == (
        60.0,
        7200.0,
        259200.0,
        14400.0,
    )


# --- durations -----------------------------------------------------------------------

DURATION_KEYS = [
    "retry_initial",
    "retry_max",
    "max_queue_lifetime",
    "delay_warning",
    "connect_timeout",
    "command_timeout",
    "deadline",
]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ('"30s"', 30.0),
        ('"5m"', 300.0),
        ('"4h"', 14400.0),
        ('"5d"', 432000.0),
        ('"90"', 90.0),
        ('"1.5h"', 5400.0),
        ('" 2m "', 120.0),
        ("45", 45.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ('"0s"', 0.0),
    ],
)
def test_duration_values(value: str, seconds: float) -> None:
    assert build(f"max_queue_lifetime = {value}").delivery.max_queue_lifetime == seconds


@pytest.mark.parametrize("key", DURATION_KEYS)
def test_every_duration_key_takes_units(key: str) -> None:
    # retry_initial must stay <= retry_max, so pick values that keep every check happy.
    value = '"1h"' if key != "retry_max" else '"5h"'
    assert getattr(build(f"{key} = {value}").delivery, key) == (
        3600.0 if key != "retry_max" else 18000.0
    )


@pytest.mark.parametrize(
    "value",
    [
        '"5w"',
        '"abc"',
        '""',
        '"5 minutes"',
        '"m"',
        '"1e3"',
        '"5M"',
        '"-5m"',
        '"1h30m"',
        "true",
        "[300]",
        "{ s = 1 }",
    ],
)
@pytest.mark.parametrize("key", ["retry_initial", "deadline", "delay_warning"])
def test_bad_durations_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"{WHERE}: delivery\.{key} must be a duration"):
        build(f"{key} = {value}")


@pytest.mark.parametrize("value", ["-1", "-0.5", "-300"])
@pytest.mark.parametrize("key", DURATION_KEYS)
def test_negative_durations_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"delivery\.{key} must not be negative"):
        build(f"{key} = {value}")


@pytest.mark.parametrize("key", DURATION_KEYS)
def test_nan_duration_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"delivery\.{key}"):
        build(f"{key} = nan")


def test_parse_duration_directly() -> None:
    assert parse_duration("5m", "x") == 300.0
    assert parse_duration(7, "x") == 7.0
    assert math.isclose(parse_duration("0.1s", "x"), 0.1)
    with pytest.raises(ConfigError, match=r"^somewhere: the\.key must be a duration"):
        parse_duration(False, "somewhere: the.key")
    with pytest.raises(ConfigError, match=r"^k must not be negative$"):
        parse_duration(-2, "k")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("retry_initial = 0", "retry_initial must be > 0"),
        ('retry_initial = "5h"', "retry_initial must be > 0 and <= retry_max"),
        ('retry_initial = "10m"\nretry_max = "5m"', "<= retry_max"),
        ("connect_timeout = 0", "timeouts must be > 0"),
        ("command_timeout = 0", "timeouts must be > 0"),
        ('deadline = "0s"', "timeouts must be > 0"),
        ("concurrency = 0", "delivery.concurrency must be > 0"),
        ("concurrency = -3", "delivery.concurrency must be > 0"),
    ],
)
def test_cross_checks(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(table)


# --- types and unknown keys ----------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("smarthost_port = 25", r"unknown key 'delivery\.smarthost_port'"),
        ('password = "hunter2"', r"unknown key 'delivery\.password'"),
        ('Smarthost = "x"', r"unknown key 'delivery\.Smarthost'"),
        ("[delivery.extra]\nx = 1", r"unknown key 'delivery\.extra'"),
        ('concurrency = "4"', r"delivery\.concurrency must be an integer"),
        ("concurrency = 4.0", r"delivery\.concurrency must be an integer"),
        ("concurrency = true", r"delivery\.concurrency must be an integer"),
        ("smarthost = 25", r"delivery\.smarthost must be a string"),
        ('tls = "ssl"', r"delivery\.tls must be one of starttls, smtps, opportunistic, none"),
        ('tls = "STARTTLS"', r"delivery\.tls must be one of"),
        ('mode = "local"', r"delivery\.mode must be one of"),
        ("username = []", r"delivery\.username must be a string"),
    ],
)
def test_bad_keys_and_types(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(table)


def test_delivery_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="delivery must be a table"):
        _build(tomllib.loads('hostname = "mx.test"\ndelivery = "smarthost"\n'), WHERE)


def test_unknown_key_from_a_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\nsmarthostt = "x"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'delivery\.smarthostt'"):
        load(str(path), no_env(tmp_path))


# --- smarthost, TLS and username rules -----------------------------------------------


def test_mode_smarthost_needs_a_smarthost() -> None:
    with pytest.raises(ConfigError, match=r"delivery\.mode = smarthost needs delivery\.smarthost"):
        build('mode = "smarthost"')


@pytest.mark.parametrize("tls", ["none", "opportunistic"])
def test_username_needs_real_tls(tls: str) -> None:
    with pytest.raises(ConfigError, match=rf"delivery\.username with tls = {tls}"):
        build(f'smarthost = "smtp.example.test"\nusername = "alice"\ntls = "{tls}"')


@pytest.mark.parametrize("tls", ["starttls", "smtps"])
def test_username_with_verified_tls_is_fine(tls: str) -> None:
    d = build(f'smarthost = "smtp.example.test"\nusername = "alice"\ntls = "{tls}"').delivery
    assert (d.username, d.tls) == ("alice", tls)


@pytest.mark.parametrize(
    "smarthost",
    ["smtp.example.test:0", "smtp.example.test:65536", "a:b:c", "::1:25", "[::1", "host:", "h h"],
)
def test_bad_smarthost_names_the_key(smarthost: str) -> None:
    with pytest.raises(ConfigError, match=r"delivery\.smarthost: "):
        build(f'smarthost = "{smarthost}"')


@pytest.mark.parametrize(
    ("text", "tls", "expected"),
    [
        ("[::1]:25", "starttls", ("::1", 25)),
        ("[::1]", "smtps", ("::1", 465)),
        ("[2001:db8::5]:2525", "none", ("2001:db8::5", 2525)),
        ("[192.0.2.1]:26", "none", ("192.0.2.1", 26)),
        ("127.0.0.1:2525", "starttls", ("127.0.0.1", 2525)),
        ("smtp.example.test", "starttls", ("smtp.example.test", 587)),
        ("smtp.example.test", "smtps", ("smtp.example.test", 465)),
        ("smtp.example.test", "opportunistic", ("smtp.example.test", 25)),
        ("smtp.example.test", "none", ("smtp.example.test", 25)),
        ("smtp.example.test:1", "none", ("smtp.example.test", 1)),
        ("smtp.example.test:65535", "smtps", ("smtp.example.test", 65535)),
        ("smtp.example.test:00025", "smtps", ("smtp.example.test", 25)),
    ],
)
def test_split_hostport(text: str, tls: str, expected: tuple[str, int]) -> None:
    assert split_hostport(text, tls) == expected


def test_split_hostport_default_tls_is_starttls() -> None:
    assert split_hostport("smtp.example.test") == ("smtp.example.test", 587)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host:",
        "host:port",
        "host:0",
        "host:65536",
        "host:99999999999999999999",
        "host:-1",
        "::1",
        "::1:25",
        "[::1",
        "[::1]:",
        "[::1]x",
        "[fe80::1%eth0]:25",
        "[mail.example.test]:25",
        "a host:25",
        " host:25",
        "host:25 ",
        "a:b:c",
    ],
)
def test_split_hostport_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not HOST:PORT|out of range"):
        split_hostport(text, "starttls")


# --- the environment -----------------------------------------------------------------


def test_leafmail_smarthost_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\nsmarthost = "file.example.test:25"\ntls = "none"\n')
    env = {**no_env(tmp_path), "LEAFMAIL_SMARTHOST": "127.0.0.1:2525"}
    config = load(str(path), env)
    assert config.delivery.smarthost == "127.0.0.1:2525"
    assert config.delivery.tls == "none", "only the smarthost comes from the variable"
    assert load(str(path), no_env(tmp_path)).delivery.smarthost == "file.example.test:25"


def test_leafmail_smarthost_without_a_file(tmp_path: Path) -> None:
    config = load(None, {**no_env(tmp_path), "LEAFMAIL_SMARTHOST": "smtp.example.test"})
    assert config.delivery.smarthost == "smtp.example.test"
    assert config.delivery.effective_mode == "smarthost"
    settings = SmarthostSettings.from_config(config.delivery, config.hostname, env={})
    assert (settings.host, settings.port, settings.tls) == ("smtp.example.test", 587, "starttls")


def test_empty_leafmail_smarthost_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\nsmarthost = "file.example.test"\n')
    config = load(str(path), {**no_env(tmp_path), "LEAFMAIL_SMARTHOST": ""})
    assert config.delivery.smarthost == "file.example.test"


def test_bad_leafmail_smarthost_is_refused_before_delivery(tmp_path: Path) -> None:
    """A bad LEAFMAIL_SMARTHOST is a configuration error when the config loads."""
    with pytest.raises(ConfigError, match=r"delivery\.smarthost: port 99999 out of range"):
        load(None, {**no_env(tmp_path), "LEAFMAIL_SMARTHOST": "host:99999"})


def test_mode_smarthost_with_the_host_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\nmode = "smarthost"\ntls = "none"\n')
    env = {**no_env(tmp_path), "LEAFMAIL_SMARTHOST": "127.0.0.1:2525"}
    config = load(str(path), env)
    assert config.delivery.effective_mode == "smarthost"
    assert config.delivery.smarthost == "127.0.0.1:2525"


# --- the password --------------------------------------------------------------------


def test_password_from_the_environment_beats_the_file(tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-the-file\n", encoding="utf-8")
    d = DeliveryConfig(smarthost="s.example.test", username="alice", password_file=str(pw_file))
    assert smarthost_password(d, {"LEAFMAIL_SMARTHOST_PASSWORD": SECRET}) == SECRET
    assert smarthost_password(d, {}) == "from-the-file"
    assert smarthost_password(d, {"LEAFMAIL_SMARTHOST_PASSWORD": ""}) == "from-the-file"


@pytest.mark.parametrize(
    ("content", "password"),
    [
        (b"pw\n", "pw"),
        (b"pw\r\n", "pw"),
        (b"pw", "pw"),
        (b"first line\nsecond line\n", "first line"),
        (b" spaces kept \n", " spaces kept "),
        ("p\u00e4ss\u00f6rd\n".encode(), "p\u00e4ss\u00f6rd"),
        (b"", ""),
    ],
)
def test_password_file_first_line(tmp_path: Path, content: bytes, password: str) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_bytes(content)
    d = DeliveryConfig(username="alice", password_file=str(pw_file))
    assert smarthost_password(d, {}) == password


def test_no_password_anywhere_is_empty() -> None:
    assert smarthost_password(DeliveryConfig(username="alice"), {}) == ""


@pytest.mark.parametrize("what", ["missing", "directory", "not-utf8"])
def test_unreadable_password_file_is_a_config_error(tmp_path: Path, what: str) -> None:
    path = tmp_path / "pw"
    if what == "directory":
        path.mkdir()
    elif what == "not-utf8":
        path.write_bytes(b"\xff\xfe\xfa\n")
    d = DeliveryConfig(username="alice", password_file=str(path))
    with pytest.raises(ConfigError, match=r"^delivery\.password_file: cannot read"):
        smarthost_password(d, {})


def test_settings_from_config_read_the_password_only_with_a_username(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[delivery]\nsmarthost = "[::1]:2525"\ntls = "smtps"\nusername = "alice"\n'
        'ca_file = "/etc/ca.pem"\nconnect_timeout = "7s"\ncommand_timeout = "1m"\n'
        'deadline = "2m"\n',
    )
    env = {**no_env(tmp_path), "LEAFMAIL_SMARTHOST_PASSWORD": SECRET}
    config = load(str(path), env)
    assert SECRET not in repr(config), "the password is never part of the config"
    settings = SmarthostSettings.from_config(config.delivery, config.hostname, env)
    assert (settings.host, settings.port, settings.helo) == ("::1", 2525, "mx.test")
    assert settings.remote == "[::1]:2525"
    assert (settings.tls, settings.ca_file, settings.username) == ("smtps", "/etc/ca.pem", "alice")
    assert settings.password == SECRET
    assert (settings.connect_timeout, settings.command_timeout, settings.deadline) == (
        7.0,
        60.0,
        120.0,
    )
    assert SECRET not in repr(settings)

    anonymous = load(str(write(tmp_path, '[delivery]\nsmarthost = "s.example.test"\n')), env)
    assert SmarthostSettings.from_config(anonymous.delivery, anonymous.hostname, env).password == ""


def test_settings_from_config_with_an_unreadable_password_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[delivery]\nsmarthost = "s.example.test"\nusername = "alice"\n'
        f'password_file = "{tmp_path / "nope"}"\n',
    )
    config = load(str(path), no_env(tmp_path))
    with pytest.raises(ConfigError, match=r"delivery\.password_file"):
        SmarthostSettings.from_config(config.delivery, config.hostname, {})


def test_settings_from_config_without_a_smarthost() -> None:
    with pytest.raises(ValueError, match="no smarthost configured"):
        SmarthostSettings.from_config(build("").delivery, "mx.test", env={})


def test_settings_from_config_rechecks_what_bypassed_the_file() -> None:
    """A config changed after loading (as the CLI flags do) is checked again."""
    config = Config(
        hostname="mx.test",
        delivery=DeliveryConfig(smarthost="s.example.test", tls="none", username="alice"),
    )
    with pytest.raises(ValueError, match="unprotected"):
        SmarthostSettings.from_config(config.delivery, config.hostname, env={})
