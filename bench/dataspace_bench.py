"""Dataspace throughput and want -> available round-trip latency.

    .venv/bin/python bench/dataspace_bench.py [--events 200000] [--round-trips 5000]

Measured per *target* (how a client reaches a dataspace), each a ``Target`` in ``TARGETS``
(a function that hands a dataspace ref to a continuation, inside a turn):

  in-process        the embedded ``Dataspace`` in the same actor system
  relay             the embedded ``Dataspace`` served by ``substituter.dataspace.relay`` in
                    another process, reached over its unix socket with a sturdy ref
  syndicate-server  a real syndicate-server (if on PATH or ~/.cargo/bin), unix socket

Over a socket the requester and the fetcher share one connection, so a round trip crosses it
four times (want out, want in to the fetcher, available out, available in). Three figures:

  index       assert+retract events/s straight into ``Index`` (no turns): the matching cost
  turns       assert+retract events/s published by an actor through syndicate-py turns, each
              matched by one observer of ``<want ?h _>`` (so each also produces an event)
  round trip  a requester asserts ``<want h fetch>`` and waits (``during``) for
              ``<available h ...>``, which a fetcher actor observing ``<want ?h _>`` asserts;
              p50 / p99 of that, one request at a time, and the CPU time each round trip
              cost this process and the server process (steadier than latency on a
              shared machine)

Targets: >= 100k events/s in process, round trip p50 <= 0.2 ms in process and <= 1 ms over
the relay. Not a test: it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import syndicate.patterns as P  # noqa: E402
from preserves import Embedded, ImmutableDict, Record, Symbol, preserve  # noqa: E402
from syndicate import actor, turn  # noqa: E402
from syndicate import dataspace as syndicate_dataspace  # noqa: E402
from syndicate.during import During  # noqa: E402

from substituter.dataspace import Dataspace  # noqa: E402
from substituter.dataspace.connect import connect  # noqa: E402
from substituter.dataspace.gatekeeper import mint  # noqa: E402
from substituter.dataspace.index import Index, analyse, freeze  # noqa: E402

WANT = Symbol("want")
AVAILABLE = Symbol("available")
FETCH = Symbol("fetch")
_OBSERVE = Symbol("Observe")
_GROUP = Symbol("group")
_REC = Symbol("rec")
_LIT = Symbol("lit")
_DISCARD = Record(Symbol("_"), ())


def available_pattern(h: str) -> Any:
    """``P.rec("available", P.lit(h), P._, P._)`` as the plain value it is published as.

    Built directly, as a client that fills in prebuilt patterns does: through syndicate-py's
    pattern schema objects every request paid ~0.3 ms of schema encoding in this process.
    """
    return Record(_GROUP, (Record(_REC, (AVAILABLE,)),
                           ImmutableDict({0: Record(_LIT, (h,)), 2: _DISCARD})))


def during_value(ds: Any, pattern: Any) -> Callable[[Callable[..., Any]], Any]:
    """``syndicate.dataspace.during`` for a pattern that is already a plain value."""
    def decorate(on_add: Callable[..., Any]) -> Any:
        entity = During().add_handler(on_add)
        turn.publish(ds, Record(_OBSERVE, (pattern, Embedded(turn.ref(entity)))))
        return entity
    return decorate

Target = Callable[[Callable[[Any], None]], None]
"""Called inside a turn; calls its argument, in some later turn, with a dataspace ref."""


def in_process(then: Callable[[Any], None]) -> None:
    """The embedded dataspace, in an actor of its own."""
    receiver_facet = turn.active_facet()

    class Receiver(actor.Entity):
        def on_message(self, v: Any) -> None:
            then(v.embeddedValue)

    receiver = turn.ref(Receiver())

    def boot() -> None:
        turn.prevent_inert_check()
        turn.send(receiver, Embedded(turn.ref(Dataspace())))

    assert receiver_facet.alive
    turn.spawn(boot, name="dataspace", daemon=True)


RELAY_SERVER_SCRIPT = r"""
import asyncio, sys
from pathlib import Path
from syndicate import actor, turn
from substituter.dataspace import Dataspace
from substituter.dataspace.relay import serve_dataspace

def boot():
    listener = serve_dataspace(turn.ref(Dataspace()), bytes.fromhex(sys.argv[2]),
                               unix_path=Path(sys.argv[1]))

    @turn.linked_task()
    async def announce(facet):
        await listener.ready
        print("ready", flush=True)
        return True

actor.System(loop=asyncio.new_event_loop()).run(boot, configure_logging=False)
"""

_children: list[subprocess.Popen[bytes]] = []
#: Server processes the current target runs on, for CPU time per round trip.
_server_pids: list[int] = []


def _cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of these processes so far (from /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


@atexit.register
def _stop_children() -> None:
    for child in _children:
        child.terminate()
        child.wait()


def _connected(addr: str, cap: str, then: Callable[[Any], None]) -> None:
    connect(addr, cap)(then)


def relay(then: Callable[[Any], None]) -> None:
    """The embedded dataspace behind the relay, in a server process of its own."""
    key = os.urandom(32)
    socket_path = Path(tempfile.mkdtemp(prefix="relay-bench-")) / "ds.sock"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    server = subprocess.Popen(
        [sys.executable, "-c", RELAY_SERVER_SCRIPT, str(socket_path), key.hex()],
        stdout=subprocess.PIPE, env=env,
    )
    _children.append(server)
    _server_pids[:] = [server.pid]
    assert server.stdout is not None
    if server.stdout.readline().strip() != b"ready":  # blocks this turn once, at start-up
        raise RuntimeError("relay server process did not start")
    _connected(f'<unix "{socket_path}">', mint(key, "substituter"), then)


def syndicate_server(then: Callable[[Any], None]) -> None:
    """A real syndicate-server, configured like the tests' one."""
    from tests.syndicate_server import SyndicateServer

    executable = shutil.which("syndicate-server") or str(
        Path.home() / ".cargo" / "bin" / "syndicate-server")
    server = SyndicateServer(Path(tempfile.mkdtemp(prefix="syndicate-bench-")), executable)
    server.start()
    atexit.register(server.stop)
    if server._process is not None:
        _server_pids[:] = [server._process.pid]
    _connected(server.unix_addr, server.cap, then)


TARGETS: dict[str, Target] = {
    "in-process": in_process,
    "relay": relay,
    "syndicate-server": syndicate_server,
}


def run_system(boot: Callable[[], None]) -> None:
    actor.System(loop=asyncio.new_event_loop()).run(boot, configure_logging=False)


# --------------------------------------------------------------------------- index only


class _CountingDelivery:
    def __init__(self) -> None:
        self.events = 0

    def assert_captures(self, observer: Any, captures: tuple[Any, ...]) -> Any:
        self.events += 1
        return captures

    def retract_captures(self, handle: Any) -> None:
        self.events += 1

    def send_captures(self, observer: Any, captures: tuple[Any, ...]) -> None:
        self.events += 1


def bench_index(events: int) -> float:
    """Assert+retract events per second straight into the index, 100 other observers."""
    delivery = _CountingDelivery()
    index = Index(delivery)
    index.add_observer("want", analyse(P.rec("want", P.CAPTURE, P._)), object())
    for i in range(100):  # observers of another shape must not slow wants down
        index.add_observer(("av", i), analyse(P.rec("available", P.lit(f"h{i}"), P.CAPTURE)), i)
    values = [Record(WANT, [f"{i:032d}", FETCH]) for i in range(events // 2)]
    start = time.perf_counter()
    frozen = [freeze(v) for v in values]
    for value in frozen:
        index.insert(value)
    for value in frozen:
        index.remove(value)
    elapsed = time.perf_counter() - start
    assert delivery.events == events // 2 * 2, delivery.events
    return (events // 2 * 2) / elapsed


# --------------------------------------------------------------------------- through turns


def bench_turns(target: Target, events: int, batch: int = 1000) -> float:
    """Assert+retract events per second published through turns to the dataspace."""
    seen = [0]
    result: list[float] = []

    class Counter(actor.Entity):
        def on_publish(self, v: Any, handle: Any) -> None:
            seen[0] += 1

        def on_retract(self, handle: Any) -> None:
            seen[0] += 1

    def boot() -> None:
        turn.prevent_inert_check()

        def start(ds: Any) -> None:
            counter = turn.ref(Counter())
            turn.publish(ds, syndicate_dataspace.dataspace.Observe(
                P.rec("want", P.CAPTURE, P._), counter))
            rounds = max(1, events // (2 * batch))
            began = [0.0]

            def run_round(n: int) -> None:
                if n == rounds:
                    elapsed = time.perf_counter() - began[0]
                    result.append(rounds * batch * 2 / elapsed)
                    assert seen[0] == rounds * batch * 2, seen[0]
                    turn.stop_actor()
                    return
                handles = [turn.publish(ds, Record(WANT, [f"{n}-{i}", FETCH]))
                           for i in range(batch)]

                def retract_all() -> None:
                    for handle in handles:
                        turn.retract(handle)
                    turn.sync(ds, lambda: turn.sync(counter, lambda: run_round(n + 1)))

                turn.sync(ds, retract_all)

            def go() -> None:
                began[0] = time.perf_counter()
                run_round(0)

            turn.sync(ds, lambda: turn.sync(counter, go))

        target(start)

    run_system(boot)
    return result[0]


# --------------------------------------------------------------------------- round trip


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    count: int
    client_cpu_us: float  # CPU per round trip in this process (requester and fetcher)
    server_cpu_us: float  # CPU per round trip in the server process, if any




def bench_round_trip(target: Target, count: int) -> Latency:
    samples: list[float] = []
    cpu_start: list[float] = []
    cpu_end: list[float] = []
    _server_pids.clear()

    def cpu_now() -> list[float]:
        return [time.process_time(), _cpu_seconds(_server_pids)]

    def boot() -> None:
        turn.prevent_inert_check()

        def start(ds: Any) -> None:
            def fetcher() -> None:
                @syndicate_dataspace.during(ds, P.rec("want", P.CAPTURE, P._))
                def _(h: str) -> None:
                    turn.publish(ds, Record(AVAILABLE, [h, "bench", f"file:///{h}"]))

            class Next(actor.Entity):
                """Starts each request from this long-lived facet, not inside the last one."""

                def on_message(self, n: Any) -> None:
                    request(ds, n, next_request)

            next_request = turn.ref(Next())
            turn.spawn(fetcher, name="fetcher", daemon=True)
            # let the fetcher's interest land before the first request
            turn.sync(ds, lambda: turn.sync(ds, lambda: request(ds, 0, next_request)))

        def request(ds: Any, n: int, next_request: Any) -> None:
            if n == 0:
                cpu_start[:] = cpu_now()
            if n == count:
                cpu_end[:] = cpu_now()
                turn.stop_actor()
                return
            h = f"{n:032d}"
            began = time.perf_counter()

            @turn.facet
            def waiting() -> None:
                turn.publish(ds, Record(WANT, [h, FETCH]))

                @during_value(ds, available_pattern(h))
                def _() -> None:
                    samples.append(time.perf_counter() - began)
                    turn.stop(waiting)  # retracts the want and the interest
                    turn.send(next_request, n + 1)

        target(start)

    run_system(boot)
    samples.sort()
    return Latency(
        p50_ms=statistics.median(samples) * 1000,
        p99_ms=samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000,
        count=len(samples),
        client_cpu_us=(cpu_end[0] - cpu_start[0]) / count * 1e6,
        server_cpu_us=(cpu_end[1] - cpu_start[1]) / count * 1e6,
    )


def main() -> None:
    assert preserve(P.rec("available", P.lit("h"), P._, P._)) == available_pattern("h")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--round-trips", type=int, default=5_000)
    parser.add_argument("--target", choices=sorted(TARGETS), action="append")
    args = parser.parse_args()

    print(f"index only:   {bench_index(args.events):>12,.0f} assert+retract events/s")
    chosen = args.target or [
        name for name in TARGETS
        if name != "syndicate-server" or shutil.which("syndicate-server")
        or (Path.home() / ".cargo" / "bin" / "syndicate-server").exists()
    ]
    for name in chosen:
        target = TARGETS[name]
        rate = bench_turns(target, args.events)
        latency = bench_round_trip(target, args.round_trips)
        print(f"{name}: turns {rate:>12,.0f} events/s   round trip p50 {latency.p50_ms:.3f} ms"
              f"  p99 {latency.p99_ms:.3f} ms  ({latency.count} requests)"
              f"  CPU per round trip: here {latency.client_cpu_us:.0f} us,"
              f" server {latency.server_cpu_us:.0f} us")


if __name__ == "__main__":
    main()
