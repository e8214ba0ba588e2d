"""Starting a turn from asyncio code, cheaply.

``Turn.external`` is safe from any thread, and pays for it on every call: two
``call_soon_threadsafe`` hops (each a write to the loop's self-pipe), a concurrent future chained
to an asyncio one, and a task.  Code already running on the actor system's loop (the broker, the
fetcher hosts, ``fetch``) starts several such turns per store path; :func:`external` runs the same
turn with one ``call_soon`` instead, and falls back to ``Turn.external`` anywhere else.

Actions for one facet queued during one pass of the event loop share one turn (in the order they
were queued): a turn costs a task per actor it delivers to, and the actions of one pass (e.g. the
answers of several fetches that completed together, a narinfo's references asked for at once)
go to the same few actors.
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


#: Actions waiting for their facet's next turn, in order (a facet is here while one is scheduled).
_queued: dict[Any, list[Callable[[], None]]] = {}


def external(facet: Any, action: Callable[[], None]) -> None:
    """Run ``action`` in a turn of ``facet`` soon (as ``Turn.external`` does), with the other
    actions queued for that facet meanwhile."""
    loop = _system_loop(facet)
    if loop is not None and _on_loop(loop):
        queued = _queued.get(facet)
        if queued is None:
            _queued[facet] = [action]
            loop.call_soon(_run_queued, facet)
        else:
            queued.append(action)
    else:
        Turn.external(facet, action)


def _run_queued(facet: Any) -> None:
    actions = _queued.pop(facet)
    if len(actions) == 1:
        Turn.run(facet, actions[0])
        return

    def run_all() -> None:
        for action in actions:
            action()

    Turn.run(facet, run_all)


def later(facet: Any, delay: float, action: Callable[[], None]) -> asyncio.TimerHandle:
    """Run ``action`` in a turn of ``facet`` after ``delay`` seconds; call from the loop."""
    loop = _system_loop(facet) or asyncio.get_running_loop()
    return loop.call_later(delay, Turn.run, facet, action)
