"""Demand ↔ supply: the one place that decides which offers are trusted and used.

For each store path someone needs, the broker asserts ``<want hash intent>`` in the dataspace,
watches every live fetcher's answer (``<available …>``/``<unavailable …>``), judges each offer
with the :class:`~substituter.trust.TrustPolicy` and ranks the trusted ones
(:class:`~substituter.ranking.Demand`).  It answers as soon as the best answer is certain, and
keeps the want standing for a while (``linger``) so that the NAR request that follows a narinfo
request finds the offers ready, and late offers still arrive for failover.

While NARs stream, it asserts ``<transfer …>`` (progress) and ``<failed …>`` (recent failures)
so that ``substituter status`` and anyone else with the capability can watch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from preserves import Record, Symbol, preserve
from syndicate import actor, turn
from syndicate import patterns as P
from syndicate.actor import Turn
from syndicate.dataspace import during, observe
from syndicate.schema import dataspace as dataspace_schema

from . import turns
from .dataspace.dataspace import Dataspace
from .errors import ProtocolError
from .fetcher_host import local_offer
from .nar_service import nar_hash32
from .nix.narinfo import NarInfo
from .plugin import Fetcher, Offer
from .protocol import Available, Failed, Intent, record_pattern
from .protocol import Fetcher as FetcherRecord
from .protocol import Unavailable as UnavailableRecord
from .ranking import Candidate, Demand, FetcherStats
from .records import record_to_offer
from .transfer import Source, TransferEvents
from .trust import TrustPolicy, Verdict

if TYPE_CHECKING:  # prometheus_client is a large import; `fetch` may run without it
    from .metrics import Metrics

__all__ = ["Broker", "Resolution"]

log = logging.getLogger("substituter.broker")

Opener = Callable[[Offer, int], AsyncIterator[bytes]]

#: How long ``<failed …>`` stays asserted for status displays, and a bad source stays excluded.
FAILURE_MEMORY = 600.0
PROGRESS_INTERVAL = 0.5
#: Prefetching starts no demand while this many are standing (each is one want and its answers).
MAX_PREFETCH_ACTIVE = 20_000
#: Prefetched demands being resolved at once.
PREFETCH_CONCURRENCY = 128
#: ... and while a client waits for a path not decided yet: new prefetches would queue ahead of
#: it for the fetchers' connections (aiohttp hands a freed one to the newest request).
PREFETCH_CONCURRENCY_ASKED = 16
#: Most offers judged in one worker call.  Signature checks (~0.1 ms each) run in a thread beside
#: the event loop, in batches, so the loop's turns stay short (measured ~4% on the cold closure).
#: cryptography's ed25519 check holds the GIL (50.0: two threads verify no faster than one), so
#: the loop waits for the GIL while a batch runs: small batches keep that wait under ~2 ms.
JUDGE_BATCH = 16

_WANT, _TRANSFER = Symbol("want"), Symbol("transfer")
_INTENT = {"fetch": preserve(Intent.fetch()), "query": preserve(Intent.query())}


def _want(hash_part: str, intent: str) -> Record:
    """``preserve(Want(hash_part, intent))``, built directly (this runs for every demand)."""
    return Record(_WANT, (hash_part, _INTENT[intent]))


def _offers_pattern(hash_part: Any) -> Any:
    """``<available hash …>`` captured whole (``hash_part`` is a literal, or ``P._``)."""
    return P.bind(record_pattern(Available, hash=hash_part))


def _declines_pattern(hash_part: Any) -> Any:
    """``<unavailable hash …>`` captured whole."""
    return P.bind(record_pattern(UnavailableRecord, hash=hash_part))


def _transfer(hash_part: str, fetcher: str, done: int, total: int) -> Record:
    """``preserve(Transfer(…))``, built directly (at least twice per NAR)."""
    return Record(_TRANSFER, (hash_part, fetcher, done, total))


@dataclass(frozen=True)
class Resolution:
    """What the broker knows about one path at the moment it answered."""

    hash_part: str
    candidates: list[Candidate]
    reason: str = ""

    @property
    def info(self) -> NarInfo | None:
        """The best trusted narinfo, or None when there is none."""
        return self.candidates[0].offer.info if self.candidates else None

    @property
    def verdict(self) -> Verdict | None:
        return self.candidates[0].verdict if self.candidates else None

    def for_nar(self, nar_hash: str) -> Resolution:
        """Only the candidates offering the NAR with this NarHash (nix32): another build of an
        input-addressed path is a different NAR, and its bytes must never be mixed in."""
        same = [c for c in self.candidates if nar_hash32(c.offer.info) == nar_hash]
        return Resolution(self.hash_part, same, self.reason if same else f"no trusted offer of NAR {nar_hash}")


@dataclass
class _Active:
    demand: Demand
    intent: str = "query"
    #: Our <want …> assertions (a second one when a query becomes a fetch); None until started.
    wants: list[Any] | None = None
    waiters: list[asyncio.Future[Resolution]] = field(default_factory=list)
    #: Waiting for every fetcher's answer, not just for a decision (see Broker.settled).
    settling: list[asyncio.Future[None]] = field(default_factory=list)
    expires: float = 0.0
    #: Started by prefetch() and not decided yet (it counts against PREFETCH_CONCURRENCY).
    prefetch: bool = False


class _Answer:
    """One ``<available …>`` or ``<unavailable …>`` present in the dataspace."""

    __slots__ = ("hash_part", "value", "fetcher", "reason", "demand", "gone")

    def __init__(self, hash_part: str, value: Any, fetcher: Any = None, reason: Any = None) -> None:
        self.hash_part = hash_part
        self.value = value  # the whole Available record; None for an Unavailable
        self.fetcher = fetcher
        self.reason = reason
        #: The demand this answer counted for (its withdrawal is told to that demand only).
        self.demand: Demand | None = None
        #: Retracted (an offer still being judged then counts for nobody).
        self.gone = False


class _Answers(actor.Entity):
    """Observer of every offer (or every decline) in the dataspace, whatever its hash.

    One observer for all demands instead of two per demand: a demand then costs one <want>
    assertion, not a facet, two Observe assertions (each a pattern the dataspace indexes)
    and a facet per answer."""

    def __init__(self, added: Callable[[Any, Any], None], removed: Callable[[Any], None]) -> None:
        self.added, self.removed = added, removed

    def on_publish(self, v: Any, handle: Any) -> None:
        self.added(v, handle)

    def on_retract(self, handle: Any) -> None:
        self.removed(handle)


def _judge_all(trust: TrustPolicy, infos: list[NarInfo]) -> list[Verdict]:
    """Verdicts for a batch of narinfos (runs in the broker's worker thread)."""
    return [trust.judge(info) for info in infos]


class Broker:
    """Call :meth:`boot` inside a turn of the daemon's actor; then use :meth:`resolve` from asyncio."""

    def __init__(
        self,
        ds: Any,
        trust: TrustPolicy,
        *,
        locate_timeout: float = 5.0,
        local_fetchers: Mapping[str, Fetcher] | None = None,
        openers: Mapping[str, Opener] | None = None,
        linger: float = 60.0,
        metrics: Metrics | None = None,
        local_answers: set[tuple[str, str]] | None = None,
    ) -> None:
        self.ds = ds
        self.trust = trust
        self.locate_timeout = locate_timeout
        self.local_fetchers = dict(local_fetchers or {})
        self.openers = dict(openers or {})
        self.linger = linger
        if metrics is None:
            from .metrics import Metrics

            metrics = Metrics()
        self.metrics = metrics
        self.stats = FetcherStats()
        self.live: dict[str, int] = {}
        self._live_count: dict[str, int] = {}
        self._active: dict[str, _Active] = {}
        self._prefetch_queue: deque[str] = deque()
        self._prefetching = 0
        #: Paths a client waits for that are not decided yet.
        self._asked: set[str] = set()
        self._bad: dict[tuple[str, str], float] = {}
        self._failures: dict[tuple[str, str], Any] = {}
        #: (hash, fetcher) answers made by this process's own fetcher hosts.  An answer in the
        #: dataspace that names a local fetcher but is not in here was asserted by someone else
        #: under that name, and is ignored: it must neither be opened with the local fetcher's
        #: session nor cut a demand short.
        self.local_answers = local_answers if local_answers is not None else set()
        #: Every answer present in the dataspace, by handle and by hash.  Answers for a hash
        #: nobody here wants are only kept (not decoded) until a demand for it starts.
        self._answers: dict[Any, _Answer] = {}
        self._answers_by_hash: dict[str, dict[Any, _Answer]] = {}
        self._per_demand = False
        #: Offers waiting for their verdict, and whether a worker is judging some now.
        self._to_judge: list[tuple[_Active, _Answer, Offer]] = []
        self._judging = False
        self._judge_pool: ThreadPoolExecutor | None = None
        self._offers_ref: Any = None
        self._declines_ref: Any = None
        self.facet: Any = None

    # --- wiring ----------------------------------------------------------------------------

    def boot(self) -> None:
        self.facet = turn.active_facet()

        @during(self.ds, record_pattern(FetcherRecord, name=P.CAPTURE, priority=P.CAPTURE))
        def fetcher_live(name: Any, priority: Any) -> Any:
            if not isinstance(name, str) or not isinstance(priority, int):
                return None
            self._live_count[name] = self._live_count.get(name, 0) + 1
            self.live[name] = priority
            for active in self._active.values():
                active.demand.fetcher_joined(name, priority)
            log.info("fetcher %s is live (priority %d)", name, priority)

            def gone() -> None:
                self._live_count[name] -= 1
                if self._live_count[name] == 0:
                    del self._live_count[name]
                    self.live.pop(name, None)
                    log.info("fetcher %s left", name)
                    for hash_part, active in list(self._active.items()):
                        active.demand.fetcher_left(name)
                        self._check(hash_part)

            return gone

        offers = _Answers(self._offer_added, self._answer_removed)
        declines = _Answers(self._decline_added, self._answer_removed)
        # In our own embedded dataspace, every answer is to a want of this process: watch them
        # all at once.  In a shared one (a fleet's syndicate-server), answers to other daemons'
        # wants would reach every daemon that way, so there each demand observes its own hash.
        self._per_demand = not isinstance(getattr(self.ds, "entity", None), Dataspace)
        if self._per_demand:
            self._offers_ref, self._declines_ref = turn.ref(offers), turn.ref(declines)
        else:
            observe(self.ds, _offers_pattern(P._))(offers)
            observe(self.ds, _declines_pattern(P._))(declines)

    def _external(self, action: Callable[[], None]) -> None:
        turns.external(self.facet, action)

    # --- demand ----------------------------------------------------------------------------

    async def resolve(self, hash_part: str, intent: str = "query") -> Resolution:
        """The ranked trusted offers for a path (empty with a reason when there are none)."""
        active = self._active.get(hash_part)
        if active is not None and intent == "fetch" and active.intent != "fetch":
            self._upgrade(hash_part, active)
        if active is not None and active.demand.decided and not active.waiters:
            active.expires = max(active.expires, time.monotonic() + self.linger)
            return self._resolution(active)
        future: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self._asked.add(hash_part)
        if active is None:
            active = _Active(Demand(hash_part, dict(self.live), self.stats), intent)
            self._active[hash_part] = active
            active.waiters.append(future)
            self._external(lambda: self._start(hash_part, active, intent))
        else:
            active.waiters.append(future)
        # The demand's own deadline normally decides it; this bounds the wait even when a
        # fetcher attaching after that deadline keeps it open.  (A timer rather than wait_for:
        # no task, shield and extra futures per request.)
        timer = asyncio.get_running_loop().call_later(self.locate_timeout + 1.0, self._give_up, active, future)
        try:
            return await future
        finally:
            timer.cancel()
            self._answered(hash_part)

    async def settled(self, hash_part: str) -> None:
        """Wait until every fetcher has answered for this path (or its deadline passed), not
        just until the best answer was certain: after the best source failed, the others."""
        active = self._active.get(hash_part)
        if active is None or not active.demand.pending:
            return
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        active.settling.append(settled)
        def give_up() -> None:
            if not settled.done():
                settled.set_result(None)

        timer = asyncio.get_running_loop().call_later(self.locate_timeout + 1.0, give_up)
        try:
            await settled
        finally:
            timer.cancel()

    def prefetch(self, hash_parts: Iterable[str]) -> int:
        """Resolve paths nobody asked for yet, without waiting (e.g. the references of a
        narinfo just served: Nix walks the closure one request at a time, so it asks for each
        of them next).  When one is asked for, its answer is ready or on its way; an unasked
        demand lingers and goes like any other.  At most PREFETCH_CONCURRENCY run at once, in
        the order given, so that what a client asks meanwhile is not queued behind hundreds of
        them.  Returns how many were queued."""
        queued = 0
        for hash_part in hash_parts:
            if hash_part not in self._active and len(self._prefetch_queue) < MAX_PREFETCH_ACTIVE:
                self._prefetch_queue.append(hash_part)
                queued += 1
        self._pump_prefetches()
        return queued

    def _answered(self, hash_part: str) -> None:
        active = self._active.get(hash_part)
        if hash_part in self._asked and (active is None or not active.waiters):
            self._asked.discard(hash_part)
            self._pump_prefetches()

    def _pump_prefetches(self) -> None:
        limit = PREFETCH_CONCURRENCY_ASKED if self._asked else PREFETCH_CONCURRENCY
        while self._prefetch_queue and self._prefetching < limit \
                and len(self._active) < MAX_PREFETCH_ACTIVE:
            hash_part = self._prefetch_queue.popleft()
            if hash_part in self._active:
                continue  # asked for meanwhile
            active = _Active(Demand(hash_part, dict(self.live), self.stats), "query", prefetch=True)
            self._active[hash_part] = active
            self._prefetching += 1
            self._external(lambda h=hash_part, a=active: self._start(h, a, "query"))  # type: ignore[misc]

    def _prefetch_done(self, active: _Active) -> None:
        if active.prefetch:
            active.prefetch = False
            self._prefetching -= 1
            self._pump_prefetches()

    def _give_up(self, active: _Active, future: asyncio.Future[Resolution]) -> None:
        if future.done():
            return
        if future in active.waiters:
            active.waiters.remove(future)
        future.set_result(self._resolution(active))

    def _upgrade(self, hash_part: str, active: _Active) -> None:
        """The NAR is now needed too: say so (fetchers may prepare, e.g. warm a mirror)."""
        active.intent = "fetch"

        def publish() -> None:
            if active.wants is not None and self._active.get(hash_part) is active:
                active.wants.append(turn.publish(self.ds, _want(hash_part, "fetch")))

        self._external(publish)

    def _foreign(self, hash_part: str, fetcher: str) -> bool:
        """An answer under a local fetcher's name that this process did not make."""
        if fetcher in self.local_fetchers and (hash_part, fetcher) not in self.local_answers:
            log.warning("ignoring an answer for %s claiming to come from local fetcher %s", hash_part, fetcher)
            return True
        return False

    def _resolution(self, active: _Active) -> Resolution:
        demand = active.demand
        ranked = [c for c in demand.ranked() if not self._is_bad(demand.hash_part, c.fetcher)]
        return Resolution(demand.hash_part, ranked, "" if ranked else demand.explain_missing())

    def _start(self, hash_part: str, active: _Active, intent: str) -> None:
        demand = active.demand
        # Fetchers that became live between resolve() and this turn.
        for name, priority in self.live.items():
            demand.fetcher_joined(name, priority)
        active.wants = [turn.publish(self.ds, _want(hash_part, "fetch" if intent == "fetch" else "query"))]
        if self._per_demand:  # retracted with the want, which drops this demand's answers too
            active.wants.append(turn.publish(self.ds, dataspace_schema.Observe(_offers_pattern(hash_part), self._offers_ref)))
            active.wants.append(turn.publish(self.ds, dataspace_schema.Observe(_declines_pattern(hash_part), self._declines_ref)))
        # Answers already present (e.g. to someone else's want) count at once, as an observer
        # of this hash alone would have been told of them on subscribing.
        for answer in list(self._answers_by_hash.get(hash_part, {}).values()):
            self._apply(active, answer)
        active.expires = time.monotonic() + self.linger
        turns.later(self.facet, self.locate_timeout, lambda: self._deadline(hash_part, active))
        turns.later(self.facet, self.linger, lambda: self._maybe_expire(hash_part, active))
        self._check(hash_part)

    # --- answers ---------------------------------------------------------------------------

    def _offer_added(self, captures: Any, handle: Any) -> None:
        value = captures[0] if isinstance(captures, tuple) and captures else None
        fields: tuple[Any, ...] = tuple(value.fields) if isinstance(value, Record) else ()
        if len(fields) < 2 or not isinstance(fields[0], str):
            log.warning("ignoring a malformed offer: %r", value)
            return
        self._add_answer(handle, _Answer(fields[0], value, fields[1]))

    def _decline_added(self, captures: Any, handle: Any) -> None:
        value = captures[0] if isinstance(captures, tuple) and captures else None
        fields: tuple[Any, ...] = tuple(value.fields) if isinstance(value, Record) else ()
        if len(fields) != 3 or not isinstance(fields[0], str):
            return
        hash_part, fetcher, reason = fields
        self._add_answer(handle, _Answer(hash_part, None, fetcher, reason))

    def _add_answer(self, handle: Any, answer: _Answer) -> None:
        self._answers[handle] = answer
        self._answers_by_hash.setdefault(answer.hash_part, {})[handle] = answer
        active = self._active.get(answer.hash_part)
        if active is not None and active.wants is not None:
            self._apply(active, answer)

    def _answer_removed(self, handle: Any) -> None:
        answer = self._answers.pop(handle, None)
        if answer is None:
            return
        answer.gone = True
        same_hash = self._answers_by_hash.get(answer.hash_part)
        if same_hash is not None:
            same_hash.pop(handle, None)
            if not same_hash:
                del self._answers_by_hash[answer.hash_part]
        active = self._active.get(answer.hash_part)
        if answer.value is not None and active is not None and answer.demand is active.demand:
            active.demand.withdrawn(str(answer.fetcher))
            self._check(answer.hash_part)

    def _apply(self, active: _Active, answer: _Answer) -> None:
        """Count one answer for the demand of its hash."""
        if answer.value is None:
            self._declined(active.demand, answer)
        else:
            self._offered(active, answer)
        self._check(answer.hash_part)

    def _declined(self, demand: Demand, answer: _Answer) -> None:
        fetcher = str(answer.fetcher)
        if self._foreign(answer.hash_part, fetcher):
            return
        self.metrics.offers.labels(fetcher, "unavailable").inc()
        demand.declined(fetcher, str(answer.reason))

    def _offered(self, active: _Active, answer: _Answer) -> None:
        demand = active.demand
        hash_part = answer.hash_part
        fetcher = answer.fetcher
        if not isinstance(fetcher, str):
            log.warning("ignoring a malformed offer for %s: fetcher %r", hash_part, fetcher)
            return
        if self._foreign(hash_part, fetcher):
            return
        local = self.local_fetchers.get(fetcher)
        offer = local_offer(local, hash_part) if local is not None else None
        try:
            if offer is None:  # from elsewhere: decode (and so check) the dataspace's value
                offer = record_to_offer(Available.decode(answer.value))
        except ProtocolError as exc:
            log.warning("ignoring a malformed offer for %s: %s", hash_part, exc)
            return
        if self._opener(fetcher, offer.uri) is None:
            # Counting it would serve a narinfo whose NAR must fail, where a 404 lets Nix
            # fall back to its next substituter (e.g. file:// offered by a remote fetcher).
            log.warning("%s offers %s, which no installed plugin can open", fetcher, offer.uri)
            self.metrics.offers.labels(fetcher, "unopenable").inc()
            scheme = urlsplit(offer.uri).scheme
            demand.declined(fetcher, f"offered a {scheme}: URI, which this daemon does not open "
                                     f"for that fetcher (it opens: {', '.join(sorted(self.openers))})")
            return
        # Judged in a worker; until then the fetcher counts as not having answered.
        self._to_judge.append((active, answer, offer))
        if not self._judging:
            self._judge_next()

    def _judge_next(self) -> None:
        batch, self._to_judge = self._to_judge[:JUDGE_BATCH], self._to_judge[JUDGE_BATCH:]
        self._judging = bool(batch)
        if not batch:
            return
        if self._judge_pool is None:
            self._judge_pool = ThreadPoolExecutor(1, thread_name_prefix="substituter-trust")
        infos = [offer.info for _, _, offer in batch]
        future = self._judge_pool.submit(_judge_all, self.trust, infos)
        loop = asyncio.get_running_loop()

        def back(done: Future[list[Verdict]]) -> None:
            try:
                loop.call_soon_threadsafe(self._judged, batch, done)
            except RuntimeError:  # the loop closed meanwhile (shutdown): nobody is waiting
                pass

        future.add_done_callback(back)

    def _judged(self, batch: list[tuple[_Active, _Answer, Offer]], future: Future[list[Verdict]]) -> None:
        try:
            verdicts = future.result()
        except Exception as exc:  # a bug while judging: refuse them all rather than guess
            log.exception("judging %d offers", len(batch))
            verdicts = [Verdict(False, f"could not be judged: {exc}")] * len(batch)
        for (active, answer, offer), verdict in zip(batch, verdicts, strict=True):
            hash_part = answer.hash_part
            if answer.gone or self._active.get(hash_part) is not active or active.wants is None:
                continue  # withdrawn, or its demand went meanwhile
            fetcher = str(answer.fetcher)
            self.metrics.offers.labels(fetcher, "trusted" if verdict.trusted else "untrusted").inc()
            if not verdict.trusted:
                log.warning("%s offers %s, refused: %s", fetcher, offer.info.store_path, verdict.reason)
            active.demand.offered(fetcher, offer, verdict)
            answer.demand = active.demand
            self._check(hash_part)
        self._judge_next()

    def _deadline(self, hash_part: str, active: _Active) -> None:
        # Not `demand.pending`: a demand with no fetcher at all has none pending, yet is undecided.
        if self._active.get(hash_part) is active and not active.demand.decided:
            active.demand.deadline_passed()
            self._check(hash_part)

    def _maybe_expire(self, hash_part: str, active: _Active) -> None:
        if self._active.get(hash_part) is not active:
            return
        remaining = active.expires - time.monotonic()
        if remaining > 0 or active.waiters:
            turns.later(self.facet, max(remaining, 0.1), lambda: self._maybe_expire(hash_part, active))
            return
        del self._active[hash_part]
        self._prefetch_done(active)
        for handle in active.wants or ():
            turn.retract(handle)
        active.wants = None

    def _check(self, hash_part: str) -> None:
        active = self._active.get(hash_part)
        if active is None:
            return
        if active.prefetch and active.demand.decided:
            self._prefetch_done(active)
        if active.settling and not active.demand.pending:
            settling, active.settling = active.settling, []
            for s in settling:
                if not s.done():
                    s.set_result(None)
        if not active.waiters or not active.demand.decided:
            return
        resolution = self._resolution(active)
        waiters, active.waiters = active.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(resolution)

    # --- supply ----------------------------------------------------------------------------

    def _is_bad(self, hash_part: str, fetcher: str) -> bool:
        until = self._bad.get((hash_part, fetcher))
        return until is not None and until > time.monotonic()

    def sources(self, res: Resolution, exclude: set[str]) -> list[Source]:
        """How to open each trusted candidate, best first, without excluded or bad sources."""
        active = self._active.get(res.hash_part)
        candidates = self._resolution(active).candidates if active is not None else res.candidates
        info = res.info
        result = []
        for c in candidates:
            if c.fetcher in exclude or self._is_bad(res.hash_part, c.fetcher):
                continue
            if info is not None and (c.offer.info.nar_hash != info.nar_hash
                                     or c.offer.info.nar_size != info.nar_size):
                continue  # another NAR of the same path: its bytes cannot continue this one
            opener = self._opener(c.fetcher, c.offer.uri)
            if opener is None:
                log.warning("%s offers %s, which no installed plugin can open", c.fetcher, c.offer.uri)
                continue
            result.append(Source(c.fetcher, c.offer, opener))
        return result

    def _opener(self, fetcher: str, uri: str) -> Opener | None:
        local = self.local_fetchers.get(fetcher)
        if local is not None:
            return local.open
        return self.openers.get(urlsplit(uri).scheme)

    def events(self, res: Resolution) -> TransferEvents:
        """Callbacks asserting ``<transfer …>`` while bytes flow and ``<failed …>`` on failure."""
        state: dict[str, Any] = {"handle": None, "last": 0.0, "fetcher": None, "start": time.monotonic(),
                                 "bytes": 0, "asserted": False}
        total = res.info.nar_size if res.info is not None else 0

        def progress(fetcher: str, done: int, _total: int) -> None:
            now = time.monotonic()
            state["bytes"] = done
            if done == total and not state["asserted"]:
                # All of it in one step (a small NAR): never in flight for anyone to watch, and
                # asserting it only to retract it would cost two turns.
                state["fetcher"] = fetcher
                return
            if fetcher != state["fetcher"] or now - state["last"] >= PROGRESS_INTERVAL or done == total:
                state["fetcher"], state["last"], state["asserted"] = fetcher, now, True
                record = _transfer(res.hash_part, fetcher, done, total)
                self._external(lambda: state.__setitem__("handle", turn.replace(self.ds, state["handle"], record)))

        def failed(fetcher: str, reason: str, transient: bool) -> None:
            if not transient:
                now = time.monotonic()
                if len(self._bad) > 1024:
                    self._bad = {k: t for k, t in self._bad.items() if t > now}
                self._bad[(res.hash_part, fetcher)] = now + FAILURE_MEMORY
                self.metrics.verification_failures.labels(fetcher).inc()
                active = self._active.get(res.hash_part)
                if active is not None:
                    active.demand.excluded(fetcher, f"sent bad bytes: {reason}")
            self._external(lambda: self._assert_failure(res.hash_part, fetcher, reason, transient))

        def done() -> None:
            if state["fetcher"] is not None:
                self.stats.record(state["fetcher"], state["bytes"], time.monotonic() - state["start"])
                self.metrics.fetcher_bytes.labels(state["fetcher"]).inc(state["bytes"])
            if state["asserted"]:
                self._external(lambda: turn.retract(state["handle"]))

        verdict = res.verdict
        return TransferEvents(progress=progress, failed=failed, done=done,
                              content_hash=verdict.content_hash if verdict is not None else None)

    def _assert_failure(self, hash_part: str, fetcher: str, reason: str, transient: bool) -> None:
        """Assert the latest failure per (path, source) for a while; a repeat replaces it."""
        key = (hash_part, fetcher)
        previous = self._failures.pop(key, None)
        if previous is not None:
            turn.stop(previous)

        def boot() -> None:
            turn.publish(self.ds, Failed(hash_part, fetcher, reason, transient))

        facet = turn.facet(boot)
        self._failures[key] = facet

        def expire() -> None:
            if self._failures.get(key) is facet:
                del self._failures[key]
                turn.stop(facet)

        asyncio.get_running_loop().call_later(FAILURE_MEMORY, lambda: Turn.external(self.facet, expire))
