"""examples/leafmail.toml is complete: it loads, and its keys are the config schema's.

The schema is read from leafmail.config's dataclasses (each table a dataclass field of
`Config`), never from a list kept here, so a key added to the code without the example
(or left in the example after it went from the code) fails this test.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from conftest import ROOT

from leafmail import config as configuration

EXAMPLE = ROOT / "examples" / "leafmail.toml"
# Fields of the dataclasses that are not keys a file can set, and why.
NOT_KEYS = {
    "source": "where the config came from, set by the loader",
    "local.enabled": "the presence of the [local] table",
    "routes": "a table of DOMAIN = ROUTE, checked on its own below",
    "pickup.enabled": "unset means automatic (on as root), which no TOML value spells",
    "auth.senders": "a table of LOGIN = [ADDRESS or @DOMAIN, ...]",
}


def schema_keys(kind: type, prefix: str = "") -> set[str]:
    """Dotted names of every setting of a config dataclass, tables included by recursion."""
    keys: set[str] = set()
    hints = typing.get_type_hints(kind)
    for field in dataclasses.fields(kind):
        name = f"{prefix}{field.name}"
        if name in NOT_KEYS:
            continue
        value_type = hints[field.name]
        if isinstance(value_type, type) and dataclasses.is_dataclass(value_type):
            keys |= schema_keys(value_type, f"{name}.")
        else:
            keys.add(name)
    return keys


def file_keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in table.items():
        name = f"{prefix}{key}"
        if name in NOT_KEYS:
            continue
        keys |= file_keys(value, f"{name}.") if isinstance(value, dict) else {name}
    return keys


def test_the_example_loads_without_error() -> None:
    config = configuration.load(str(EXAMPLE), env={})
    assert config.source == str(EXAMPLE)
    assert config.local.enabled
    assert config.routes == ((".corp.example", "mx"),)


def test_the_example_has_every_key_of_the_schema_and_no_other() -> None:
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    schema = schema_keys(configuration.Config)
    found = file_keys(raw)
    assert sorted(schema - found) == [], "keys of leafmail/config.py missing from the example"
    assert sorted(found - schema) == [], "keys in the example that the config does not have"
    assert isinstance(raw["routes"], dict) and raw["routes"]  # the routes table is shown


def test_the_schema_walk_sees_nested_tables() -> None:
    """The walk itself: a known key of each table is found, so an empty walk cannot pass."""
    keys = schema_keys(configuration.Config)
    for key in ("hostname", "smtp.listen", "delivery.retry_max", "local.aliases", "mx.port"):
        assert key in keys


def test_every_key_line_has_a_comment_nearby() -> None:
    """Commented means: the line itself, or the lines just above it, say something."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if "=" not in line or line.lstrip().startswith("#") or number == 0:
            continue
        context = [line, *lines[max(0, number - 3) : number]]
        assert any("#" in text for text in context), f"line {number + 1} is bare: {line}"


def test_the_readme_points_to_the_example() -> None:
    assert "examples/leafmail.toml" in Path(ROOT / "README.md").read_text(encoding="utf-8")
