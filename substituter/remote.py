"""Running one fetcher plugin in its own process, attached to a remote dataspace.

The process connects with a capability (to a daemon's embedded dataspace or a syndicate-server),
asserts its ``<fetcher …>`` and answers wants through the same :class:`FetcherHost` the daemon
uses in process.  When the process dies its assertions are retracted by the relay, so no demand
waits on it.  It reconnects after the dataspace restarts and asserts everything again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from syndicate import actor, turn
from syndicate.actor import Turn

from .dataspace.connect import connect
from .fetcher_host import FetcherHost
from .plugin import Fetcher

__all__ = ["run_remote_fetcher"]

log = logging.getLogger("substituter.fetcher")


def run_remote_fetcher(fetcher: Fetcher, address: str, cap: str, *, locate_timeout: float = 5.0) -> int:
    """Block serving ``fetcher`` until SIGTERM/SIGINT; returns the process exit code."""
    loop = asyncio.new_event_loop()
    result = {"code": 0}

    def boot() -> None:
        root = turn.active_facet()

        def shutdown() -> None:
            Turn.external(root, lambda: turn.stop_actor())

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, shutdown)
            except (RuntimeError, ValueError):
                pass

        def refused(reason: str) -> None:
            log.error("the dataspace refused our capability: %s", reason)
            result["code"] = 2
            shutdown()

        @turn.linked_task()
        async def start(_facet: Any) -> bool:
            await fetcher.start()
            Turn.external(root, attach)
            return True

        def attach() -> None:
            turn.on_stop(lambda: loop.create_task(fetcher.stop()))

            @connect(address, cap, on_refused=refused)
            def on_dataspace(ds: Any) -> None:
                log.info("%s (%s) attached to %s", fetcher.name, fetcher.kind, address)
                link = fetcher.context.dataspace
                if link is not None:
                    link.ref, link.facet = ds, turn.active_facet()
                FetcherHost(fetcher, ds, locate_timeout=locate_timeout).boot()

    actor.System(loop=loop).run(boot, name=f"fetcher {fetcher.name}", configure_logging=False)
    return result["code"]
