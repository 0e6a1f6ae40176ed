"""Event-loop choice, in one place, for the baseline server and the load generators.

The load generators always use uvloop so that the client side is as cheap as it can be
in Python and the same for every server measured; the baseline server uses whichever
loop it is asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """``asyncio.new_event_loop`` or ``uvloop.new_event_loop`` (ImportError if missing)."""
    if kind == "asyncio":
        return asyncio.new_event_loop
    if kind == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    raise ValueError(f"unknown loop {kind!r}")
