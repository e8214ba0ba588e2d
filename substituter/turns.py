"""Starting a turn from asyncio code, cheaply.

``Turn.external`` is safe from any thread, and pays for it on every call: two
``call_soon_threadsafe`` hops (each a write to the loop's self-pipe), a concurrent future chained
to an asyncio one, and a task.  Code already running on the actor system's loop (the broker, the
fetcher hosts, ``fetch``) starts several such turns per store path; :func:`external` runs the same
turn with one ``call_soon`` instead, in the same FIFO order, and falls back to ``Turn.external``
anywhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from syndicate.actor import Turn

__all__ = ["external", "later"]


def _system_loop(facet: Any) -> Any:
    system = getattr(facet.actor, "_system", None)
    return getattr(system, "loop", None)


def _on_loop(loop: Any) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def external(facet: Any, action: Callable[[], None]) -> None:
    """Run ``action`` in a turn of ``facet`` soon (as ``Turn.external`` does)."""
    loop = _system_loop(facet)
    if loop is not None and _on_loop(loop):
        loop.call_soon(Turn.run, facet, action)
    else:
        Turn.external(facet, action)


def later(facet: Any, delay: float, action: Callable[[], None]) -> asyncio.TimerHandle:
    """Run ``action`` in a turn of ``facet`` after ``delay`` seconds; call from the loop."""
    loop = _system_loop(facet) or asyncio.get_running_loop()
    return loop.call_later(delay, Turn.run, facet, action)
