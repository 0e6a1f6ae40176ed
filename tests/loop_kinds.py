"""Running a test's coroutine on the event loop the test is parametrized with
(``"asyncio"`` or ``"uvloop"``): the stream classes must behave the same on both."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run_on(loop_kind: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`main()` run to its end on a fresh loop of `loop_kind`, closed afterwards."""
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
