"""One strict TOML reader (netserver.strictconf) for leafmail.toml and `netserver run`.

The same duration and size strings must give the same values, and the same bad strings
the same reason, whichever file they are written in: each case below goes through the
shared kind, through leafmail's loader and through `netserver run`'s loader
(test_inetd_run.py runs the real `netserver run` with durations written with units).
The last tests are about leafmail's sections: a setting is one line, read by one
generic loader, and the SMTP engine's settings are mapped in one place.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from inetd_support import current_user, write_config

from leafmail.config import Config, _build, read_section, setting
from netserver.errors import ConfigError
from netserver.inetd.config import load_run_config
from netserver.smtp import BareNewline
from netserver.strictconf import Invalid, Table, Unfit, duration, size, string

ME = current_user()
ECHO = 'handler = "examples.echo:main"'

DURATIONS = [
    ("300", 300.0),
    ("0.5", 0.5),
    ('"90"', 90.0),
    ('"30s"', 30.0),
    ('"5m"', 300.0),
    ('" 5m "', 300.0),
    ('"1.5h"', 5400.0),
    ('"1h"', 3600.0),
    ('"2d"', 172800.0),
]
BAD_DURATIONS = ['"5 minutes"', '"m"', '"-5m"', '"1h30m"', "true", "[300]", '"5M"']
SIZES = [
    ("1000", 1000),
    ('"1000"', 1000),
    ('"64K"', 65536),
    ('"64k"', 65536),
    ('"25M"', 25 * 1024 * 1024),
    ('"1G"', 1024**3),
]
BAD_SIZES = ['"25 MB"', '"1.5M"', '"M"', "true", "2.5", '"-1K"']


def toml_value(text: str) -> object:
    return tomllib.loads(f"v = {text}")["v"]


def service_file(tmp_path: Path, body: str) -> Path:
    return write_config(
        tmp_path,
        f'[[service]]\nname = "svc"\nlisten = ["127.0.0.1:0"]\nuser = "{ME}"\n{ECHO}\n{body}\n',
    )


def leafmail(table: str) -> Config:
    return _build(tomllib.loads(f'hostname = "mx.test"\n{table}'), "test.toml")


@pytest.mark.parametrize(("text", "seconds"), DURATIONS, ids=[d[0] for d in DURATIONS])
def test_a_duration_means_the_same_in_leafmail_and_netserver_run(
    tmp_path: Path, text: str, seconds: float
) -> None:
    assert duration(toml_value(text)) == seconds
    config = leafmail(f"[delivery]\ndelay_warning = {text}\n[smtp]\nshutdown_grace = {text}\n")
    assert config.delivery.delay_warning == seconds
    assert config.smtp.shutdown_grace == seconds
    run = load_run_config(service_file(tmp_path, f"timeout = {text}\ncps = 5\ncps_wait = {text}"))
    limits = run.services[0].limits
    assert (limits.timeout, limits.service_pause) == (seconds, seconds)


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_a_bad_duration_has_the_same_reason_in_both(tmp_path: Path, text: str) -> None:
    with pytest.raises(Unfit) as shared:
        duration(toml_value(text))
    reason = str(shared.value)
    with pytest.raises(ConfigError) as mail:
        leafmail(f"[delivery]\nretry_initial = {text}\n")
    assert str(mail.value) == f"test.toml: delivery.retry_initial {reason}"
    path = service_file(tmp_path, f"timeout = {text}")
    with pytest.raises(ConfigError) as run:
        load_run_config(path)
    assert str(run.value) == f"{path}:6: service 'svc': timeout: {reason}"


@pytest.mark.parametrize(("text", "count"), SIZES, ids=[s[0] for s in SIZES])
def test_a_size_is_read_by_the_shared_kind(text: str, count: int) -> None:
    assert size(toml_value(text)) == count
    config = leafmail(f"[smtp]\nmax_message_size = {text}\nmax_header_size = {text}\n")
    assert config.smtp.max_message_size == count
    assert config.smtp.max_header_size == count


@pytest.mark.parametrize("text", BAD_SIZES)
def test_a_bad_size_names_the_key(text: str) -> None:
    with pytest.raises(Unfit) as shared:
        size(toml_value(text))
    with pytest.raises(ConfigError) as mail:
        leafmail(f"[smtp]\nmax_message_size = {text}\n")
    assert str(mail.value) == f"test.toml: smtp.max_message_size {shared.value}"


def test_an_unknown_key_gets_the_same_hint_in_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as mail:
        leafmail("[smtp]\nmax_mesage_size = 5\n")
    assert str(mail.value) == (
        "test.toml: unknown key 'smtp.max_mesage_size' (did you mean 'max_message_size'?)"
    )
    path = service_file(tmp_path, "per_sourse = 5")
    with pytest.raises(ConfigError) as run:
        load_run_config(path)
    assert str(run.value) == (
        f"{path}:6: service 'svc': per_sourse: unknown key (did you mean 'per_source'?)"
    )


def test_a_table_refuses_what_nobody_read() -> None:
    table = Table({"a": 1, "b": "x", "inner": {"c": True}}, "top")
    assert table.get("a", duration, 0.0) == 1.0
    assert table.get("absent", duration, 7.0) == 7.0
    inner = table.table("inner")
    with pytest.raises(Invalid, match=r"^unknown key 'top\.inner\.c'$"):
        inner.finish()
    with pytest.raises(Invalid, match=r"^unknown key 'top\.b'"):
        table.finish()
    with pytest.raises(Invalid, match=r"^top\.inner must be a table$"):
        Table({"inner": 5}, "top").table("inner")


# -- leafmail's sections: a setting is one line, read by one generic loader -------------


@dataclass(frozen=True)
class _Section:
    """A section as a new one would be written: one line per setting, nothing else."""

    name: str = setting(string, "x")
    wait: float = setting(duration, 30.0)
    limit: int = setting(size, 1024)
    computed: str = "not a key"


def test_a_setting_is_read_by_the_generic_loader_from_its_one_line() -> None:
    assert read_section(_Section, Table({}, "new")) == _Section()
    read = read_section(_Section, Table({"name": "y", "wait": "5m", "limit": "2K"}, "new"))
    assert (read.name, read.wait, read.limit) == ("y", 300.0, 2048)
    assert read_section(_Section, Table({}, "new"), computed="given").computed == "given"
    with pytest.raises(Invalid, match=r"^new\.wait must be a duration"):
        read_section(_Section, Table({"wait": "soon"}, "new"))
    with pytest.raises(Invalid, match=r"^unknown key 'new\.computed'"):
        read_section(_Section, Table({"computed": "no"}, "new"))  # not a setting: not a key
    with pytest.raises(Invalid, match=r"^unknown key 'new\.nmae' \(did you mean 'name'\?\)"):
        read_section(_Section, Table({"nmae": "typo"}, "new"))


def test_every_field_of_a_section_is_a_setting_but_the_two_tables_of_their_own() -> None:
    """Only [local]'s presence and [auth.senders] are filled otherwise (see config.py)."""
    hints = typing.get_type_hints(Config)
    others = set()
    for section in fields(Config):
        kind = hints[section.name]
        if not dataclasses.is_dataclass(kind):
            continue
        for item in fields(kind):
            if not item.metadata:
                others.add(f"{section.name}.{item.name}")
    assert others == {"local.enabled", "auth.senders"}


@pytest.mark.parametrize(("bare_lf", "policy"), [("reject", "REJECT"), ("replace", "REPLACE")])
def test_the_engine_config_is_mapped_in_one_place(bare_lf: str, policy: str) -> None:
    """smtpd workers and sendmail -bs both take ServerConfig from SmtpConfig.server_config."""
    smtp = leafmail(
        f'[smtp]\nbare_lf = "{bare_lf}"\nmax_message_size = "1M"\nmax_recipients = 7\n'
        "max_errors = 3\nmax_junk_commands = 4\nallow_plaintext_auth = true\n"
    ).smtp
    engine = smtp.server_config("mx.test", tls_available=True, auth_enabled=True)
    assert engine.bare_newline is BareNewline[policy]
    assert (engine.hostname, engine.max_message_size, engine.max_recipients) == (
        "mx.test",
        1024 * 1024,
        7,
    )
    assert (engine.max_errors, engine.max_junk_commands) == (3, 4)
    assert engine.tls_available and engine.auth_enabled and engine.auth_plaintext_allowed
    plain = smtp.server_config("mx.test")  # sendmail -bs: no TLS, no AUTH
    assert not plain.tls_available and not plain.auth_enabled
