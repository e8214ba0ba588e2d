"""Runs one fetcher plugin as a participant in a dataspace.

The host asserts ``<fetcher name kind priority host>`` for as long as it lives, and answers every
standing ``<want hash _>`` (including those asserted before it attached) with ``<available …>``
or ``<unavailable …>``, held while the want stands.  Deadlines and retries of ``locate`` are
applied here, uniformly for every plugin; a plugin that raises or hangs yields ``unavailable``
with the reason, never a stuck demand.  The same host runs plugins in the daemon's process and in
their own (``substituter fetcher NAME``); when a process dies, the relay retracts its assertions.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from syndicate import patterns as P
from syndicate import turn
from syndicate.dataspace import during

from .errors import SubstituterError
from .nix.store_path import validate_hash_part
from .plugin import Answer, Fetcher, Offer, Unavailable
from .protocol import Fetcher as FetcherRecord
from .protocol import Unavailable as UnavailableRecord
from .protocol import Want, record_pattern
from .records import offer_to_record

__all__ = ["FetcherHost", "locate_with_policy"]

log = logging.getLogger("substituter.fetcher")

#: Transient failures of locate are retried this many times within the deadline.
LOCATE_RETRIES = 2


async def locate_with_policy(fetcher: Fetcher, hash_part: str, timeout: float) -> Answer:
    """Ask a fetcher, with a deadline and retries; every failure becomes Unavailable."""
    try:
        validate_hash_part(hash_part)
    except SubstituterError as exc:
        return Unavailable(str(exc))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer"
    for attempt in range(LOCATE_RETRIES + 1):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            answer = await asyncio.wait_for(fetcher.locate(hash_part), remaining)
        except TimeoutError:
            return Unavailable(f"no answer within {timeout:g} s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a plugin's bug must not take the host down
            last = f"{type(exc).__name__}: {exc}"
            log.warning("%s: locate %s failed (try %d): %s", fetcher.name, hash_part, attempt + 1, last)
            await asyncio.sleep(min(0.05 * 2**attempt, max(0.0, deadline - loop.time())))
            continue
        if isinstance(answer, Offer) and answer.info.hash_part != hash_part:
            return Unavailable(f"fetcher answered with another path ({answer.info.store_path})")
        if not isinstance(answer, (Offer, Unavailable)):
            return Unavailable(f"fetcher returned {type(answer).__name__}, not Offer or Unavailable")
        return answer
    return Unavailable(f"locate failed: {last}")


class FetcherHost:
    """Attach ``fetcher`` to the dataspace ``ds``; call :meth:`boot` inside a turn."""

    def __init__(self, fetcher: Fetcher, ds: Any, *, locate_timeout: float = 5.0,
                 host: str | None = None, local_answers: set[tuple[str, str]] | None = None) -> None:
        self.fetcher = fetcher
        self.ds = ds
        self.locate_timeout = locate_timeout
        self.host = host or socket.gethostname()
        #: Shared with an in-process broker: which answers really come from this process.
        self.local_answers = local_answers

    def boot(self) -> None:
        f = self.fetcher
        turn.publish(self.ds, FetcherRecord(f.name, f.kind, f.priority, self.host))

        @during(self.ds, record_pattern(Want, hash=P.CAPTURE))
        def on_want(hash_part: Any) -> None:
            if not isinstance(hash_part, str):
                return
            facet = turn.active_facet()

            @turn.linked_task()
            async def answer(_facet: Any) -> bool:
                result = await locate_with_policy(f, hash_part, self.locate_timeout)
                turn.external(facet, lambda: self._publish(hash_part, result))
                return True  # keep the facet (and so the answer) until the want goes

    def _publish(self, hash_part: str, answer: Answer) -> None:
        if self.local_answers is not None:
            key = (hash_part, self.fetcher.name)
            self.local_answers.add(key)  # before the assertion can reach the broker
            turn.on_stop(lambda: self.local_answers.discard(key) if self.local_answers is not None else None)
        if isinstance(answer, Offer):
            turn.publish(self.ds, offer_to_record(hash_part, self.fetcher.name, answer))
        else:
            turn.publish(self.ds, UnavailableRecord(hash_part, self.fetcher.name, answer.reason))
