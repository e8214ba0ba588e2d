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
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from preserves import Record, preserve
from syndicate import patterns as P
from syndicate import turn
from syndicate.actor import Turn
from syndicate.dataspace import during

from .errors import ProtocolError
from .metrics import Metrics
from .nix.narinfo import NarInfo
from .plugin import Fetcher, Offer
from .protocol import Available, Failed, Intent, Transfer, Want, record_pattern
from .protocol import Fetcher as FetcherRecord
from .protocol import Unavailable as UnavailableRecord
from .ranking import Candidate, Demand, FetcherStats
from .records import record_to_offer
from .transfer import Source, TransferEvents
from .trust import TrustPolicy, Verdict

__all__ = ["Broker", "Resolution"]

log = logging.getLogger("substituter.broker")

Opener = Callable[[Offer, int], AsyncIterator[bytes]]

#: How long ``<failed …>`` stays asserted for status displays, and a bad source stays excluded.
FAILURE_MEMORY = 600.0
PROGRESS_INTERVAL = 0.5


# Per demand the broker asserts one want and two observers whose only variable part is the
# hash.  Encoding them through the schema classes cost more than the rest of a demand's turn,
# so each is encoded once, with a placeholder for the hash, and copied with the hash put in.
_HASH_SLOT = "\0hash-part\0"


def _fill(template: Any, hash_part: str) -> Any:
    if isinstance(template, Record):
        return Record(template.key, [_fill(f, hash_part) for f in template])
    if isinstance(template, dict):
        return {k: _fill(v, hash_part) for k, v in template.items()}
    if isinstance(template, tuple):
        return tuple(_fill(v, hash_part) for v in template)
    if isinstance(template, str) and template == _HASH_SLOT:
        return hash_part
    return template


_WANT = {intent: preserve(Want(_HASH_SLOT, Intent.fetch() if intent == "fetch" else Intent.query()))
         for intent in ("fetch", "query")}
_OFFERS = preserve(P.bind(record_pattern(Available, hash=_HASH_SLOT)))
_DECLINES = preserve(record_pattern(UnavailableRecord, hash=_HASH_SLOT, fetcher=P.CAPTURE, reason=P.CAPTURE))


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
        same = [c for c in self.candidates if c.offer.info.nar_hash.nix32() == nar_hash]
        return Resolution(self.hash_part, same, self.reason if same else f"no trusted offer of NAR {nar_hash}")


@dataclass
class _Active:
    demand: Demand
    intent: str = "query"
    facet: Any = None
    waiters: list[asyncio.Future[Resolution]] = field(default_factory=list)
    expires: float = 0.0


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
        self.metrics = metrics or Metrics()
        self.stats = FetcherStats()
        self.live: dict[str, int] = {}
        self._live_count: dict[str, int] = {}
        self._active: dict[str, _Active] = {}
        self._bad: dict[tuple[str, str], float] = {}
        self._failures: dict[tuple[str, str], Any] = {}
        #: (hash, fetcher) answers made by this process's own fetcher hosts.  An answer in the
        #: dataspace that names a local fetcher but is not in here was asserted by someone else
        #: under that name, and is ignored: it must neither be opened with the local fetcher's
        #: session nor cut a demand short.
        self.local_answers = local_answers if local_answers is not None else set()
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

    def _external(self, action: Callable[[], None]) -> None:
        Turn.external(self.facet, action)

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
        if active is None:
            active = _Active(Demand(hash_part, dict(self.live), self.stats), intent)
            self._active[hash_part] = active
            active.waiters.append(future)
            self._external(lambda: self._start(hash_part, active, intent))
        else:
            active.waiters.append(future)
        try:
            # The demand's own deadline normally decides it; this bounds the wait even when a
            # fetcher attaching after that deadline keeps it open.
            return await asyncio.wait_for(asyncio.shield(future), self.locate_timeout + 1.0)
        except TimeoutError:
            if future in active.waiters:
                active.waiters.remove(future)
            return self._resolution(active)

    def _upgrade(self, hash_part: str, active: _Active) -> None:
        """The NAR is now needed too: say so (fetchers may prepare, e.g. warm a mirror)."""
        active.intent = "fetch"

        def publish() -> None:
            if active.facet is not None and active.facet.alive:
                turn.run(active.facet, lambda: turn.publish(self.ds, _fill(_WANT["fetch"], hash_part)))

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

        def facet_boot() -> None:
            turn.publish(self.ds, _fill(_WANT[intent if intent == "fetch" else "query"], hash_part))

            @during(self.ds, _fill(_OFFERS, hash_part))
            def offered(value: Any) -> Any:
                try:
                    record = Available.decode(value)
                    offer = record_to_offer(record)
                except ProtocolError as exc:
                    log.warning("ignoring a malformed offer for %s: %s", hash_part, exc)
                    return None
                if self._foreign(hash_part, record.fetcher):
                    return None
                if self._opener(record.fetcher, offer.uri) is None:
                    # Counting it would serve a narinfo whose NAR must fail, where a 404 lets Nix
                    # fall back to its next substituter (e.g. file:// offered by a remote fetcher).
                    log.warning("%s offers %s, which no installed plugin can open", record.fetcher, offer.uri)
                    self.metrics.offers.labels(record.fetcher, "unopenable").inc()
                    scheme = urlsplit(offer.uri).scheme
                    demand.declined(record.fetcher, f"offered a {scheme}: URI, which this daemon does not open "
                                                    f"for that fetcher (it opens: {', '.join(sorted(self.openers))})")
                    self._check(hash_part)
                    return None
                verdict = self.trust.judge(offer.info)
                self.metrics.offers.labels(record.fetcher, "trusted" if verdict.trusted else "untrusted").inc()
                if not verdict.trusted:
                    log.warning("%s offers %s, refused: %s", record.fetcher, offer.info.store_path, verdict.reason)
                demand.offered(record.fetcher, offer, verdict)
                self._check(hash_part)

                def withdrawn() -> None:
                    demand.withdrawn(record.fetcher)
                    self._check(hash_part)

                return withdrawn

            @during(self.ds, _fill(_DECLINES, hash_part))
            def declined(fetcher: Any, reason: Any) -> None:
                if self._foreign(hash_part, str(fetcher)):
                    return
                self.metrics.offers.labels(str(fetcher), "unavailable").inc()
                demand.declined(str(fetcher), str(reason))
                self._check(hash_part)

        active.facet = turn.facet(facet_boot)
        active.expires = time.monotonic() + self.linger
        loop = asyncio.get_running_loop()
        loop.call_later(self.locate_timeout, lambda: self._external(lambda: self._deadline(hash_part, active)))
        loop.call_later(self.linger, lambda: self._external(lambda: self._maybe_expire(hash_part, active)))
        self._check(hash_part)

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
            asyncio.get_running_loop().call_later(
                max(remaining, 0.1), lambda: self._external(lambda: self._maybe_expire(hash_part, active))
            )
            return
        del self._active[hash_part]
        if active.facet is not None:
            turn.stop(active.facet)

    def _check(self, hash_part: str) -> None:
        active = self._active.get(hash_part)
        if active is None or not active.waiters or not active.demand.decided:
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
                                 "bytes": 0}
        total = res.info.nar_size if res.info is not None else 0

        def progress(fetcher: str, done: int, _total: int) -> None:
            now = time.monotonic()
            state["bytes"] = done
            if fetcher != state["fetcher"] or now - state["last"] >= PROGRESS_INTERVAL or done == total:
                state["fetcher"], state["last"] = fetcher, now
                record = Transfer(res.hash_part, fetcher, done, total)
                self._external(lambda: state.__setitem__("handle", turn.replace(self.ds, state["handle"], record)))

        def failed(fetcher: str, reason: str, transient: bool) -> None:
            if not transient:
                now = time.monotonic()
                if len(self._bad) > 1024:
                    self._bad = {k: t for k, t in self._bad.items() if t > now}
                self._bad[(res.hash_part, fetcher)] = now + FAILURE_MEMORY
                self.metrics.verification_failures.labels(fetcher).inc()
            self._external(lambda: self._assert_failure(res.hash_part, fetcher, reason, transient))

        def done() -> None:
            if state["fetcher"] is not None:
                self.stats.record(state["fetcher"], state["bytes"], time.monotonic() - state["start"])
                self.metrics.fetcher_bytes.labels(state["fetcher"]).inc(state["bytes"])
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
