"""Prometheus metrics of one daemon (its own registry, so several daemons can share a process).

``Metrics(enabled=False)`` keeps the same attributes as no-ops and never imports
prometheus_client: a one-off ``fetch`` exposes no metrics and is spared its start-up cost.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Metrics"]


class _Off:
    """Stands for any counter or histogram (and its labelled children) when metrics are off."""

    def labels(self, *_values: str) -> _Off:
        return self

    def inc(self, _amount: float = 1) -> None:
        pass

    def observe(self, _value: float) -> None:
        pass


_OFF = _Off()


class Metrics:
    registry: Any
    narinfo_requests: Any
    narinfo_latency: Any
    offers: Any
    fetcher_bytes: Any
    verification_failures: Any
    nar_bytes: Any
    nar_failures: Any
    nar_seconds: Any

    def __init__(self, enabled: bool = True) -> None:
        if not enabled:
            self.registry = None
            for name in ("narinfo_requests", "narinfo_latency", "offers", "fetcher_bytes",
                         "verification_failures", "nar_bytes", "nar_failures", "nar_seconds"):
                setattr(self, name, _OFF)
            return
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.narinfo_requests = Counter(
            "substituter_narinfo_requests", "narinfo requests by result", ["result"], registry=r
        )
        self.narinfo_latency = Histogram(
            "substituter_narinfo_seconds", "time to answer a narinfo request", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.offers = Counter(
            "substituter_offers", "answers from fetchers by fetcher and kind of answer",
            ["fetcher", "answer"], registry=r,
        )
        self.fetcher_bytes = Counter(
            "substituter_fetcher_bytes", "NAR bytes received per fetcher", ["fetcher"], registry=r
        )
        self.verification_failures = Counter(
            "substituter_verification_failures", "sources that sent bytes not matching the signed hash",
            ["fetcher"], registry=r,
        )
        self.nar_bytes = Counter("substituter_nar_bytes_served", "NAR bytes served", registry=r)
        self.nar_failures = Counter(
            "substituter_nar_failures", "NAR responses aborted because no source could finish",
            registry=r,
        )
        self.nar_seconds = Histogram(
            "substituter_nar_seconds", "time to serve a NAR", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )
