"""BinaryCacheFetcher against real Nix-made caches served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fetchers.binary_cache import BinaryCacheFetcher, BinaryCacheOptions
from substituter.errors import ConfigError, FetchError, NotAvailable, TransientFetchError
from substituter.nix.narinfo import NarInfo
from substituter.plugin import FetcherContext, Offer, Unavailable, describe_options, parse_options
from tests.cache_server import (  # noqa: F401  (serve_cache is a fixture)
    BuiltCache,
    CacheServer,
    build_cache,
    closed_port,
)
from tests.conftest import Nix

pytestmark = pytest.mark.nix

Serve = Callable[..., CacheServer]


@pytest.fixture
def cache(nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path) -> BuiltCache:
    return build_cache(nix, nix_keys, tmp_path / "cache", "xz")


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    """``await started(url, **options)``: a started fetcher, stopped at the end of the test."""
    fetchers: list[BinaryCacheFetcher] = []

    async def start(url: str, context: FetcherContext | None = None, **options: Any) -> Any:
        fetcher = BinaryCacheFetcher("test-cache", BinaryCacheOptions(url=url, **options), context)
        fetchers.append(fetcher)
        await fetcher.start()
        return fetcher

    yield start
    for fetcher in fetchers:
        await fetcher.stop()


async def read_all(fetcher: BinaryCacheFetcher, offer: Offer, offset: int = 0) -> bytes:
    return b"".join([chunk async for chunk in fetcher.open(offer, offset)])


async def locate_offer(fetcher: BinaryCacheFetcher, store_path: str) -> Offer:
    answer = await fetcher.locate(BuiltCache.hash_part(store_path))
    assert isinstance(answer, Offer), answer
    return answer


# --- the happy path, for every compression Nix writes -------------------------------------------


@pytest.mark.parametrize("compression", ["xz", "zstd", "none"])
async def test_locate_and_open_every_path(
    compression: str,
    nix: Nix,
    nix_keys: tuple[Path, Path, str],
    tmp_path: Path,
    serve_cache: Serve,
    started: Callable[..., Any],
) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", compression)
    server = serve_cache(cache.root)
    fetcher = await started(server.url)
    assert len(cache.paths) == 3
    for store_path in cache.paths:
        offer = await locate_offer(fetcher, store_path)
        text = cache.narinfo_text(store_path)
        expected = NarInfo.parse(text)
        assert offer.info == expected
        assert offer.info.sigs and offer.info.sigs == expected.sigs
        assert offer.uri == f"{server.url}/{expected.url}"
        assert offer.compression == compression
        assert f"FileSize: {offer.file_size}\n" in text
        assert f"FileHash: {offer.file_hash}\n" in text
        nar = cache.nar_file(store_path).read_bytes()
        assert await read_all(fetcher, offer) == nar
        assert await read_all(fetcher, offer, len(nar) // 2) == nar[len(nar) // 2 :]
    ranges = [r.headers.get("Range") for r in server.requests if r.path.startswith("nar/")]
    assert any(r and r.startswith("bytes=") for r in ranges)
    assert fetcher.describe() == server.url


async def test_open_skips_itself_when_the_server_ignores_range(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    server.honour_range = False
    fetcher = await started(server.url)
    offer = await locate_offer(fetcher, cache.top)
    nar = cache.nar_file(cache.top).read_bytes()
    assert await read_all(fetcher, offer, 5) == nar[5:]
    assert server.requests[-1].status == 200
    assert await read_all(fetcher, offer, len(nar)) == b""


async def test_open_rejects_an_offset_past_the_end(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    fetcher = await started(serve_cache(cache.root).url)
    offer = await locate_offer(fetcher, cache.top)
    assert offer.file_size is not None
    with pytest.raises(FetchError, match="beyond"):
        await read_all(fetcher, offer, offer.file_size + 1)


async def test_cache_priority_and_path_prefix(
    cache: BuiltCache, tmp_path: Path, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    # A cache below a URL path, with a Priority line: NAR URLs resolve against the prefix.
    (tmp_path / "www").mkdir()
    cache.root.rename(tmp_path / "www" / "sub")
    info = tmp_path / "www" / "sub" / "nix-cache-info"
    info.write_text(info.read_text() + "Priority: 41\n")
    server = serve_cache(tmp_path / "www")
    fetcher = await started(server.url + "/sub/")
    assert fetcher.cache_priority == 41
    offer = await locate_offer(fetcher, cache.top)
    assert offer.uri.startswith(f"{server.url}/sub/nar/")
    nar = (tmp_path / "www" / "sub" / offer.info.url).read_bytes()
    assert await read_all(fetcher, offer) == nar


async def test_absolute_nar_url_is_used_as_is(
    cache: BuiltCache, tmp_path: Path, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    elsewhere = serve_cache(cache.root)
    nar = cache.nar_file(cache.top).read_bytes()
    narinfo = cache.narinfo_file(cache.top)
    info = NarInfo.parse(narinfo.read_text())
    absolute = narinfo.read_text().replace(f"URL: {info.url}", f"URL: {elsewhere.url}/{info.url}")
    narinfo.write_text(absolute)
    server = serve_cache(cache.root)
    fetcher = await started(server.url)
    offer = await locate_offer(fetcher, cache.top)
    assert offer.uri == f"{elsewhere.url}/{info.url}"
    assert await read_all(fetcher, offer) == nar
    assert f"{info.url}" in elsewhere.paths_requested()


# --- paths the cache does not have ---------------------------------------------------------------


async def test_missing_path_and_garbage_hash_are_unavailable(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    fetcher = await started(server.url)
    absent = "0" * 32
    answer = await fetcher.locate(absent)
    assert isinstance(answer, Unavailable) and "404" in answer.reason
    before = len(server.requests)
    for garbage in ["short", "e" * 32, "../../etc/passwd" + "0" * 16]:
        answer = await fetcher.locate(garbage)
        assert isinstance(answer, Unavailable) and "hash part" in answer.reason
    assert len(server.requests) == before  # garbage never reaches the network


async def test_missing_nar_after_good_narinfo_is_not_available(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    fetcher = await started(serve_cache(cache.root).url)
    offer = await locate_offer(fetcher, cache.top)
    cache.nar_file(cache.top).unlink()
    with pytest.raises(NotAvailable, match="404"):
        await read_all(fetcher, offer)


async def test_narinfo_that_does_not_parse(
    cache: BuiltCache,
    serve_cache: Serve,
    started: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fetcher = await started(serve_cache(cache.root).url)
    cache.narinfo_file(cache.top).write_text("StorePath: nonsense\n")
    with caplog.at_level(logging.WARNING, logger="fetchers.binary_cache"):
        answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable) and "bad narinfo" in answer.reason
    assert "does not parse" in caplog.text


async def test_narinfo_for_another_path(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    fetcher = await started(serve_cache(cache.root).url)
    other = cache.paths[0] if cache.paths[0] != cache.top else cache.paths[1]
    cache.narinfo_file(cache.top).write_text(cache.narinfo_text(other))
    answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable) and other in answer.reason


# --- starting up ----------------------------------------------------------------------------------


async def test_store_dir_mismatch_names_both(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    with pytest.raises(ConfigError) as info:
        await started(server.url, FetcherContext(store_dir="/gnu/store"))
    assert "/gnu/store" in str(info.value) and "/nix/store" in str(info.value)


async def test_not_a_cache_is_a_config_error(
    tmp_path: Path, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(tmp_path)
    with pytest.raises(ConfigError, match="Nix binary cache"):
        await started(server.url)


async def test_unreachable_cache_starts_down_answers_fast_and_recovers(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    port = closed_port()
    fetcher = await started(f"http://127.0.0.1:{port}")
    assert not fetcher.is_up
    delays: list[float] = []

    async def no_sleep(seconds: float) -> None:
        delays.append(seconds)

    fetcher.retry.sleep = no_sleep
    answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable)
    assert answer.reason.startswith("cache unreachable:")
    assert delays == []  # answered from the down mark, no retry loop
    # The cache comes up; once the re-probe time has passed the fetcher finds it again.
    serve_cache(cache.root, port=port)
    answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable)  # still inside the backoff window
    fetcher._clock = lambda: time.monotonic() + 3600
    await locate_offer(fetcher, cache.top)
    assert fetcher.is_up


async def test_server_errors_at_start_mark_the_cache_down(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    server.fail_next(1, 503, match="nix-cache-info")
    fetcher = await started(server.url)
    assert not fetcher.is_up
    answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable) and "503" in answer.reason


async def test_cache_that_never_answers_does_not_hold_up_start(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    release = server.stall(after=0, match="nix-cache-info")
    try:
        fetcher = await started(server.url, stall_timeout=0.2)
        assert not fetcher.is_up
    finally:
        release.set()


# --- retries and faults on the real server --------------------------------------------------------


async def test_narinfo_retried_through_a_burst_of_errors(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    fetcher = await started(server.url, retries=2)
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    fetcher.retry.sleep = record
    server.fail_next(2, 502, match="*.narinfo", retry_after=0)
    await locate_offer(fetcher, cache.top)
    assert delays == [0, 0]
    server.fail_next(3, 500, match="*.narinfo")
    answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable)
    assert "after 3 tries" in answer.reason and "500" in answer.reason
    statuses = [r.status for r in server.requests if r.path.endswith(".narinfo")]
    assert statuses == [502, 502, 200, 500, 500, 500]


async def test_connection_killed_mid_nar_is_transient_and_resumable(
    nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path, serve_cache: Serve,
    started: Callable[..., Any],
) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "none")
    server = serve_cache(cache.root)
    # Two connections: none left for the plain client, so even this small NAR streams through
    # aiohttp (the path every NAR above SMALL_FILE takes).
    fetcher = await started(server.url, max_connections=2)
    offer = await locate_offer(fetcher, cache.top)
    nar = cache.nar_file(cache.top).read_bytes()
    cut = len(nar) // 3
    server.cut_after(cut)
    received = bytearray()
    with pytest.raises(TransientFetchError) as info:
        async for chunk in fetcher.open(offer):
            received += chunk
    assert isinstance(info.value.__cause__, aiohttp.ClientError)
    assert bytes(received) == nar[:cut]
    # resume where the stream broke: the bytes line up exactly
    assert bytes(received) + await read_all(fetcher, offer, len(received)) == nar


async def test_corrupted_bytes_are_passed_through_untouched(
    nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path, serve_cache: Serve,
    started: Callable[..., Any],
) -> None:
    # Verification is the broker's job: the fetcher must deliver exactly what the server sent.
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "none")
    server = serve_cache(cache.root)
    server.corrupt(100)
    fetcher = await started(server.url)
    offer = await locate_offer(fetcher, cache.top)
    nar = cache.nar_file(cache.top).read_bytes()
    got = await read_all(fetcher, offer)
    assert got != nar and got[100] == nar[100] ^ 0xFF and got[:100] == nar[:100]


async def test_stalled_nar_times_out_as_transient(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    fetcher = await started(server.url, stall_timeout=0.3)
    offer = await locate_offer(fetcher, cache.top)
    release = server.stall(after=10)
    try:
        with pytest.raises(TransientFetchError, match="stalled"):
            await read_all(fetcher, offer)
    finally:
        release.set()


# --- authentication -------------------------------------------------------------------------------


async def test_netrc_file_option(
    cache: BuiltCache, tmp_path: Path, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    server.require_basic("alice", "wonder")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password wonder\n")
    fetcher = await started(server.url, netrc_file=netrc)
    offer = await locate_offer(fetcher, cache.top)
    assert await read_all(fetcher, offer) == cache.nar_file(cache.top).read_bytes()
    netrc.write_text("machine 127.0.0.1 login alice password wrong\n")
    with pytest.raises(ConfigError, match="HTTP 401.*netrc-file"):
        await started(server.url, netrc_file=netrc)


@pytest.mark.parametrize("via", ["NETRC", "HOME"])
async def test_netrc_default_follows_netrc_env_then_home(
    via: str, cache: BuiltCache, tmp_path: Path, serve_cache: Serve, started: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = serve_cache(cache.root)
    server.require_basic("bob", "builder")
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc" if via == "HOME" else tmp_path / "elsewhere-netrc"
    netrc.write_text("machine 127.0.0.1 login bob password builder\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    if via == "NETRC":
        monkeypatch.setenv("NETRC", str(netrc))
    else:
        monkeypatch.delenv("NETRC", raising=False)
    fetcher = await started(server.url)
    await locate_offer(fetcher, cache.top)


async def test_missing_netrc_file_is_a_config_error(
    tmp_path: Path, started: Callable[..., Any]
) -> None:
    with pytest.raises(ConfigError, match="netrc-file"):
        await started("http://127.0.0.1:1", netrc_file=tmp_path / "absent")


async def test_bearer_token_goes_to_this_cache_only(
    cache: BuiltCache, tmp_path: Path, serve_cache: Serve, started: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = serve_cache(cache.root)
    server.require_bearer("t0ken-value")
    other = serve_cache(cache.root)
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-value\n")
    with caplog.at_level(logging.DEBUG):
        fetcher = await started(server.url, bearer_token_file=token_file)
        offer = await locate_offer(fetcher, cache.top)
        assert await read_all(fetcher, offer) == cache.nar_file(cache.top).read_bytes()
        # The same fetcher opening a URI on another host must not hand it our token.
        foreign = Offer(info=offer.info, uri=f"{other.url}/{offer.info.url}")
        assert await read_all(fetcher, foreign) == cache.nar_file(cache.top).read_bytes()
    assert all(r.headers.get("Authorization") == "Bearer t0ken-value" for r in server.requests)
    assert other.requests and all("Authorization" not in r.headers for r in other.requests)
    assert "t0ken-value" not in caplog.text
    assert fetcher._client is not None
    assert "t0ken-value" not in repr(fetcher._client._middlewares)


async def test_bearer_token_file_problems_are_config_errors(
    tmp_path: Path, started: Callable[..., Any]
) -> None:
    with pytest.raises(ConfigError, match="bearer-token-file.*cannot read"):
        await started("http://127.0.0.1:1", bearer_token_file=tmp_path / "absent")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="bearer-token-file.*empty"):
        await started("http://127.0.0.1:1", bearer_token_file=tmp_path / "empty")


# --- connection options ---------------------------------------------------------------------------


async def test_max_connections_bounds_the_pool(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    fetcher = await started(server.url, max_connections=1)
    answers = await asyncio.gather(*(fetcher.locate(cache.hash_part(p)) for p in cache.paths * 4))
    assert all(isinstance(a, Offer) for a in answers)
    assert len({r.client_port for r in server.requests}) == 1


@pytest.mark.parametrize("http2", [True, False])
async def test_http2_option_works_against_an_http1_server(
    http2: bool, cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    # Cleartext HTTP/2 is never negotiated: either setting must fall back to HTTP/1.1 cleanly.
    fetcher = await started(serve_cache(cache.root).url, http2=http2, connect_timeout=1.5)
    await locate_offer(fetcher, cache.top)
    assert fetcher._client is not None
    assert fetcher._client.timeout.sock_connect == 1.5


# --- options --------------------------------------------------------------------------------------


def test_options_parse_with_defaults() -> None:
    opts = parse_options(BinaryCacheOptions, {"url": "https://cache.example"}, "fetchers[0]")
    assert opts == BinaryCacheOptions(url="https://cache.example")
    assert (opts.connect_timeout, opts.stall_timeout, opts.retries) == (3.0, 30.0, 3)
    assert (opts.http2, opts.max_connections, opts.netrc_file) == (True, 32, None)
    parsed = parse_options(
        BinaryCacheOptions,
        {"url": "http://127.0.0.1:9", "bearer-token-file": "/run/t", "stall-timeout": "5"},
        "fetchers[0]",
    )
    assert parsed.bearer_token_file == Path("/run/t") and parsed.stall_timeout == 5.0
    docs = {d.name: d for d in describe_options(BinaryCacheOptions)}
    assert set(docs) == {
        "url", "connect-timeout", "stall-timeout", "retries", "netrc-file",
        "bearer-token-file", "http2", "max-connections",
    }
    assert all(d.help for d in docs.values()) and docs["url"].default == "(required)"
    assert "priority" not in docs


@pytest.mark.parametrize(
    ("raw", "option"),
    [
        ({}, "url"),
        ({"url": "ftp://cache.example"}, "url"),
        ({"url": "cache.example"}, "url"),
        ({"url": "http://x", "connect-timeout": "soon"}, "connect-timeout"),
        ({"url": "http://x", "connect-timeout": 0}, "connect-timeout"),
        ({"url": "http://x", "stall-timeout": -1}, "stall-timeout"),
        ({"url": "http://x", "retries": -1}, "retries"),
        ({"url": "http://x", "retries": 1.5}, "retries"),
        ({"url": "http://x", "http2": "perhaps"}, "http2"),
        ({"url": "http://x", "max-connections": 0}, "max-connections"),
        ({"url": "http://x", "netrc-file": 7}, "netrc-file"),
        ({"url": "http://x", "priority": 10}, "priority"),
    ],
)
def test_bad_option_values_name_the_option(raw: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        parse_options(BinaryCacheOptions, raw, "fetchers[0]")


# --- the test server itself ------------------------------------------------------------------------


def test_real_nix_copies_from_the_test_server(
    cache: BuiltCache, nix: Nix, tmp_path: Path, serve_cache: Serve
) -> None:
    # Other suites point Nix at CacheServer: it must be a cache Nix itself accepts (HEAD + GET).
    server = serve_cache(cache.root)
    store = tmp_path / "chroot-store"
    nix.run(
        "nix", "copy", "--from", server.url, "--to", str(store),
        "--option", "trusted-public-keys", cache.public_key, cache.top,
    )
    nix.run("nix-store", "--store", str(store), "--check-validity", *cache.paths)
    assert {r.status for r in server.requests} <= {200, 206}
    assert any(path.startswith("nar/") for path in server.paths_requested("GET"))


async def test_hidden_paths_are_404(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    server = serve_cache(cache.root)
    fetcher = await started(server.url)
    server.hide(f"{cache.hash_part(cache.top)}.narinfo")
    answer = await fetcher.locate(cache.hash_part(cache.top))
    assert isinstance(answer, Unavailable) and "404" in answer.reason
    server.clear_faults()
    await locate_offer(fetcher, cache.top)


def test_credentials_in_the_url_are_refused() -> None:
    with pytest.raises(ConfigError, match="must not carry credentials"):
        parse_options(BinaryCacheOptions, {"url": "https://user:secret@127.0.0.1/"}, "fetchers[0]")


def test_file_uri_appends_plain_paths_and_joins_the_rest() -> None:
    """A narinfo URL is resolved as urljoin would, whatever its form (the common plain
    relative path takes a shortcut)."""
    from urllib.parse import urljoin

    from fetchers.binary_cache import BinaryCacheFetcher, BinaryCacheOptions

    for base in ("http://127.0.0.1:1/", "https://cache.example/sub/dir/"):
        fetcher = BinaryCacheFetcher("c", BinaryCacheOptions(url=base))
        for url in ("nar/abc.nar.xz", "nar/../x.nar", "./nar/x", "/abs/x.nar", "nar/.", "nar/..",
                    "http://other.example/nar/x", "//host/x", "nar/x?y=1", "nar/x#f", "a/./b"):
            assert fetcher._file_uri(url) == urljoin(base, url), (base, url)


async def test_narinfos_share_one_kept_alive_connection_of_their_own(
    cache: BuiltCache, serve_cache: Serve, started: Callable[..., Any]
) -> None:
    """One locate after another: every narinfo GET on the same connection (the fetcher's plain
    client), the NARs through aiohttp's pool; credentials go with both."""
    server = serve_cache(cache.root)
    token = cache.root.parent / "token"
    token.write_text("t0k\n")
    fetcher = await started(server.url, bearer_token_file=token)
    offers = [await locate_offer(fetcher, p) for p in cache.paths]
    narinfos = [r for r in server.requests if r.path.endswith(".narinfo")]
    assert len(narinfos) == len(cache.paths) and len({r.client_port for r in narinfos}) == 1
    assert all(r.headers.get("Authorization") == "Bearer t0k" for r in narinfos)
    assert await read_all(fetcher, offers[0])
