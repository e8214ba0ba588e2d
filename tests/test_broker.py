"""The broker and fetcher hosts over a real embedded dataspace, with function-backed fetchers."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from preserves import preserve
from syndicate import actor, turn

from substituter.broker import Broker, Resolution, _transfer, _want
from substituter.dataspace.barrier import barrier
from substituter.dataspace.dataspace import Dataspace
from substituter.fetcher_host import FetcherHost, available_value
from substituter.plugin import FunctionFetcher, Offer, Unavailable
from substituter.protocol import Intent, Transfer, Want
from substituter.protocol import Unavailable as UnavailableRecord
from substituter.records import offer_to_record
from substituter.trust import TrustPolicy

from .helpers import KEY, OTHER_KEY, make_info, make_nar, serve_bytes

H = "0" * 32
TRUST = TrustPolicy([str(KEY.public_key())])


def run_with_broker(fetchers: list[FunctionFetcher], scenario: Callable[[Broker, Any], Awaitable[None]],
                    locate_timeout: float = 1.0, linger: float = 60.0,
                    openers: dict[str, Any] | None = None) -> None:
    """Boot a dataspace, hosts for ``fetchers`` and a broker; run ``scenario``; fail on its error."""
    loop = asyncio.new_event_loop()
    outcome: dict[str, BaseException | None] = {"error": None}

    def boot() -> None:
        ds = turn.ref(Dataspace())
        local_answers: set[tuple[str, str]] = set()
        broker = Broker(ds, TRUST, locate_timeout=locate_timeout, linger=linger, openers=openers,
                        local_fetchers={f.name: f for f in fetchers if not f.name.startswith("remote-")},
                        local_answers=local_answers)
        broker.boot()
        for f in fetchers:
            host = FetcherHost(f, ds, locate_timeout=locate_timeout,
                               local_answers=None if f.name.startswith("remote-") else local_answers)
            turn.facet(host.boot)
        root = turn.active_facet()

        synced = asyncio.get_running_loop().create_future()
        barrier(ds, lambda: synced.set_result(None))  # the broker has seen every <fetcher>

        @turn.linked_task()
        async def main(_facet: Any) -> None:
            await synced
            try:
                await asyncio.wait_for(scenario(broker, root), 20)
            except BaseException as exc:  # reported to the test below
                outcome["error"] = exc
            turn.external(root, lambda: turn.stop_actor())

    actor.System(loop=loop).run(boot, configure_logging=False)
    loop.close()
    if outcome["error"] is not None:
        raise outcome["error"]


def offering(name: str, info: Any, delay: float = 0.0, priority: int = 50,
             calls: list[tuple[str, float]] | None = None) -> FunctionFetcher:
    async def locate(hash_part: str) -> Offer | Unavailable:
        if calls is not None:
            calls.append((name, time.monotonic()))
        await asyncio.sleep(delay)
        return Offer(info, f"test://{name}")

    return FunctionFetcher(name, locate, serve_bytes(b""), priority=priority)


def declining(name: str, delay: float = 0.0, priority: int = 50) -> FunctionFetcher:
    async def locate(hash_part: str) -> Offer | Unavailable:
        await asyncio.sleep(delay)
        return Unavailable("404 (test)")

    return FunctionFetcher(name, locate, serve_bytes(b""), priority=priority)


def test_best_priority_wins_and_all_are_asked_at_once(tmp_path: Path) -> None:
    info = make_info(make_nar(tmp_path, 1000))
    calls: list[tuple[str, float]] = []
    fetchers = [offering("slow-good", info, 1.0, 10, calls), offering("fast-worse", info, 1.0, 50, calls)]

    async def scenario(broker: Broker, _root: Any) -> None:
        res = await broker.resolve(H)
        assert [c.fetcher for c in res.candidates][0] == "slow-good"
        times = [t for _n, t in calls]
        assert max(times) - min(times) < 0.5  # asked in parallel: one after another would be >= 1 s

    run_with_broker(fetchers, scenario, locate_timeout=5.0)


def test_answer_does_not_wait_for_worse_fetchers(tmp_path: Path) -> None:
    info = make_info(make_nar(tmp_path, 1000))
    fetchers = [offering("best", info, 0.0, 10), offering("hanging", info, 30.0, 90)]

    async def scenario(broker: Broker, _root: Any) -> None:
        started = time.monotonic()
        res = await broker.resolve(H)
        assert res.candidates[0].fetcher == "best"
        assert time.monotonic() - started < 2.5  # not the 5 s deadline

    run_with_broker(fetchers, scenario, locate_timeout=5.0)


def test_not_found_as_soon_as_all_declined(tmp_path: Path) -> None:
    async def scenario(broker: Broker, _root: Any) -> None:
        started = time.monotonic()
        res: Resolution = await broker.resolve(H)
        assert res.info is None and "404 (test)" in res.reason
        assert time.monotonic() - started < 2.5  # not the 5 s deadline

    run_with_broker([declining("a"), declining("b", 0.05)], scenario, locate_timeout=5.0)


def test_hanging_fetcher_is_bounded_by_the_deadline(tmp_path: Path) -> None:
    async def scenario(broker: Broker, _root: Any) -> None:
        started = time.monotonic()
        res = await broker.resolve(H)
        assert res.info is None and "no answer" in res.reason
        assert 0.3 < time.monotonic() - started < 3

    info = make_info(make_nar(tmp_path, 1000))
    run_with_broker([declining("a"), offering("stuck", info, 60.0)], scenario, locate_timeout=0.5)


def test_untrusted_offers_are_never_chosen(tmp_path: Path) -> None:
    nar = make_nar(tmp_path, 1000)
    forged = make_info(nar, key=OTHER_KEY)

    async def scenario(broker: Broker, _root: Any) -> None:
        res = await broker.resolve(H)
        assert res.info is None and "other-key-1" in res.reason

    run_with_broker([offering("forger", forged)], scenario)


def test_garbage_hash_and_crashing_plugin_become_unavailable(tmp_path: Path) -> None:
    async def boom(hash_part: str) -> Offer | Unavailable:
        raise RuntimeError("plugin bug")

    async def scenario(broker: Broker, _root: Any) -> None:
        res = await broker.resolve(H)
        assert res.info is None and "plugin bug" in res.reason

    run_with_broker([FunctionFetcher("buggy", boom, serve_bytes(b""))], scenario)


def test_answers_under_a_local_fetchers_name_from_elsewhere_are_ignored(tmp_path: Path) -> None:
    """A peer on the dataspace cannot speak for an in-process fetcher (and so cannot have its
    URIs opened with that fetcher's session, or cut a demand short with a fake 'unavailable')."""
    nar = make_nar(tmp_path, 1000)
    info = make_info(nar)

    async def scenario(broker: Broker, root: Any) -> None:
        # An impostor answers first, under the local fetcher's name, from outside its host.
        turn.external(root, lambda: turn.publish(broker.ds, UnavailableRecord(H, "cache", "spoofed 404")))
        turn.external(root, lambda: turn.publish(broker.ds, offer_to_record(H, "cache", Offer(info, "https://evil/x"))))
        res = await broker.resolve(H)
        assert [c.offer.uri for c in res.candidates] == ["test://cache"]

    run_with_broker([offering("cache", info, 0.3)], scenario, locate_timeout=5.0)


def test_sources_never_mix_two_nars_of_one_path(tmp_path: Path) -> None:
    a = make_info(make_nar(tmp_path, 1000, "a"))
    b = make_info(make_nar(tmp_path, 2000, "b"))  # same store path, another build

    async def scenario(broker: Broker, _root: Any) -> None:
        res = await broker.resolve(H)
        assert {c.fetcher for c in res.candidates} == {"one", "two"}
        best = res.candidates[0]
        sources = broker.sources(res, set())
        assert [s.fetcher for s in sources] == [best.fetcher]
        other = "two" if best.fetcher == "one" else "one"
        other_hash = (b if best.fetcher == "one" else a).nar_hash.nix32()
        assert [c.fetcher for c in res.for_nar(other_hash).candidates] == [other]

    run_with_broker([offering("one", a, 0.0, 10), offering("two", b, 0.0, 10)], scenario)


def test_records_built_by_hand_are_the_schema_encoding(tmp_path: Path) -> None:
    """The broker and the hosts build <want>, <available> and <unavailable> directly; a peer
    decoding them with the schema must see the same values."""
    nar = make_nar(tmp_path, 1000)
    refs = ["1" * 32 + "-dep", "2" * 32 + "-other"]
    plain = make_info(nar)
    full = dataclasses.replace(make_info(nar, references=refs), deriver="3" * 32 + "-x.drv",
                               ca="fixed:r:sha256:" + "4" * 52)
    for info in (plain, full):
        record = offer_to_record(H, "cache", Offer(info, "https://c/x", "zstd", 77, None, 5))
        assert available_value(record) == preserve(record)
    assert _want(H, "fetch") == preserve(Want(H, Intent.fetch()))
    assert _want(H, "query") == preserve(Want(H, Intent.query()))
    assert _transfer(H, "cache", 10, 20) == preserve(Transfer(H, "cache", 10, 20))


def test_offers_made_before_the_demand_count_and_withdrawn_ones_go(tmp_path: Path) -> None:
    """Answers are watched for every hash at once: one already in the dataspace (a peer answering
    someone else's want) counts when the demand starts; its retraction removes it again."""
    info = make_info(make_nar(tmp_path, 1000))

    async def scenario(broker: Broker, root: Any) -> None:
        handle: dict[str, Any] = {}

        def publish() -> None:
            handle["peer"] = turn.publish(broker.ds, preserve(offer_to_record(H, "peer", Offer(info, "test://peer"))))

        turn.external(root, publish)
        await asyncio.sleep(0.05)
        res = await broker.resolve(H)
        assert {c.fetcher for c in res.candidates} == {"peer", "local"}
        turn.external(root, lambda: turn.retract(handle["peer"]))
        await asyncio.sleep(0.05)
        assert [c.fetcher for c in (await broker.resolve(H)).candidates] == ["local"]

    run_with_broker([offering("local", info, 0.2)], scenario, openers={"test": serve_bytes(b"")})


def test_an_expired_demand_is_asked_again(tmp_path: Path) -> None:
    """After ``linger`` the want is retracted (the hosts drop their answers); the next resolve
    asks the fetchers again rather than reusing a stale answer."""
    info = make_info(make_nar(tmp_path, 1000))
    calls: list[tuple[str, float]] = []

    async def scenario(broker: Broker, _root: Any) -> None:
        assert (await broker.resolve(H)).info is not None
        assert (await broker.resolve(H, "fetch")).info is not None  # upgraded, not asked again
        assert len(calls) == 1
        await asyncio.sleep(0.6)
        assert H not in broker._active and not broker._answers, "want and answer retracted"
        assert (await broker.resolve(H)).info is not None
        assert len(calls) == 2

    run_with_broker([offering("cache", info, 0.0, calls=calls)], scenario, linger=0.3)


def test_prefetch_resolves_everything_a_few_at_a_time_and_asked_paths_go_first(tmp_path: Path) -> None:
    from substituter.broker import PREFETCH_CONCURRENCY

    hashes = [f"{i:032d}" for i in range(300)]
    infos = {h: make_info(make_nar(tmp_path / h, 100), hash_part=h) for h in hashes}
    running = {"now": 0, "most": 0}
    asked: list[str] = []

    async def locate(hash_part: str) -> Offer | Unavailable:
        asked.append(hash_part)
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        await asyncio.sleep(0.01)
        running["now"] -= 1
        return Offer(infos[hash_part], "test://slow")

    fetcher = FunctionFetcher("slow", locate, serve_bytes(b""))

    async def scenario(broker: Broker, _root: Any) -> None:
        assert broker.prefetch(hashes) == len(hashes)
        last = hashes[-1]
        started = time.monotonic()
        res = await broker.resolve(last, "query")  # asked now: not queued behind 99 others
        assert res.info is not None and time.monotonic() - started < 0.5
        assert asked.index(last) < PREFETCH_CONCURRENCY + 1
        for h in hashes:  # everything gets resolved, each once
            assert (await broker.resolve(h, "query")).info is not None
        assert sorted(asked) == sorted(hashes)
        assert running["most"] <= PREFETCH_CONCURRENCY + 1

    run_with_broker([fetcher], scenario)


def test_few_prefetches_start_while_a_client_waits(tmp_path: Path) -> None:
    """New prefetches would take the fetchers' connections ahead of the path a client waits
    for: while it waits, one starts only when fewer than PREFETCH_CONCURRENCY_ASKED run."""
    from substituter.broker import PREFETCH_CONCURRENCY, PREFETCH_CONCURRENCY_ASKED

    hashes = [f"{i:032d}" for i in range(400)]
    infos = {h: make_info(make_nar(tmp_path / h, 100), hash_part=h) for h in hashes}
    running = {"now": 0}
    started: list[tuple[float, int]] = []  # (when, prefetches running with it)

    async def locate(hash_part: str) -> Offer | Unavailable:
        asked = hash_part == hashes[-1]
        if not asked:
            running["now"] += 1
            started.append((time.monotonic(), running["now"]))
        await asyncio.sleep(0.05 if asked else 0.01)
        if not asked:
            running["now"] -= 1
        return Offer(infos[hash_part], "test://slow")

    fetcher = FunctionFetcher("slow", locate, serve_bytes(b""))

    async def scenario(broker: Broker, _root: Any) -> None:
        broker.prefetch(hashes)
        for _ in range(5000):  # the first prefetches are under way, at full width
            if len(started) >= PREFETCH_CONCURRENCY:
                break
            await asyncio.sleep(0.001)
        asked_at = time.monotonic()
        assert (await broker.resolve(hashes[-1], "query")).info is not None
        answered_at = time.monotonic()
        # Prefetches the broker started just before the ask may reach the fetcher just after it.
        meanwhile = [n for t, n in started if asked_at + 0.01 <= t <= answered_at]
        assert meanwhile and max(meanwhile) <= PREFETCH_CONCURRENCY_ASKED
        assert max(n for _, n in started) > PREFETCH_CONCURRENCY_ASKED  # before: full width
        for h in hashes:  # and once nobody waits, prefetching goes on
            assert (await broker.resolve(h, "query")).info is not None
        assert len(started) == len(hashes) - 1
        assert PREFETCH_CONCURRENCY > PREFETCH_CONCURRENCY_ASKED

    run_with_broker([fetcher], scenario)


def test_offers_are_judged_beside_the_event_loop(tmp_path: Path) -> None:
    """Signature checks run in the broker's worker thread, not in the loop that answers Nix;
    the verdicts are the policy's all the same (a bad signature is still refused)."""
    import threading

    good = make_info(make_nar(tmp_path / "good", 100))
    bad = dataclasses.replace(make_info(make_nar(tmp_path / "bad", 100), hash_part="1" * 32),
                              sigs=[f"{KEY.name}:" + "A" * 86 + "=="])
    threads: list[str] = []
    policy_judge = TrustPolicy.judge

    def judge(self: TrustPolicy, info: Any) -> Any:
        threads.append(threading.current_thread().name)
        return policy_judge(self, info)

    async def locate(hash_part: str) -> Offer | Unavailable:
        return Offer(good if hash_part == good.hash_part else bad, "test://f")

    async def scenario(broker: Broker, _root: Any) -> None:
        TrustPolicy.judge = judge  # type: ignore[method-assign]
        try:
            assert (await broker.resolve(good.hash_part)).info == good
            res = await broker.resolve(bad.hash_part)
            assert res.info is None and "no valid signature" in res.reason
        finally:
            TrustPolicy.judge = policy_judge  # type: ignore[method-assign]
        assert len(threads) == 2 and threading.main_thread().name not in threads

    run_with_broker([FunctionFetcher("f", locate, serve_bytes(b""))], scenario)


def test_a_transfer_is_asserted_while_in_flight_only(tmp_path: Path) -> None:
    """<transfer …> shows NARs in flight; one delivered in a single step never is (asserting it
    only to retract it would cost two turns per small NAR)."""
    from syndicate import patterns as P
    from syndicate.dataspace import during

    info = make_info(make_nar(tmp_path, 1000))
    size = info.nar_size
    seen: list[tuple[str, int]] = []
    present: set[str] = set()

    async def scenario(broker: Broker, root: Any) -> None:
        def watch() -> None:
            @during(broker.ds, P.rec("transfer", P._, P.CAPTURE, P.CAPTURE, P._))
            def transfer(fetcher: Any, done: Any) -> Any:
                seen.append((fetcher, done))
                present.add(fetcher)
                return lambda: present.discard(fetcher)

        turn.external(root, watch)
        res = await broker.resolve(H)
        one_step = broker.events(res)
        one_step.progress("small", size, size)
        one_step.done()
        streamed = broker.events(res)
        streamed.progress("large", 400, size)
        await asyncio.sleep(0.2)
        assert present == {"large"}
        streamed.progress("large", size, size)
        streamed.done()
        await asyncio.sleep(0.2)
        assert present == set()
        assert seen == [("large", 400), ("large", size)]

    run_with_broker([offering("one", info)], scenario)
