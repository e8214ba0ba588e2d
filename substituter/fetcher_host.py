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
from weakref import WeakKeyDictionary

from preserves import Record, Symbol
from syndicate import actor, turn
from syndicate import patterns as P
from syndicate.dataspace import observe

from . import turns
from .errors import SubstituterError
from .nix.store_path import validate_hash_part
from .plugin import Answer, Fetcher, Offer, Unavailable
from .protocol import Fetcher as FetcherRecord
from .protocol import Want, record_pattern
from .records import offer_to_record

__all__ = ["FetcherHost", "available_value", "local_offer", "local_record", "locate_with_policy"]

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
            async with asyncio.timeout(remaining):  # not wait_for: no extra task per locate
                answer = await fetcher.locate(hash_part)
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


_AVAILABLE, _NARINFO, _UNAVAILABLE = Symbol("available"), Symbol("narinfo"), Symbol("unavailable")


def available_value(record: Any) -> Record:
    """``preserve(record)`` for an Available record, built directly: preserves-py's schema
    encoder cost more than the rest of an answer (the same value; the tests compare them)."""
    info = record.info
    narinfo = Record(_NARINFO, (info.storePath, info.narHash, info.narSize, tuple(info.references),
                                info.deriver, info.ca, tuple(info.sigs)))
    return Record(_AVAILABLE, (record.hash, record.fetcher, record.uri, record.compression,
                               record.fileSize, record.fileHash, narinfo, record.cost))


#: The Available records this process's hosts asserted, by fetcher object and hash.  An
#: in-process broker takes an answer's record from here rather than decoding the dataspace's
#: copy of it: the same value, without a schema decode per offer.
#: Per in-process fetcher: hash part -> (the Available record its host asserts, the Offer it
#: was made from).
_LOCAL_RECORDS: WeakKeyDictionary[Fetcher, dict[str, tuple[Any, Offer]]] = WeakKeyDictionary()


def local_record(fetcher: Fetcher, hash_part: str) -> Any | None:
    """The Available record ``fetcher``'s host in this process currently asserts for the path."""
    records = _LOCAL_RECORDS.get(fetcher)
    entry = None if records is None else records.get(hash_part)
    return None if entry is None else entry[0]


def local_offer(fetcher: Fetcher, hash_part: str) -> Offer | None:
    """The Offer behind :func:`local_record` (no need to rebuild it from the record)."""
    records = _LOCAL_RECORDS.get(fetcher)
    entry = None if records is None else records.get(hash_part)
    return None if entry is None else entry[1]


class _Answering:
    """One standing want being answered: the locate task, then the asserted answer."""

    __slots__ = ("hash_part", "task", "handle", "record", "gone")

    def __init__(self, hash_part: str) -> None:
        self.hash_part = hash_part
        self.task: asyncio.Task[None] | None = None
        self.handle: Any = None
        self.record: Any = None
        self.gone = False


class _Wants(actor.Entity):
    """Observer of ``<want hash _>``: one publish per distinct hash (the dataspace counts)."""

    def __init__(self, host: FetcherHost) -> None:
        self.host = host

    def on_publish(self, v: Any, handle: Any) -> None:
        hash_part = v[0] if isinstance(v, tuple) and v else None
        if isinstance(hash_part, str):
            self.host._want_added(handle, hash_part)

    def on_retract(self, handle: Any) -> None:
        self.host._want_removed(handle)


class FetcherHost:
    """Attach ``fetcher`` to the dataspace ``ds``; call :meth:`boot` inside a turn.

    Wants are watched by one plain entity rather than a facet per want: a facet, its linked task
    and its stop handlers cost more per path than locating a narinfo on a local disk."""

    def __init__(self, fetcher: Fetcher, ds: Any, *, locate_timeout: float = 5.0,
                 host: str | None = None, local_answers: set[tuple[str, str]] | None = None) -> None:
        self.fetcher = fetcher
        self.ds = ds
        self.locate_timeout = locate_timeout
        self.host = host or socket.gethostname()
        #: Shared with an in-process broker: which answers really come from this process.
        self.local_answers = local_answers
        self.facet: Any = None
        self._wants: dict[Any, _Answering] = {}

    def boot(self) -> None:
        f = self.fetcher
        self.facet = turn.active_facet()
        turn.publish(self.ds, FetcherRecord(f.name, f.kind, f.priority, self.host))
        observe(self.ds, record_pattern(Want, hash=P.CAPTURE))(_Wants(self))
        turn.on_stop(self._stopped)

    def _want_added(self, handle: Any, hash_part: str) -> None:
        answering = _Answering(hash_part)
        self._wants[handle] = answering
        answering.task = asyncio.get_running_loop().create_task(self._answer(answering))

    async def _answer(self, answering: _Answering) -> None:
        result = await locate_with_policy(self.fetcher, answering.hash_part, self.locate_timeout)
        if not answering.gone:
            turns.external(self.facet, lambda: self._publish(answering, result))

    def _publish(self, answering: _Answering, answer: Answer) -> None:
        if answering.gone:
            return  # the want went while the answer was on its way
        hash_part, name = answering.hash_part, self.fetcher.name
        if self.local_answers is not None:
            self.local_answers.add((hash_part, name))  # before the assertion can reach the broker
        if isinstance(answer, Offer):
            record = offer_to_record(hash_part, name, answer)
            if self.local_answers is not None:
                answering.record = record
                _LOCAL_RECORDS.setdefault(self.fetcher, {})[hash_part] = (record, answer)
            answering.handle = turn.publish(self.ds, available_value(record))
        else:
            answering.handle = turn.publish(self.ds, Record(_UNAVAILABLE, (hash_part, name, answer.reason)))

    def _want_removed(self, handle: Any) -> None:
        answering = self._wants.pop(handle, None)
        if answering is None:
            return
        self._forget(answering)
        if answering.handle is not None:
            turn.retract(answering.handle)

    def _forget(self, answering: _Answering) -> None:
        answering.gone = True
        if answering.task is not None:
            answering.task.cancel()
        if answering.handle is not None and self.local_answers is not None:
            self.local_answers.discard((answering.hash_part, self.fetcher.name))
            records = _LOCAL_RECORDS.get(self.fetcher)
            entry = None if records is None else records.get(answering.hash_part)
            if records is not None and answering.record is not None and entry is not None \
                    and entry[0] is answering.record:
                del records[answering.hash_part]

    def _stopped(self) -> None:
        """The host's facet stopped (shutdown, or the dataspace went): its answers go with it."""
        wants, self._wants = self._wants, {}
        for answering in wants.values():
            self._forget(answering)
