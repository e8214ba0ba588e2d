from __future__ import annotations

import subprocess
import sys

from substituter.metrics import Metrics


def test_metrics_off_take_the_same_calls_and_never_import_prometheus() -> None:
    code = (
        "import sys\n"
        "from substituter.metrics import Metrics\n"
        "m = Metrics(enabled=False)\n"
        "m.offers.labels('a', 'trusted').inc(); m.fetcher_bytes.labels('a').inc(10)\n"
        "m.narinfo_latency.observe(0.1); m.nar_bytes.inc(5); m.nar_seconds.observe(1)\n"
        "assert m.registry is None\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metrics_on_are_counted_in_their_own_registry() -> None:
    from prometheus_client import generate_latest

    a, b = Metrics(), Metrics()
    a.offers.labels("mirror", "trusted").inc()
    assert b'substituter_offers_total{answer="trusted",fetcher="mirror"} 1.0' in generate_latest(a.registry)
    assert b'fetcher="mirror"' not in generate_latest(b.registry)
