"""NarService filling the verified NAR cache: a zstd source's own file is kept as the entry
(nothing compressed again); other sources, or a zstd source that failed part-way, are compressed."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard

from substituter.nar_cache import NarCache
from substituter.nar_service import MEMORY_SPOOL, NarService
from substituter.plugin import Offer
from substituter.transfer import Source, TransferFailed

from .helpers import compress, make_info, make_nar, serve_bytes


def two_frames(data: bytes) -> bytes:
    """A zstd file of two frames, as parallel compressors write them."""
    half = len(data) // 2
    return compress(data[:half], "zstd") + compress(data[half:], "zstd")


def service(tmp_path: Path, sources: list[tuple[str, bytes, str, int | None]], *,
            spool_limit: int = 32 << 20) -> tuple[NarService, NarCache]:
    cache = NarCache(tmp_path / "cache", 1 << 30)

    def make_sources(res: object, bad: set[str]) -> list[Source]:
        info = res.info  # type: ignore[attr-defined]
        return [
            Source(name, Offer(info, f"test://{name}", compression), serve_bytes(data, fail_after=fail_after))
            for name, data, compression, fail_after in sources
            if name not in bad
        ]

    return NarService(make_sources, cache, spool_limit=spool_limit), cache


async def fetch(nars: NarService, info) -> bytes:
    res = SimpleNamespace(info=info)
    data = b"".join([chunk async for chunk in nars.stream(res)])  # type: ignore[arg-type]
    await nars.writes_done()
    return data


def entry_bytes(cache: NarCache, info) -> bytes:
    entry = cache.get(info.nar_hash.nix32())
    assert entry is not None, "the verified NAR was not cached"
    return entry.path.read_bytes()


def no_temp_files(cache: NarCache) -> bool:
    return not any(p.name.startswith(".tmp-") for p in cache.directory.iterdir())


# Sizes: in memory (<= 1 MiB), spooled to a file (<= spool limit), streamed through (spool limit 0).
MODES = [(300_000, 32 << 20), (3 * MEMORY_SPOOL, 32 << 20), (3 * MEMORY_SPOOL, 0)]


@pytest.mark.parametrize(("size", "spool_limit"), MODES)
async def test_a_zstd_source_file_is_kept_byte_for_byte(tmp_path: Path, size: int, spool_limit: int) -> None:
    nar = make_nar(tmp_path, size)
    info = make_info(nar)
    upstream = two_frames(nar)
    nars, cache = service(tmp_path, [("z", upstream, "zstd", None)], spool_limit=spool_limit)
    assert await fetch(nars, info) == nar
    assert entry_bytes(cache, info) == upstream
    assert b"".join([c async for c in cache.open(info.nar_hash.nix32())]) == nar
    assert b"".join([c async for c in cache.open(info.nar_hash.nix32(), 12345)]) == nar[12345:]
    assert no_temp_files(cache)


@pytest.mark.parametrize(("size", "spool_limit"), MODES)
async def test_other_compressions_are_compressed_for_the_cache(tmp_path: Path, size: int, spool_limit: int) -> None:
    nar = make_nar(tmp_path, size)
    info = make_info(nar)
    nars, cache = service(tmp_path, [("x", compress(nar, "xz"), "xz", None)], spool_limit=spool_limit)
    assert await fetch(nars, info) == nar
    assert zstandard.ZstdDecompressor().decompress(entry_bytes(cache, info)) == nar


@pytest.mark.parametrize(("size", "spool_limit"), MODES)
@pytest.mark.parametrize("second", ["none", "zstd"])
async def test_a_zstd_source_failing_part_way_still_leaves_a_correct_entry(
    tmp_path: Path, size: int, spool_limit: int, second: str
) -> None:
    nar = make_nar(tmp_path, size)
    info = make_info(nar)
    upstream = compress(nar, "zstd")
    other = nar if second == "none" else two_frames(nar)
    nars, cache = service(
        tmp_path,
        [("broken", upstream, "zstd", len(upstream) * 2 // 3), ("good", other, second, None)],
        spool_limit=spool_limit,
    )
    assert await fetch(nars, info) == nar
    kept = entry_bytes(cache, info)
    assert kept != upstream[: len(kept)] or len(kept) != len(upstream)  # not the broken file itself
    assert zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(kept) == nar
    assert no_temp_files(cache)


async def test_a_zstd_source_failing_before_any_byte_lets_the_next_one_be_kept(tmp_path: Path) -> None:
    nar = make_nar(tmp_path, 3 * MEMORY_SPOOL)
    info = make_info(nar)
    upstream = two_frames(nar)
    nars, cache = service(tmp_path, [("dead", upstream, "zstd", 0), ("z", upstream, "zstd", None)])
    assert await fetch(nars, info) == nar
    assert entry_bytes(cache, info) == upstream


@pytest.mark.parametrize(("size", "spool_limit"), MODES)
async def test_a_corrupt_zstd_file_is_never_cached(tmp_path: Path, size: int, spool_limit: int) -> None:
    nar = make_nar(tmp_path, size)
    info = make_info(nar)
    evil = bytearray(compress(nar, "zstd"))
    evil[len(evil) // 2] ^= 0xFF
    nars, cache = service(tmp_path, [("evil", bytes(evil), "zstd", None)], spool_limit=spool_limit)
    with pytest.raises(TransferFailed):
        await fetch(nars, info)
    assert cache.get(info.nar_hash.nix32()) is None
    assert no_temp_files(cache)


async def test_trailing_garbage_after_the_frames_is_refused(tmp_path: Path) -> None:
    nar = make_nar(tmp_path, 3 * MEMORY_SPOOL)
    info = make_info(nar)
    nars, cache = service(tmp_path, [("junk", compress(nar, "zstd") + os.urandom(64), "zstd", None)])
    with pytest.raises(TransferFailed):
        await fetch(nars, info)
    assert cache.get(info.nar_hash.nix32()) is None and no_temp_files(cache)


async def test_a_small_nar_is_handed_out_before_its_cache_write_finishes(tmp_path: Path) -> None:
    nar = make_nar(tmp_path, 300_000)
    info = make_info(nar)
    upstream = compress(nar, "zstd")
    opened = []

    def sources(res: object, bad: set[str]) -> list[Source]:
        opener = serve_bytes(upstream)

        def counting(offer: Offer, offset: int = 0):
            opened.append(offset)
            return opener(offer, offset)

        return [Source("z", Offer(info, "test://z", "zstd"), counting)]

    cache = NarCache(tmp_path / "cache", 1 << 30)
    release = threading.Event()
    put_many = cache.put_many

    def slow_put_many(items: list[tuple[str, int, bytes, bool]]) -> list[Exception | None]:
        assert release.wait(10)
        return put_many(items)

    cache.put_many = slow_put_many  # type: ignore[method-assign]
    nars = NarService(sources, cache)
    res = SimpleNamespace(info=info)
    first = b"".join([c async for c in nars.stream(res)])  # type: ignore[arg-type]
    assert first == nar and cache.get(info.nar_hash.nix32()) is None  # served, not yet cached
    second = b"".join([c async for c in nars.stream(res)])  # type: ignore[arg-type]
    assert second == nar and opened == [0]  # the same verified bytes, no second download
    waiting = asyncio.ensure_future(nars.cached_file(res))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the zstd file is only handed out once it exists
    release.set()
    entry = await waiting
    assert entry is not None and entry.path.read_bytes() == upstream
    await nars.writes_done()
    assert opened == [0]


async def test_prefetch_fetches_a_small_nar_once_and_a_request_retries_a_failed_prefetch(tmp_path: Path) -> None:
    nar = make_nar(tmp_path, 300_000)
    info = make_info(nar)
    upstream = compress(nar, "zstd")
    opened: list[int] = []
    answered: list[bool] = [False]  # the good source has not answered yet when prefetching

    def sources(res: object, bad: set[str]) -> list[Source]:
        opener = serve_bytes(upstream)

        def counting(offer: Offer, offset: int = 0):
            opened.append(offset)
            return opener(offer, offset)

        return [Source("z", Offer(info, "test://z", "zstd"), counting)] if answered[0] else []

    cache = NarCache(tmp_path / "cache", 1 << 30)
    nars = NarService(sources, cache, prefetch_limit=1 << 20)
    res = SimpleNamespace(info=info)
    nars.prefetch(res)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # it failed quietly: no source yet
    answered[0] = True
    assert b"".join([c async for c in nars.stream(res)]) == nar  # type: ignore[arg-type]
    await nars.writes_done()
    assert opened == [0]
    nars.prefetch(res)  # type: ignore[arg-type]  # cached now: nothing to do
    await asyncio.sleep(0.05)
    assert opened == [0]
    other = make_nar(tmp_path / "o", 300_000)
    other_info = make_info(other, hash_part="1" * 32)
    big = NarService(sources, NarCache(tmp_path / "c2", 1 << 30), prefetch_limit=len(other) - 1)
    big.prefetch(SimpleNamespace(info=other_info))  # type: ignore[arg-type]  # above the limit
    await asyncio.sleep(0.05)
    assert opened == [0]


async def test_small_nars_verified_lately_stay_in_memory(tmp_path: Path) -> None:
    nar = make_nar(tmp_path, 300_000)
    info = make_info(nar)
    nars, cache = service(tmp_path, [("z", compress(nar, "zstd"), "zstd", None)])
    nar_hash = info.nar_hash.nix32()
    assert nars.recent(nar_hash) is None and not nars.spooling_small(nar_hash)
    assert await fetch(nars, info) == nar
    assert nars.recent(nar_hash) == nar


@pytest.mark.parametrize(("size", "spool_limit"), MODES)
async def test_when_every_source_in_hand_fails_those_answering_later_are_waited_for(
    tmp_path: Path, size: int, spool_limit: int
) -> None:
    """The broker answers as soon as the best offer is certain; if that source then fails, the
    fetchers still to answer are waited for (refresh) and tried, rather than failing the NAR."""
    nar = make_nar(tmp_path, size)
    info = make_info(nar)
    upstream = compress(nar, "zstd")
    answered = {"flaky"}
    refreshed: list[object] = []

    def sources(res: object, exclude: set[str]) -> list[Source]:
        found = [
            Source("flaky", Offer(info, "test://flaky", "zstd"), serve_bytes(upstream, fail_after=100)),
            Source("good", Offer(info, "test://good", "zstd"), serve_bytes(upstream)),
        ]
        return [s for s in found if s.fetcher in answered and s.fetcher not in exclude]

    async def refresh(res: object) -> None:
        refreshed.append(res)
        answered.add("good")  # it answered meanwhile

    nars = NarService(sources, NarCache(tmp_path / "cache", 1 << 30), spool_limit=spool_limit,
                      refresh=refresh)  # type: ignore[arg-type]
    assert await fetch(nars, info) == nar  # streamed too: nothing had gone out from flaky yet
    assert len(refreshed) == 1
