"""Deciding between offers for one demand: pure logic, no I/O, no Syndicate.

A :class:`Demand` is told which fetchers are live (with their priorities), then receives their
answers in any order.  It is *decided* as soon as the best answer is certain:

* a trusted offer, once every fetcher that could still beat it (a lower priority number) has
  answered or given up;
* "not found", once every live fetcher has answered without a trusted offer (with no fetcher
  known at all, only at the deadline: one may be attaching);
* at the deadline, whatever is best by then.

Ranking among trusted offers: fetcher priority, then the fetcher's measured speed (an EWMA of
throughput kept by :class:`FetcherStats`), then the offer's own cost estimate, then how fast the
fetcher answered this demand.  Untrusted offers are
kept only to explain a "not found".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .plugin import Offer
from .trust import Verdict

__all__ = ["Candidate", "Demand", "FetcherStats"]


@dataclass(frozen=True)
class Candidate:
    fetcher: str
    priority: int
    offer: Offer
    verdict: Verdict
    #: Seconds from the demand's start to this answer.
    latency: float


@dataclass
class FetcherStats:
    """Measured behaviour per fetcher, shared by all demands (throughput in bytes/s, EWMA)."""

    throughput: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.3

    def record(self, fetcher: str, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < 64 * 1024:
            return  # too small to say anything about throughput
        rate = nbytes / seconds
        old = self.throughput.get(fetcher)
        self.throughput[fetcher] = rate if old is None else old + self.alpha * (rate - old)

    def penalty(self, fetcher: str) -> float:
        """Smaller is better; unknown fetchers sort after measured fast ones but before slow ones."""
        rate = self.throughput.get(fetcher)
        return 1e-8 if rate is None else 1.0 / rate


class Demand:
    """The answers to one ``want``; see the module docstring for when it is decided."""

    def __init__(self, hash_part: str, live: dict[str, int], stats: FetcherStats | None = None) -> None:
        self.hash_part = hash_part
        self.started = time.monotonic()
        #: fetcher name -> priority, for fetchers that have not answered yet
        self.pending: dict[str, int] = dict(live)
        self.priorities: dict[str, int] = dict(live)
        self.trusted: dict[str, Candidate] = {}
        self.untrusted: dict[str, Candidate] = {}
        self.unavailable: dict[str, str] = {}
        self.stats = stats or FetcherStats()
        self.timed_out = False

    # --- inputs ---------------------------------------------------------------------------

    def fetcher_joined(self, name: str, priority: int) -> None:
        """A fetcher attached while the demand stands; it will answer, so wait for it too."""
        self.priorities[name] = priority
        if name not in self.trusted and name not in self.untrusted and name not in self.unavailable:
            self.pending[name] = priority

    def fetcher_left(self, name: str) -> None:
        self.pending.pop(name, None)
        self.trusted.pop(name, None)
        self.untrusted.pop(name, None)

    def offered(self, name: str, offer: Offer, verdict: Verdict) -> None:
        priority = self.priorities.get(name, self.pending.get(name, 50))
        candidate = Candidate(name, priority, offer, verdict, time.monotonic() - self.started)
        self.pending.pop(name, None)
        self.unavailable.pop(name, None)
        (self.trusted if verdict.trusted else self.untrusted)[name] = candidate

    def withdrawn(self, name: str) -> None:
        """The fetcher retracted its offer (it died, or the offer went stale)."""
        self.trusted.pop(name, None)
        self.untrusted.pop(name, None)

    def excluded(self, name: str, reason: str) -> None:
        """The fetcher's offer turned out bad (wrong bytes): it no longer counts, and the
        demand waits again for any fetcher still to answer that could replace it."""
        self.trusted.pop(name, None)
        self.pending.pop(name, None)
        self.unavailable[name] = reason

    def declined(self, name: str, reason: str) -> None:
        self.pending.pop(name, None)
        self.unavailable[name] = reason

    def deadline_passed(self) -> None:
        self.timed_out = True
        for name in list(self.pending):
            self.unavailable[name] = "no answer before the deadline"
        self.pending.clear()

    # --- outputs --------------------------------------------------------------------------

    def ranked(self) -> list[Candidate]:
        """Trusted candidates, best first."""
        return sorted(
            self.trusted.values(),
            key=lambda c: (c.priority, self.stats.penalty(c.fetcher), c.offer.cost, c.latency, c.fetcher),
        )

    @property
    def decided(self) -> bool:
        if not self.priorities and not self.timed_out:
            # No fetcher is known (yet): one may be attaching; wait for it until the deadline
            # rather than answer "not found", which Nix would cache for an hour.
            return False
        if not self.pending:
            return True
        best = self.ranked()
        if not best:
            return False
        # Certain once no pending fetcher has a strictly better priority.
        return min(self.pending.values()) > best[0].priority

    def explain_missing(self) -> str:
        """Why there is no trusted offer, for logs and 404 bodies."""
        parts = [f"{name}: {reason}" for name, reason in sorted(self.unavailable.items())]
        parts += [f"{c.fetcher}: offer refused, {c.verdict.reason}" for c in self.untrusted.values()]
        return "; ".join(parts) or "no fetchers are running"
