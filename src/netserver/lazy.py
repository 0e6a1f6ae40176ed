"""A package's public names, imported on first use (PEP 562) instead of with the package.

A command that needs one small part of a package (``leafmail sendmail`` needs
``netserver.errors``, run once a message by cron or git send-email) would otherwise load
everything the package's ``__init__`` names: every server mode, asyncio, ssl, the SMTP
engine, the delivery agents, a quarter of a second of CPU at each start. A package keeps
its ``from .x import Name`` lines under ``TYPE_CHECKING`` (so type checkers and readers
see the names and their homes) and gives `exports` the same table for run time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["exports"]


def exports(
    package: str, homes: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], object]:
    """The module ``__getattr__`` of `package`: a name of `homes` (name -> relative
    module) is imported from its module when first asked for, then kept in `namespace`
    (the package's globals), so it is looked up once; any other name is AttributeError."""

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home, package), name)
        namespace[name] = value
        return value

    return __getattr__
