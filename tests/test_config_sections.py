"""Each part gets the config sections it needs, not the whole `Config` (issue 14).

`Config` is the whole file. Only the tops that read it and assemble the processes hold
it whole: the CLI, the daemon's parent, sendmail's entry point, and (until its session
shape settles) the smtpd side's builders. Everything they build is handed sections:
the router `Routing`, the queue runner and the agents `QueueConfig` (and each agent its
own tables from it), the queue manager and the local service theirs, local submission
`SubmitConfig`. Two checks, one on the code's syntax (no import of `Config`, however
spelled, outside the tops) and one on the signatures of the parts as Python sees them.
"""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import Callable
from pathlib import Path

import pytest

from leafmail import flush, localsvc, pickup, qmgr, queue
from leafmail.config import Config, Routing, _build
from leafmail.delivery import local, mx, router, smarthost
from leafmail.sendmail import context
from leafmail.states import Route

SRC = Path(__file__).resolve().parent.parent / "src"

# The modules that may hold the whole Config, each with the reason.
TOPS = {
    "leafmail.config": "defines it",
    "leafmail.cli": "the commands' top: reads the file and the flags, hands sections on",
    "leafmail.daemon": "the parent of `leafmail serve`: assembles the processes",
    "leafmail.sendmail": "sendmail's entry point (run): loads it, hands sections on",
    "leafmail.smtpd": "the smtpd side's builder (SmtpdSettings), left whole for now",
    "leafmail.policy": "builds the smtpd side's checks from it (policy_for), likewise",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def config_users(source: str, module: str) -> bool:
    """True if `source` names leafmail.config.Config: imported by name (relative or
    absolute), or as an attribute of the config module (``configuration.Config``)."""
    tree = ast.parse(source)
    aliases = set()  # names the config module is bound to in this module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node, module)
            names = {alias.name for alias in node.names}
            if target == "leafmail.config" and "Config" in names:
                return True
            if target == "leafmail" and "config" in names:
                aliases |= {a.asname or a.name for a in node.names if a.name == "config"}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "leafmail.config"}
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "Config"
        and ast.unparse(node.value) in aliases
        for node in ast.walk(tree)
    )


def _resolve(node: ast.ImportFrom, module: str) -> str:
    """The absolute module an ``from X import ...`` names, relative ones resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    is_package = (SRC / Path(*package) / "__init__.py").exists()
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def modules_using_config(root: Path = SRC / "leafmail") -> set[str]:
    return {
        module_name(path)
        for path in root.rglob("*.py")
        if config_users(path.read_text(encoding="utf-8"), module_name(path))
    }


def test_only_the_tops_hold_the_whole_config() -> None:
    outside = modules_using_config() - set(TOPS)
    assert not outside, f"these take the whole Config; give them their sections: {outside}"


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("leafmail.newpart", "from .config import Config\n"),
        ("leafmail.delivery.newagent", "from ..config import DnsConfig, Config\n"),
        ("leafmail.delivery.newagent", "from leafmail.config import Config\n"),
        ("leafmail.sendmail.new", "from .. import config as conf\nx: conf.Config\n"),
        ("leafmail.newpart", "import leafmail.config\ndef f(c: leafmail.config.Config): ...\n"),
    ],
)
def test_a_config_put_back_is_found(module: str, source: str) -> None:
    assert config_users(source, module)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("leafmail.delivery.newagent", "from ..config import DeliveryConfig, QueueConfig\n"),
        ("leafmail.delivery.newagent", "from .config import Config\n"),  # another module
        ("leafmail.newpart", "from . import config\nx: config.QueueConfig\n"),
    ],
)
def test_sections_alone_are_not_a_config(module: str, source: str) -> None:
    assert not config_users(source, module)


def _agents() -> list[type]:
    """Every delivery agent class (what has `deliver`) in the delivery modules."""
    found = []
    for module in (router, smarthost, mx, local, localsvc):
        for _name, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and hasattr(obj, "deliver"):
                found.append(obj)
    return found


PARTS: list[Callable[..., object]] = [
    *_agents(),
    router.build_agent,
    router.route_of,
    queue.build_runner,
    flush.flush,
    flush.runner_for,
    qmgr.Qmgr,
    localsvc.LocalService,
    pickup.PickupServer,
    context.Context,
]


def test_the_agents_are_all_seen() -> None:
    names = {agent.__name__ for agent in _agents()}
    assert {"RoutingAgent", "SmarthostAgent", "MxAgent", "LocalAgent", "LocalClient"} <= names


@pytest.mark.parametrize("part", PARTS, ids=lambda part: part.__qualname__)
def test_no_part_takes_the_whole_config(part: Callable[..., object]) -> None:
    target = part.__init__ if inspect.isclass(part) else part
    hints = typing.get_type_hints(target, vars(inspect.getmodule(part)))
    whole = [name for name, hint in hints.items() if Config in _types_in(hint)]
    assert not whole, f"{part.__qualname__} takes the whole Config as {whole}"


def _types_in(hint: object) -> set[object]:
    """`hint` and every type inside it (Config | None, Callable[[], Config] ...)."""
    if isinstance(hint, list):  # the parameter list of Callable[[A, B], R]
        return {t for item in hint for t in _types_in(item)}
    inner = {hint}
    for arg in typing.get_args(hint):
        inner |= _types_in(arg)
    return inner


def test_the_type_check_sees_a_config_parameter() -> None:
    def takes(config: Config | None) -> None: ...

    hints = typing.get_type_hints(takes, {"Config": Config})
    assert Config in _types_in(hints["config"])


# -- the sections say what the whole config said ------------------------------------------


def _config() -> Config:
    raw = {
        "hostname": "mx.leaf.test",
        "relay": {"local_domains": ["Leaf.Test."]},
        "delivery": {"smarthost": "relay.test:25", "tls": "none", "double_bounce_to": "pm"},
        "local": {"mailbox": "mbox"},
        "routes": {"far.test": "mx", ".sub.leaf.test": "smarthost"},
        "sendmail": {"origin": "leaf.test"},
    }
    return _build(raw, "test")


@pytest.mark.parametrize(
    "domain", ["far.test", "FAR.test.", "a.sub.leaf.test", "leaf.test", "other.test", ""]
)
def test_routing_routes_as_the_config_did(domain: str) -> None:
    config = _config()
    routing = config.routing
    assert isinstance(routing, Routing)
    assert routing.route_for(domain) is config.route_for(domain)
    assert routing.default is config.default_route is Route.SMARTHOST
    assert routing.in_use == {Route.MX, Route.SMARTHOST, Route.LOCAL}


def test_bare_names_route_locally_with_a_local_table() -> None:
    config = _config()
    assert router.route_of(config.routing, "postmaster") is Route.LOCAL
    assert router.route_of(config.routing, "a@far.test") is Route.MX


def test_the_queue_and_submit_sections_carry_the_derived_values() -> None:
    config = _config()
    queue_config = config.queue
    assert queue_config.postmaster == config.double_bounce_address == "pm@leaf.test"
    assert queue_config.hostname == "mx.leaf.test"
    assert queue_config.routing.local_domains == config.local_domains == ("leaf.test",)
    assert queue_config.delivery is config.delivery and queue_config.local is config.local
    submit = config.submit
    assert (submit.hostname, submit.spool) == (config.hostname, config.spool)
    assert submit.smtp is config.smtp and submit.sendmail is config.sendmail
