"""leafmail(8) and netserver(8): generated from the argparse definitions, kept up to date
and mentioning every subcommand (tests/test_packaging.py checks each is installed with its
distribution).

`make man MANDIR=DIR` runs argparse-manpage as the Makefile does for the committed pages.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from leafmail import cli as leafmail_cli
from netserver import cli as netserver_cli

PAGES = {"leafmail": leafmail_cli.build_parser, "netserver": netserver_cli.build_parser}
BUILD_TIMEOUT = 120.0


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """The names of the parser's subcommands, read from the parser itself."""
    names: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names.extend(action.choices)
    return names


def without_date(page: str) -> list[str]:
    """The page without its .TH line, which carries the date of generation."""
    return [line for line in page.splitlines() if not line.startswith(".TH ")]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("man")
    done = subprocess.run(
        ["make", "-s", "man", f"MANDIR={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("program", sorted(PAGES))
def test_the_committed_page_is_what_the_parser_generates(generated: Path, program: str) -> None:
    committed = (ROOT / "man" / f"{program}.8").read_text(encoding="utf-8")
    fresh = (generated / f"{program}.8").read_text(encoding="utf-8")
    assert without_date(committed) == without_date(fresh), f"run `make man`: {program}.8 is stale"
    assert committed.startswith(f'.TH {program.upper()} "8" ')


@pytest.mark.parametrize("program", sorted(PAGES))
def test_the_page_mentions_every_subcommand(program: str) -> None:
    page = (ROOT / "man" / f"{program}.8").read_text(encoding="utf-8")
    names = subcommands(PAGES[program]())
    assert len(names) >= 4  # the walk found them
    for name in names:
        roff = name.replace("-", "\\-")  # roff writes a hyphen as \-
        assert f"COMMAND \\fI\\,'{program} {roff}'" in page, f"{name} missing from {program}.8"


def test_leafmail_page_tells_the_other_names_and_exit_codes() -> None:
    page = (ROOT / "man" / "leafmail.8").read_text(encoding="utf-8")
    for text in ("mailq", "newaliases", ".SH ENVIRONMENT", "LEAFMAIL_CONFIG", ".SH EXIT STATUS"):
        assert text in page
