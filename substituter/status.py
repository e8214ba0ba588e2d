"""`substituter status`: what the dataspace says right now — demand, supply, transfers, failures.

Everything shown is read from assertions (nothing is asked of the daemon directly), so the same
view works against a daemon's embedded dataspace or a fleet's syndicate-server.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import click
from syndicate import actor, turn
from syndicate import patterns as P
from syndicate.actor import Turn
from syndicate.dataspace import during

from .dataspace.barrier import barrier
from .dataspace.connect import connect
from .protocol import Available, Failed, Fetcher, Transfer, Unavailable, Want, record_pattern

__all__ = ["StatusView", "run_status"]

REDRAW_INTERVAL = 0.5


@dataclass
class StatusView:
    """A bag per kind of assertion (counts, since the same assertion may stand twice)."""

    fetchers: dict[tuple[Any, ...], int] = field(default_factory=dict)
    wants: dict[tuple[Any, ...], int] = field(default_factory=dict)
    offers: dict[tuple[Any, ...], int] = field(default_factory=dict)
    declines: dict[tuple[Any, ...], int] = field(default_factory=dict)
    transfers: dict[tuple[Any, ...], int] = field(default_factory=dict)
    failures: dict[tuple[Any, ...], int] = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"fetchers ({len(self.fetchers)}):"]
        for name, kind, priority, host in sorted(self.fetchers, key=lambda f: (f[2], f[0])):
            lines.append(f"  {name:<32} {kind:<14} priority {priority:<4} on {host}")
        lines.append(f"wants ({len(self.wants)}):")
        for hash_part, intent in sorted(self.wants):
            offers = sum(1 for o in self.offers if o[0] == hash_part)
            declines = sum(1 for d in self.declines if d[0] == hash_part)
            lines.append(f"  {hash_part} {intent:<6} {offers} offer(s), {declines} unavailable")
        lines.append(f"transfers ({len(self.transfers)}):")
        for hash_part, fetcher, done, total in sorted(self.transfers):
            pct = f"{100 * done / total:5.1f}%" if total else "     ?"
            lines.append(f"  {hash_part} from {fetcher}: {done}/{total or '?'} bytes {pct}")
        lines.append(f"recent failures ({len(self.failures)}):")
        for hash_part, fetcher, reason, transient in sorted(self.failures):
            kind = "transient" if transient else "bad source"
            lines.append(f"  {hash_part} {fetcher} ({kind}): {reason}")
        return "\n".join(lines)


def _track(ds: Any, pattern: Any, bag: dict[tuple[Any, ...], int], changed: Any) -> None:
    @during(ds, pattern)
    def _added(*captures: Any) -> Any:
        key = tuple(str(c) if not isinstance(c, (int, bool)) else c for c in captures)
        bag[key] = bag.get(key, 0) + 1
        changed()

        def removed() -> None:
            bag[key] -= 1
            if bag[key] == 0:
                del bag[key]
            changed()

        return removed


def observe(ds: Any, view: StatusView, changed: Any) -> None:
    C = P.CAPTURE
    _track(ds, record_pattern(Fetcher, name=C, kind=C, priority=C, host=C), view.fetchers, changed)
    _track(ds, record_pattern(Want, hash=C, intent=P.bind(P._)), view.wants, changed)
    _track(ds, record_pattern(Available, hash=C, fetcher=C), view.offers, changed)
    _track(ds, record_pattern(Unavailable, hash=C, fetcher=C), view.declines, changed)
    _track(ds, record_pattern(Transfer, hash=C, fetcher=C, bytes=C, total=C), view.transfers, changed)
    _track(ds, record_pattern(Failed, hash=C, fetcher=C, reason=C, transient=C), view.failures, changed)


def run_status(address: str, cap: str, *, watch: bool = False, timeout: float = 10.0) -> int:
    loop = asyncio.new_event_loop()
    view = StatusView()
    result = {"code": 0}
    tty = sys.stdout.isatty()

    def boot() -> None:
        root = turn.active_facet()
        state = {"synced": False, "dirty": False}

        def stop(code: int) -> None:
            result["code"] = code
            Turn.external(root, lambda: turn.stop_actor())

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, lambda: stop(0))
            except (RuntimeError, ValueError):
                pass

        def draw() -> None:
            if tty and watch:
                click.echo("\x1b[H\x1b[2J", nl=False)
            click.echo(view.render())
            if watch and not tty:
                click.echo("")

        def changed() -> None:
            if state["synced"] and watch and not state["dirty"]:
                state["dirty"] = True

                def redraw() -> None:
                    state["dirty"] = False
                    draw()

                loop.call_later(REDRAW_INTERVAL, redraw)

        def refused(reason: str) -> None:
            click.echo(f"substituter status: the dataspace refused the capability: {reason}", err=True)
            stop(2)

        @connect(address, cap, on_refused=refused)
        def on_dataspace(ds: Any) -> None:
            observe(ds, view, changed)

            def synced() -> None:
                state["synced"] = True
                draw()
                if not watch:
                    stop(0)

            barrier(ds, synced)

        def give_up() -> None:
            if not state["synced"]:
                click.echo(f"substituter status: no answer from {address} within {timeout:g} s", err=True)
                stop(1)

        loop.call_later(timeout, give_up)

    actor.System(loop=loop).run(boot, name="status", configure_logging=False)
    return result["code"]
