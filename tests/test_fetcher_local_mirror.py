"""LocalMirrorFetcher against real `nix copy --to file://DIR` directories."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fetchers.local_mirror import (
    LOCATE_BATCH,
    READ_AHEAD,
    LocalMirrorFetcher,
    LocalMirrorOptions,
    file_uri_path,
)
from substituter.errors import ConfigError, FetchError, NotAvailable
from substituter.nix.narinfo import NarInfo
from substituter.plugin import FetcherContext, Offer, Unavailable, describe_options, parse_options
from tests.cache_server import BuiltCache, build_cache
from tests.conftest import Nix

pytestmark = pytest.mark.nix


@pytest.fixture
def cache(nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path) -> BuiltCache:
    return build_cache(nix, nix_keys, tmp_path / "cache", "xz")


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    """``await started(path, **options)``: a started fetcher, stopped at the end of the test."""
    fetchers: list[LocalMirrorFetcher] = []

    async def start(path: Path, context: FetcherContext | None = None, **options: Any) -> Any:
        fetcher = LocalMirrorFetcher("mirror", LocalMirrorOptions(path=path, **options), context)
        fetchers.append(fetcher)
        await fetcher.start()
        return fetcher

    yield start
    for fetcher in fetchers:
        await fetcher.stop()


async def read_all(fetcher: LocalMirrorFetcher, offer: Offer, offset: int = 0) -> bytes:
    return b"".join([chunk async for chunk in fetcher.open(offer, offset)])


async def locate_offer(fetcher: LocalMirrorFetcher, store_path: str) -> Offer:
    answer = await fetcher.locate(BuiltCache.hash_part(store_path))
    assert isinstance(answer, Offer), answer
    return answer


@pytest.mark.parametrize("compression", ["xz", "zstd", "none"])
async def test_locate_and_open_every_path(
    compression: str, nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path,
    started: Callable[..., Any],
) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", compression)
    fetcher = await started(cache.root)
    assert fetcher.describe() == str(cache.root)
    for store_path in cache.paths:
        offer = await locate_offer(fetcher, store_path)
        text = cache.narinfo_text(store_path)
        assert offer.info == NarInfo.parse(text) and offer.info.sigs
        nar_file = cache.nar_file(store_path)
        assert offer.uri == nar_file.as_uri() and offer.uri.startswith("file:///")
        assert offer.compression == compression
        assert f"FileSize: {offer.file_size}\n" in text
        assert f"FileHash: {offer.file_hash}\n" in text
        nar = nar_file.read_bytes()
        assert await read_all(fetcher, offer) == nar
        assert await read_all(fetcher, offer, 7) == nar[7:]
        assert await read_all(fetcher, offer, len(nar)) == b""


async def test_large_file_streams_in_bounded_chunks(
    tmp_path: Path, started: Callable[..., Any], cache: BuiltCache
) -> None:
    fetcher = await started(cache.root)
    offer = await locate_offer(fetcher, cache.top)
    big = cache.root / "nar" / "big.nar"
    data = os.urandom(3 * (1 << 20) + 12345)
    big.write_bytes(data)
    chunks = [c async for c in fetcher.open(Offer(info=offer.info, uri=big.as_uri()), 1000)]
    assert b"".join(chunks) == data[1000:]
    assert len(chunks) == 4 and max(len(c) for c in chunks) == 1 << 20


async def test_open_refuses_files_outside_the_mirror(
    tmp_path: Path, started: Callable[..., Any], cache: BuiltCache
) -> None:
    fetcher = await started(cache.root)
    offer = await locate_offer(fetcher, cache.top)
    outside = tmp_path / "secret"
    outside.write_bytes(b"not yours")
    for uri in (outside.as_uri(), (cache.root / ".." / "secret").as_uri()):
        with pytest.raises(NotAvailable, match="not inside"):
            [c async for c in fetcher.open(Offer(info=offer.info, uri=uri))]


async def test_read_ahead_only_of_regular_files_really_inside(
    tmp_path: Path, started: Callable[..., Any], cache: BuiltCache,
) -> None:
    """A small NAR is read along with its narinfo only when it is a regular file under the
    mirror: a symlink out of it is offered (it is a file) but neither read ahead nor opened,
    and a FIFO is not offered (nor opened: no locate waits on it)."""
    nar_file = cache.nar_file(cache.top)
    nar = nar_file.read_bytes()
    assert len(nar) <= READ_AHEAD
    outside = tmp_path / "outside.nar"
    outside.write_bytes(nar)
    nar_file.unlink()
    nar_file.symlink_to(outside)
    fetcher = await started(cache.root)
    offer = await locate_offer(fetcher, cache.top)
    assert not fetcher._read_ahead
    with pytest.raises(NotAvailable, match="not inside"):
        await read_all(fetcher, offer)
    # a symlink that stays inside the mirror is followed, and read ahead
    inside = cache.root / "nar" / "elsewhere.nar"
    inside.write_bytes(nar)
    nar_file.unlink()
    nar_file.symlink_to(inside)
    offer = await locate_offer(fetcher, cache.top)
    assert list(fetcher._read_ahead.values()) == [nar]
    inside.unlink()  # served from what was read ahead
    assert await read_all(fetcher, offer) == nar
    nar_file.unlink()
    os.mkfifo(nar_file)
    answer = await asyncio.wait_for(fetcher.locate(cache.hash_part(cache.top)), 10)
    assert isinstance(answer, Unavailable) and "missing" in answer.reason


async def test_missing_path_and_garbage_hash(
    cache: BuiltCache, started: Callable[..., Any]
) -> None:
    fetcher = await started(cache.root)
    answer = await fetcher.locate("0" * 32)
    assert isinstance(answer, Unavailable) and str(cache.root) in answer.reason
    for garbage in ["", "../nix-cache-info", "e" * 32, "0" * 31]:
        answer = await fetcher.locate(garbage)
        assert isinstance(answer, Unavailable) and "hash part" in answer.reason


async def test_missing_nar(cache: BuiltCache, started: Callable[..., Any]) -> None:
    fetcher = await started(cache.root)
    offer = await locate_offer(fetcher, cache.top)
    nar = cache.nar_file(cache.top).read_bytes()
    cache.nar_file(cache.top).unlink()
    # a small NAR was read along with its narinfo: the first open gets those bytes
    assert len(nar) <= READ_AHEAD and await read_all(fetcher, offer) == nar
    # an offer already made, opened again: the source no longer has it
    with pytest.raises(NotAvailable, match="gone"):
        await read_all(fetcher, offer)
    # a fresh locate does not offer what it cannot deliver
    answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable) and "missing" in answer.reason


async def test_locates_asked_together_share_worker_calls(
    cache: BuiltCache, started: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fetcher = await started(cache.root)
    calls: list[list[str]] = []
    original = fetcher._locate_many

    def counted(hash_parts: list[str], real_root: str) -> list[Any]:
        calls.append(hash_parts)
        return original(hash_parts, real_root)

    monkeypatch.setattr(fetcher, "_locate_many", counted)
    wanted = [cache.hash_part(p) for p in cache.paths] + ["0" * 32]
    answers = await asyncio.gather(*(fetcher.locate(h) for h in wanted * 10))
    assert len(calls) == -(-len(answers) // LOCATE_BATCH)  # batches of LOCATE_BATCH
    for hash_part, answer in zip(wanted * 10, answers, strict=True):
        if hash_part == "0" * 32:
            assert isinstance(answer, Unavailable)
        else:
            assert isinstance(answer, Offer) and answer.info.hash_part == hash_part
    # every small NAR offered was read ahead, once per URI, and is what the file holds
    for store_path in cache.paths:
        offer = await locate_offer(fetcher, store_path)
        assert await read_all(fetcher, offer) == cache.nar_file(store_path).read_bytes()
    assert not fetcher._read_ahead and fetcher._read_ahead_bytes == 0


async def test_bad_and_foreign_narinfos(
    cache: BuiltCache, started: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    fetcher = await started(cache.root)
    narinfo = cache.narinfo_file(cache.top)
    original = narinfo.read_text()
    narinfo.write_bytes(b"StorePath: \xff\n")
    with caplog.at_level(logging.WARNING, logger="fetchers.local_mirror"):
        answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable) and "bad narinfo" in answer.reason
    assert "does not parse" in caplog.text
    other = next(p for p in cache.paths if p != cache.top)
    narinfo.write_text(cache.narinfo_text(other))
    answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable) and other in answer.reason
    url = NarInfo.parse(original).url
    for escape in ["../../../etc/passwd", "/etc/passwd", "http://127.0.0.1:1/x.nar"]:
        narinfo.write_text(original.replace(f"URL: {url}", f"URL: {escape}"))
        answer = await fetcher.locate(cache.hash_part(cache.top))
        assert isinstance(answer, Unavailable) and "leaves" in answer.reason


async def test_open_errors(cache: BuiltCache, started: Callable[..., Any]) -> None:
    fetcher = await started(cache.root)
    offer = await locate_offer(fetcher, cache.top)
    size = cache.nar_file(cache.top).stat().st_size
    with pytest.raises(FetchError, match="beyond the end"):
        await read_all(fetcher, offer, size + 1)
    with pytest.raises(FetchError, match="not a file:// URI"):
        await read_all(fetcher, Offer(info=offer.info, uri="http://127.0.0.1:1/x"))
    with pytest.raises(FetchError, match="other hosts"):
        await read_all(fetcher, Offer(info=offer.info, uri="file://elsewhere/x"))
    assert file_uri_path("file:///a%20b/c") == Path("/a b/c")


async def test_store_dir_mismatch_names_both(
    cache: BuiltCache, started: Callable[..., Any]
) -> None:
    with pytest.raises(ConfigError) as info:
        await started(cache.root, FetcherContext(store_dir="/gnu/store"))
    assert "/gnu/store" in str(info.value) and "/nix/store" in str(info.value)


async def test_check_cache_info_option(cache: BuiltCache, started: Callable[..., Any]) -> None:
    info = cache.root / "nix-cache-info"
    info.write_text(info.read_text() + "Priority: 12\n")
    assert (await started(cache.root)).cache_priority == 12
    info.unlink()
    with pytest.raises(ConfigError, match="nix-cache-info.*check-cache-info"):
        await started(cache.root)
    fetcher = await started(cache.root, check_cache_info=False)
    await locate_offer(fetcher, cache.top)


async def test_path_option_must_be_a_directory(tmp_path: Path, started: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError, match="option 'path'.*not a directory"):
        await started(tmp_path / "absent")


def test_options_parse_and_document() -> None:
    opts = parse_options(LocalMirrorOptions, {"path": "/srv/nix-cache"}, "fetchers[1]")
    assert opts == LocalMirrorOptions(path=Path("/srv/nix-cache"), check_cache_info=True)
    docs = {d.name: d for d in describe_options(LocalMirrorOptions)}
    assert set(docs) == {"path", "check-cache-info"} and all(d.help for d in docs.values())


@pytest.mark.parametrize(
    ("raw", "option"),
    [
        ({}, "path"),
        ({"path": 3}, "path"),
        ({"path": "/x", "check-cache-info": "sometimes"}, "check-cache-info"),
        ({"path": "/x", "url": "http://x"}, "url"),
    ],
)
def test_bad_option_values_name_the_option(raw: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        parse_options(LocalMirrorOptions, raw, "fetchers[1]")
