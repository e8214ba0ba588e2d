from __future__ import annotations

import os
from pathlib import Path

import pytest

from substituter.errors import SizeMismatch
from substituter.nar_cache import NarCache

H1 = "1" * 52
H2 = "2" * 52
H3 = "3" * 52


async def read(cache: NarCache, h: str, offset: int = 0) -> bytes:
    return b"".join([c async for c in cache.open(h, offset)])


async def put(cache: NarCache, h: str, data: bytes) -> None:
    w = cache.writer(h, len(data))
    w.write(data)
    await w.commit()


async def test_round_trip_and_offsets(tmp_path: Path) -> None:
    cache = NarCache(tmp_path / "c", 1 << 30)
    data = os.urandom(5 * 1024 * 1024)
    await put(cache, H1, data)
    assert cache.get(H1) is not None and H1 in cache
    assert await read(cache, H1) == data
    for offset in (1, len(data) // 2, len(data) - 1, len(data)):
        assert await read(cache, H1, offset) == data[offset:]


async def test_wrong_size_is_not_committed(tmp_path: Path) -> None:
    cache = NarCache(tmp_path / "c", 1 << 30)
    w = cache.writer(H1, 10)
    w.write(b"12345")
    with pytest.raises(SizeMismatch):
        await w.commit()
    assert cache.get(H1) is None
    assert list((tmp_path / "c").iterdir()) == []
    w2 = cache.writer(H1, 3)
    with pytest.raises(SizeMismatch):
        w2.write(b"1234")


async def test_abort_and_crash_leave_nothing(tmp_path: Path) -> None:
    cache = NarCache(tmp_path / "c", 1 << 30)
    w = cache.writer(H1, 4)
    w.write(b"ab")
    w.abort()
    assert list((tmp_path / "c").iterdir()) == []
    crashed = cache.writer(H2, 4)  # never committed nor aborted: as after a crash
    crashed.write(b"ab")
    crashed._file.close()  # the process died here: the temp file stays
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "c").iterdir())
    again = NarCache(tmp_path / "c", 1 << 30)
    assert list((tmp_path / "c").iterdir()) == [] and again.get(H2) is None


async def test_lru_eviction_and_restart(tmp_path: Path) -> None:
    blob = os.urandom(100_000)  # incompressible: file size ~ 100 kB
    cache = NarCache(tmp_path / "c", 250_000)
    await put(cache, H1, blob)
    await put(cache, H2, blob[::-1])
    assert cache.get(H1) is not None  # H1 is now the most recently used
    await put(cache, H3, blob[1:] + b"x")
    assert cache.get(H2) is None and cache.get(H1) is not None and cache.get(H3) is not None
    again = NarCache(tmp_path / "c", 250_000)
    assert again.get(H1) is not None and again.get(H3) is not None
    assert await read(again, H3) == blob[1:] + b"x"


async def test_oversized_nar_is_not_kept(tmp_path: Path) -> None:
    cache = NarCache(tmp_path / "c", 1000)
    await put(cache, H1, os.urandom(5000))
    assert cache.get(H1) is None


def test_garbage_hashes(tmp_path: Path) -> None:
    cache = NarCache(tmp_path / "c", 1000)
    for bad in ("../" + "1" * 49, "1" * 51, "A" * 52, "e" * 52):
        assert cache.get(bad) is None
        with pytest.raises(ValueError):
            cache.writer(bad, 1)


async def test_put_many_caches_each_item_and_reports_each_error(tmp_path: Path) -> None:
    import zstandard

    cache = NarCache(tmp_path / "c", 1 << 30)
    plain, packed = os.urandom(1000), os.urandom(2000)
    frame = zstandard.ZstdCompressor().compress(packed)
    errors = cache.put_many([(H1, len(plain), plain, False), (H2, 5, b"1234", False), (H3, len(packed), frame, True)])
    assert errors[0] is None and isinstance(errors[1], SizeMismatch) and errors[2] is None
    assert await read(cache, H1) == plain and await read(cache, H3) == packed
    assert cache.get(H2) is None
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "c").iterdir()) == sorted([H1, H3])


async def test_small_entries_are_also_held_in_memory_until_evicted(tmp_path: Path) -> None:
    import zstandard

    data = os.urandom(3000)
    frame = zstandard.ZstdCompressor().compress(data)
    cache = NarCache(tmp_path / "c", len(frame) + 100)  # room for one entry only
    assert cache.put_many([(H1, len(data), frame, True)]) == [None]
    assert cache.small_file(H1) == frame == cache.get(H1).path.read_bytes()  # type: ignore[union-attr]
    other = os.urandom(3000)
    cache.put_raw(H2, len(other), zstandard.ZstdCompressor().compress(other))  # evicts H1
    assert cache.get(H1) is None and cache.small_file(H1) is None
    assert cache.small_file(H2) is not None


async def test_an_entry_removed_behind_our_back_is_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import substituter.nar_cache as nar_cache

    cache = NarCache(tmp_path / "c", 1 << 30)
    data = os.urandom(1000)
    cache.put(H1, len(data), data)
    entry = cache.get(H1)
    assert entry is not None and entry.path.name.startswith(H1)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [entry.path.name]  # no temp file left
    entry.path.unlink()
    # Looked for at most once a second per entry (not a stat per lookup)...
    assert cache.get(H1) is entry
    monkeypatch.setattr(nar_cache, "EXISTS_INTERVAL", 0.0)
    # ... and then it is gone, from memory too.
    assert cache.get(H1) is None and H1 not in cache and cache.small_file(H1) is None
