"""Queue states and route names live in `leafmail.states` alone (one name, one meaning),
and their values are the names already on disk and in config files.

The scan reads leafmail's code (its AST, not its text), so docstrings and comments may
say "deferred" or "smarthost" freely; what it refuses is a string constant equal to a
state, route or delivery mode anywhere in the code but the enum module. The few
literals that spell the same word with another meaning are listed below with the
reason, each with the most times it may occur in its module.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import typing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from leafmail import tools
from leafmail.config import Config, DeliveryConfig, _build
from leafmail.envelope import Envelope, Recipient
from leafmail.listing import iter_queue
from leafmail.spool import (
    STATUS,
    TMP,
    GroupCommitter,
    Junk,
    MessageSummary,
    Spool,
    SpooledMessage,
)
from leafmail.states import DeliveryMode, QueueState, Route
from netserver.errors import ConfigError

SRC = Path(__file__).resolve().parent.parent / "src" / "leafmail"
ENUM_MODULE = SRC / "states.py"
NAMES = frozenset({*QueueState, *Route, *DeliveryMode})

# (module relative to src/leafmail, literal) -> (most occurrences, why it is not a state).
ALLOWED: dict[tuple[str, str], tuple[int, str]] = {
    ("cli.py", "queue"): (3, "the `leafmail queue` subcommand's name"),
    ("cli.py", "hold"): (2, "the `leafmail hold` subcommand's name"),
    ("bulk.py", "hold"): (1, "the hold action's name (the subcommand's)"),
    ("config.py", "local"): (2, "the [local] table's name in the TOML file"),
    ("daemon.py", "local"): (1, "the local delivery process's name, as smtpd and qmgr"),
    ("delivery/mta_sts.py", "mx"): (1, 'the "mx" key of an MTA-STS policy (RFC 8461 3.2)'),
    ("envelope.py", "local"): (1, "the Received protocol word of mail made on this host"),
    ("flush.py", "deferred"): (1, "a field of the control socket's flush reply"),
    ("qmgr.py", "deferred"): (1, "a field of the control socket's flush reply"),
    ("sendmail/__init__.py", "queue"): (1, "sendmail's list-the-queue mode (-bp)"),
    ("sendmail/options.py", "queue"): (1, "sendmail's list-the-queue mode (-bp)"),
    ("__init__.py", "smarthost"): (1, "the public smarthost() in the lazy exports table"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def _exempt(tree: ast.AST) -> set[int]:
    """Constants that are not uses: docstrings, f-string pieces, `__all__` entries, and
    the member values of an enum class (each enum is its own name for its meaning)."""
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(sub) for sub in ast.walk(node))
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            skip.update(id(sub) for sub in ast.walk(node.value))
        elif isinstance(node, ast.ClassDef) and any(
            isinstance(base, ast.Name) and base.id.endswith("Enum") for base in node.bases
        ):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign):
                    skip.update(id(sub) for sub in ast.walk(stmt.value))
    return skip


def bare_names(source: str, filename: str) -> Counter[str]:
    """How often each state, route or mode name occurs as a string constant in code."""
    tree = ast.parse(source, filename)
    skip = _exempt(tree)
    return Counter(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value in NAMES
        and id(node) not in skip
    )


def scan(root: Path = SRC) -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for path in sorted(root.rglob("*.py")):
        if path == ENUM_MODULE:
            continue
        rel = path.relative_to(root).as_posix()
        for name, count in bare_names(path.read_text(encoding="utf-8"), rel).items():
            found[rel, name] = count
    return found


def test_no_bare_state_or_route_name_in_leafmail() -> None:
    found = scan()
    over = {
        key: count for key, count in found.items() if key not in ALLOWED or count > ALLOWED[key][0]
    }
    assert over == {}, "use leafmail.states (QueueState, Route, DeliveryMode), not a string"


def test_every_allowance_is_still_needed() -> None:
    """A literal that went away takes its allowance with it (no stale exceptions)."""
    assert set(ALLOWED) <= set(scan())


@pytest.mark.parametrize(
    "code",
    [
        'spool.ids("deferred")',
        'if route == "mx": pass',
        'STATES = ("queue", "hold")',
        'config.mode = "offline"',
        'def f(state: str = "corrupt") -> None: ...',
    ],
)
def test_the_scan_sees_a_bare_name(code: str) -> None:
    assert sum(bare_names(code, "<test>").values()) >= 1


@pytest.mark.parametrize(
    "code",
    [
        '"""Mail waits in deferred/ until the smarthost answers."""',
        'log(f"{qid} deferred")',
        '__all__ = ["smarthost"]',
        'class Verdict(StrEnum):\n    DEFERRED = "deferred"',
        "spool.ids(QueueState.DEFERRED)",
    ],
)
def test_the_scan_lets_other_uses_pass(code: str) -> None:
    assert bare_names(code, "<test>") == Counter()


def test_a_bare_name_put_back_fails_the_rule(tmp_path: Path) -> None:
    """The rule over a copy of a module with one state turned back into a string."""
    source = (SRC / "queue.py").read_text(encoding="utf-8")
    assert "QueueState.DEFERRED" in source
    (tmp_path / "queue.py").write_text(source.replace("QueueState.DEFERRED", '"deferred"', 1))
    assert scan(tmp_path) == {("queue.py", "deferred"): 1}


# --- the values are the names on disk, in config files and in the listing -----------------


def test_queue_states_are_the_spool_directories(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert [state.value for state in QueueState] == ["queue", "deferred", "hold", "corrupt"]
    assert sorted(os.listdir(spool.root)) == sorted(["tmp", "status", *QueueState])
    assert (TMP, STATUS) == ("tmp", "status")


def test_a_message_moves_through_the_directories_the_states_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    qid = spool.commit(Envelope("a@example.org", (Recipient("b@example.net"),)), b"x\r\n")
    assert (spool.root / "queue" / qid).is_file()
    assert spool.find(qid) is QueueState.QUEUE
    assert tools.hold(spool, qid)
    assert (spool.root / "hold" / qid).is_file()
    assert spool.find(qid) is QueueState.HOLD
    # The type asks for a QueueState; a bare string still works at run time (StrEnum).
    assert spool.ids("hold") == spool.ids(QueueState.HOLD) == [qid]  # type: ignore[arg-type]
    (entry,) = iter_queue(spool)
    assert json.loads(entry.json())["state"] == "held" == QueueState.HOLD.shown
    assert entry.recipients[0]["state"] == "pending"


def test_listing_names_are_mailq_s() -> None:
    assert [state.shown for state in QueueState] == ["active", "deferred", "held", "corrupt"]


def test_routes_and_modes_are_the_config_file_words() -> None:
    assert [route.value for route in Route] == ["smarthost", "mx", "local"]
    assert [mode.value for mode in DeliveryMode] == ["offline", "smarthost", "mx"]
    raw = {
        "delivery": {"mode": "mx", "smarthost": "relay.example:25"},
        "local": {},
        "routes": {"relay.test": "smarthost", ".mx.test": "mx"},
        "relay": {"local_domains": ["here.test"]},
    }
    config = _build(raw, "test")
    assert config.delivery.effective_mode is DeliveryMode.MX
    assert config.route_for("relay.test") is Route.SMARTHOST
    assert config.route_for("a.mx.test") is Route.MX
    assert config.route_for("here.test") is Route.LOCAL
    assert config.route_for("elsewhere.test") is Route.MX


def test_offline_mail_goes_to_the_smarthost_once_flushed() -> None:
    config = Config(delivery=DeliveryConfig(mode="offline"))
    assert config.delivery.effective_mode is DeliveryMode.OFFLINE
    assert config.default_route is Route.SMARTHOST


def test_an_unknown_route_is_refused_with_the_words_it_takes() -> None:
    with pytest.raises(ConfigError, match="must be one of smarthost, mx, local"):
        _build({"routes": {"a.test": "uucp"}}, "test")


# --- the spool's API takes and gives QueueState, not any str --------------------------------

STATE_PARAMETERS = frozenset({"state", "src", "dst"})
STATE_TYPES = (QueueState, QueueState | None)


def _state_hints(function: object) -> dict[str, object]:
    hints = typing.get_type_hints(function)
    return {name: hint for name, hint in hints.items() if name in STATE_PARAMETERS}


def test_spool_methods_take_a_queue_state_not_a_bare_str() -> None:
    """mypy then refuses `spool.ids("qeueu")` or tmp/ where a queue state belongs."""
    methods = [
        getattr(cls, name)
        for cls in (Spool, GroupCommitter)
        for name in dir(cls)
        if not name.startswith("_") or name == "__init__"
    ]
    checked = {
        f"{function.__qualname__}({name})": hint
        for function in methods
        if inspect.isfunction(function)
        for name, hint in _state_hints(function).items()
    }
    assert len(checked) >= 14, sorted(checked)  # every method that names a state
    assert {where: hint for where, hint in checked.items() if hint not in STATE_TYPES} == {}


def test_what_the_spool_hands_back_names_its_state_with_a_queue_state() -> None:
    for record in (SpooledMessage, MessageSummary, Junk):
        assert typing.get_type_hints(record)["state"] is QueueState, record
    hints = typing.get_type_hints(Spool.locked)
    assert hints["return"] == Iterator[QueueState | None]
