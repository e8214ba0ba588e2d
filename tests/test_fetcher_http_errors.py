"""HTTP failure handling of the binary-cache fetcher, against a real loopback server told to fail.

tests/cache_server.py's CacheServer produces the failures on cue: bursts of 5xx, Retry-After, 429,
connections closed before any response, silence before the headers, stalls and cuts mid-body,
wrong ranges.  Happy-path behaviour with caches built by Nix lives in test_fetcher_binary_cache.py.
"""

from __future__ import annotations

import email.utils
import gzip
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from fetchers._http import CONNECT_ERRORS, RequestAuth, RetryPolicy, retry_after_seconds
from fetchers.binary_cache import BinaryCacheFetcher, BinaryCacheOptions
from substituter.errors import FetchError, NotAvailable, PluginError, TransientFetchError
from substituter.nix.hashes import Hash
from substituter.nix.narinfo import NarInfo
from substituter.nix.store_path import validate_hash_part
from substituter.plugin import Offer, Unavailable
from tests.cache_server import CacheServer, closed_port

Serve = Callable[..., CacheServer]

HASH = "0123456789abcdfghijklmnpqrsvwxyz"  # the nix32 alphabet: 32 valid characters
NAR = b"not really a nar, but bytes all the same" * 10
NARINFO = (
    f"StorePath: /nix/store/{HASH}-hello\n"
    "URL: nar/hello.nar\n"
    "Compression: none\n"
    f"NarHash: {Hash.of_bytes(NAR)}\n"
    f"NarSize: {len(NAR)}\n"
    "References: \n"
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A tiny cache: nix-cache-info, one narinfo, its NAR (and a gzip-packed copy)."""
    root = tmp_path / "cache"
    (root / "nar").mkdir(parents=True)
    (root / "nix-cache-info").write_text("StoreDir: /nix/store\nPriority: 30\n")
    (root / f"{HASH}.narinfo").write_text(NARINFO)
    (root / "nar" / "hello.nar").write_bytes(NAR)
    (root / "nar" / "hello.nar.gz").write_bytes(gzip.compress(NAR))
    return root


@pytest.fixture
def server(root: Path, serve_cache: Serve) -> CacheServer:
    return serve_cache(root)


class Recorder:
    """Stands in for asyncio.sleep in the retry policy: records delays, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
async def make(server: CacheServer) -> AsyncIterator[Callable[..., object]]:
    fetchers: list[BinaryCacheFetcher] = []

    async def make_fetcher(url: str | None = None, **options: object) -> BinaryCacheFetcher:
        opts = BinaryCacheOptions(url=url or server.url, **options)  # type: ignore[arg-type]
        fetcher = BinaryCacheFetcher("loopback", opts)
        fetcher.retry.sleep = Recorder()
        fetchers.append(fetcher)
        await fetcher.start()
        return fetcher

    yield make_fetcher
    for fetcher in fetchers:
        await fetcher.stop()


@pytest.fixture
async def fetcher(make: Callable[..., object]) -> BinaryCacheFetcher:
    made = await make()  # type: ignore[misc]
    assert isinstance(made, BinaryCacheFetcher)
    return made


def delays(fetcher: BinaryCacheFetcher) -> list[float]:
    recorder = fetcher.retry.sleep
    assert isinstance(recorder, Recorder)
    return recorder.delays


def narinfo_statuses(server: CacheServer) -> list[int]:
    return [r.status for r in server.requests if r.path.endswith(".narinfo")]


def an_offer(uri: str, size: int | None = len(NAR)) -> Offer:
    return Offer(info=NarInfo.parse(NARINFO), uri=uri, file_size=size)


async def read_all(fetcher: BinaryCacheFetcher, offer: Offer, offset: int = 0) -> bytes:
    return b"".join([chunk async for chunk in fetcher.open(offer, offset)])


def test_hash_constant_is_valid() -> None:
    assert validate_hash_part(HASH) == HASH


# --- locate: retries ------------------------------------------------------------------------------


async def test_burst_of_5xx_then_success(fetcher: BinaryCacheFetcher, server: CacheServer) -> None:
    for status in (503, 502, 504):
        server.fail_next(1, status, match="*.narinfo")
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Offer) and answer.uri == f"{server.url}/nar/hello.nar"
    assert narinfo_statuses(server) == [503, 502, 504, 200]
    # jittered exponential: each delay within [ceiling/2, ceiling], ceilings doubling
    ceilings = [0.2, 0.4, 0.8]
    assert len(delays(fetcher)) == 3
    for delay, ceiling in zip(delays(fetcher), ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


async def test_retry_after_seconds_is_honoured(
    fetcher: BinaryCacheFetcher, server: CacheServer
) -> None:
    server.fail_next(1, 503, match="*.narinfo", retry_after=7)
    assert isinstance(await fetcher.locate(HASH), Offer)
    assert delays(fetcher) == [7.0]


async def test_retry_after_date_is_honoured_and_bounded(
    fetcher: BinaryCacheFetcher, server: CacheServer
) -> None:
    soon = email.utils.formatdate(time.time() + 20, usegmt=True)
    server.fail_next(1, 429, match="*.narinfo", retry_after=soon)
    server.fail_next(1, 503, match="*.narinfo", retry_after=86400)
    assert isinstance(await fetcher.locate(HASH), Offer)
    first, second = delays(fetcher)
    assert 15 <= first <= 20
    assert second == fetcher.retry.max_delay


@pytest.mark.parametrize("status", [429, 408, 500])
async def test_transient_status_gives_up_after_the_configured_tries(
    status: int, make: Callable[..., object], server: CacheServer
) -> None:
    fetcher = await make(retries=2)  # type: ignore[misc]
    server.fail_next(10, status, match="*.narinfo")
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable)
    assert f"after 3 tries: {server.url}/{HASH}.narinfo: HTTP {status}" in answer.reason
    assert narinfo_statuses(server) == [status] * 3 and len(delays(fetcher)) == 2
    assert fetcher.is_up  # the server answered: it is up, just unhappy


async def test_retries_zero_means_one_try(make: Callable[..., object], server: CacheServer) -> None:
    fetcher = await make(retries=0)  # type: ignore[misc]
    server.fail_next(10, 503, match="*.narinfo")
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and "after 1 tries" in answer.reason
    assert narinfo_statuses(server) == [503] and delays(fetcher) == []


@pytest.mark.parametrize("status", [404, 403, 410, 401])
async def test_missing_statuses_are_not_retried(
    status: int, fetcher: BinaryCacheFetcher, server: CacheServer
) -> None:
    server.fail_next(10, status, match="*.narinfo")
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and f"HTTP {status}" in answer.reason
    assert narinfo_statuses(server) == [status] and delays(fetcher) == []


async def test_resets_are_retried(fetcher: BinaryCacheFetcher, server: CacheServer) -> None:
    # Closed before any response (twice: aiohttp itself retries a GET once on a reused
    # connection that turns out dead), then closed in the middle of the body.
    server.reset_next(2, match="*.narinfo")
    server.cut_after(5, match="*.narinfo")
    assert isinstance(await fetcher.locate(HASH), Offer)
    assert 2 <= len(delays(fetcher)) <= 3
    assert narinfo_statuses(server)[-3:] == [0, 200, 200]


async def test_refused_connections_mark_the_cache_down(
    make: Callable[..., object], server: CacheServer
) -> None:
    fetcher = await make()  # type: ignore[misc]
    assert fetcher.is_up
    server.stop()  # nobody listens on that port any more: connections are refused
    server.drop_connections()
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and "ClientConnectorError" in answer.reason
    assert len(delays(fetcher)) == 3 and not fetcher.is_up
    started = time.monotonic()
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and answer.reason.startswith("cache unreachable")
    assert len(delays(fetcher)) == 3  # answered from the down mark, without trying
    assert time.monotonic() - started < 0.5


async def test_unreachable_cache_at_start_answers_quickly(make: Callable[..., object]) -> None:
    started = time.monotonic()
    fetcher = await make(f"http://127.0.0.1:{closed_port()}")  # type: ignore[misc]
    assert not fetcher.is_up
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and answer.reason.startswith("cache unreachable")
    assert time.monotonic() - started < 2


async def test_start_with_cache_info_5xx_marks_down(
    make: Callable[..., object], server: CacheServer
) -> None:
    server.fail_next(1, 503, match="nix-cache-info")
    fetcher = await make()  # type: ignore[misc]
    assert not fetcher.is_up and fetcher.cache_priority is None
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and "HTTP 503" in answer.reason


async def test_cache_priority_and_latency_cost(fetcher: BinaryCacheFetcher) -> None:
    assert fetcher.cache_priority == 30
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Offer) and answer.cost >= 0


async def test_oversized_narinfo_is_refused(
    fetcher: BinaryCacheFetcher, root: Path
) -> None:
    (root / f"{HASH}.narinfo").write_bytes(b"X: y\n" * 300_000)
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and "more than" in answer.reason


# --- open: errors at the boundary -----------------------------------------------------------------
# (An offer of unknown size streams through aiohttp; one of a known small size is one plain GET.)


async def test_stall_mid_body_is_transient(
    make: Callable[..., object], server: CacheServer
) -> None:
    fetcher = await make(stall_timeout=0.2)  # type: ignore[misc]
    server.stall(after=10)
    received = bytearray()
    with pytest.raises(TransientFetchError, match="stalled"):
        async for chunk in fetcher.open(an_offer(f"{server.url}/nar/hello.nar", None)):
            received += chunk
    assert bytes(received) == NAR[:10]


async def test_no_response_at_all_is_transient(
    make: Callable[..., object], server: CacheServer
) -> None:
    fetcher = await make(stall_timeout=0.2)  # type: ignore[misc]
    server.hang_next(match="nar/*")
    with pytest.raises(TransientFetchError, match="no response"):
        await read_all(fetcher, an_offer(f"{server.url}/nar/hello.nar", None))


async def test_reset_mid_body_is_translated(
    fetcher: BinaryCacheFetcher, server: CacheServer
) -> None:
    server.cut_after(10)
    received = bytearray()
    with pytest.raises(TransientFetchError) as info:
        async for chunk in fetcher.open(an_offer(f"{server.url}/nar/hello.nar", None)):
            received += chunk
    assert isinstance(info.value.__cause__, aiohttp.ClientPayloadError)
    assert f"{server.url}/nar/hello.nar" in str(info.value)
    assert bytes(received) == NAR[:10]


async def test_reset_before_the_response_on_open_is_transient(
    fetcher: BinaryCacheFetcher, server: CacheServer
) -> None:
    server.reset_next(2, match="nar/*")  # 2: aiohttp retries once on a reused connection
    with pytest.raises(TransientFetchError) as info:
        await read_all(fetcher, an_offer(f"{server.url}/nar/hello.nar", None))
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectionError)



async def test_small_file_is_handed_on_whole_or_not_at_all(
    make: Callable[..., object], server: CacheServer
) -> None:
    fetcher = await make(stall_timeout=0.2)  # type: ignore[misc]
    offer = an_offer(f"{server.url}/nar/hello.nar")
    server.cut_after(10)  # the plain GET loses its connection: aiohttp starts over, once
    assert await read_all(fetcher, offer) == NAR
    assert [r.path for r in server.requests[-2:]] == ["nar/hello.nar"] * 2
    server.cut_after(10, times=2)
    received = bytearray()
    with pytest.raises(TransientFetchError):
        async for chunk in fetcher.open(offer):
            received += chunk
    assert received == NAR[:10]  # only aiohttp's attempt handed bytes on
    release = server.stall(after=10)
    try:
        with pytest.raises(TransientFetchError, match="stalled"):
            async for _chunk in fetcher.open(offer):
                raise AssertionError("bytes of an incomplete answer were handed on")
    finally:
        release.set()
    assert await read_all(fetcher, offer) == NAR

@pytest.mark.parametrize(
    ("status", "error"),
    [(404, NotAvailable), (410, NotAvailable), (503, TransientFetchError),
     (429, TransientFetchError), (400, FetchError)],
)
async def test_open_statuses(
    status: int, error: type[Exception], fetcher: BinaryCacheFetcher, server: CacheServer
) -> None:
    server.fail_next(1, status, match="nar/*")
    with pytest.raises(error, match=f"HTTP {status}") as info:
        await read_all(fetcher, an_offer(f"{server.url}/nar/hello.nar"))
    if error is FetchError:
        assert not isinstance(info.value, (NotAvailable, TransientFetchError))


async def test_connect_error_on_open_is_transient(fetcher: BinaryCacheFetcher) -> None:
    uri = f"http://127.0.0.1:{closed_port()}/nar/hello.nar"
    with pytest.raises(TransientFetchError, match="ClientConnectorError") as info:
        await read_all(fetcher, an_offer(uri))
    assert isinstance(info.value.__cause__, CONNECT_ERRORS)


async def test_range_requests(fetcher: BinaryCacheFetcher, server: CacheServer) -> None:
    uri = f"{server.url}/nar/hello.nar"
    assert await read_all(fetcher, an_offer(uri), 100) == NAR[100:]
    assert server.requests[-1].headers["Range"] == "bytes=100-"
    assert server.requests[-1].status == 206
    server.honour_range = False  # a server that ignores Range: we skip ourselves
    assert await read_all(fetcher, an_offer(uri), 100) == NAR[100:]
    assert server.requests[-1].status == 200
    with pytest.raises(FetchError, match="ends before offset"):
        await read_all(fetcher, an_offer(uri, size=None), len(NAR) + 10)
    server.honour_range = True
    with pytest.raises(FetchError, match="416"):
        await read_all(fetcher, an_offer(uri, size=None), 10_000)
    server.misrange()
    with pytest.raises(FetchError, match="Content-Range"):
        await read_all(fetcher, an_offer(uri), 100)
    server.clear_faults()
    assert await read_all(fetcher, an_offer(uri)) == NAR
    assert "Range" not in server.requests[-1].headers
    # the connection survives all that: later reads still work from the pool
    assert await read_all(fetcher, an_offer(uri), 7) == NAR[7:]


async def test_compressed_bytes_are_never_decoded(
    fetcher: BinaryCacheFetcher, server: CacheServer, root: Path
) -> None:
    server.add_headers("*.gz", {"Content-Encoding": "gzip", "Content-Type": "application/x-xz"})
    packed = (root / "nar" / "hello.nar.gz").read_bytes()
    got = await read_all(fetcher, an_offer(f"{server.url}/nar/hello.nar.gz", None))
    assert got == packed
    assert server.requests[-1].headers["Accept-Encoding"] == "identity"


async def test_open_works_for_any_http_uri_but_nothing_else(
    fetcher: BinaryCacheFetcher, root: Path, serve_cache: Serve
) -> None:
    other = serve_cache(root, "::1")
    assert await read_all(fetcher, an_offer(f"{other.url}/nar/hello.nar")) == NAR
    with pytest.raises(FetchError, match="not an http"):
        await read_all(fetcher, an_offer("ftp://127.0.0.1/x.nar"))


async def test_use_before_start_is_a_plugin_error() -> None:
    fetcher = BinaryCacheFetcher("idle", BinaryCacheOptions(url="http://127.0.0.1:8"))
    with pytest.raises(PluginError, match="before start"):
        await read_all(fetcher, an_offer("http://127.0.0.1:8/nar/hello.nar"))


async def test_bearer_token_wins_over_netrc(
    make: Callable[..., object], server: CacheServer, tmp_path: Path
) -> None:
    netrc, token = tmp_path / "netrc", tmp_path / "token"
    netrc.write_text("machine 127.0.0.1 login u password p\n")
    token.write_text("bearer-secret")
    server.require_bearer("bearer-secret")
    fetcher = await make(netrc_file=netrc, bearer_token_file=token)  # type: ignore[misc]
    assert isinstance(await fetcher.locate(HASH), Offer)
    assert server.requests[-1].headers["Authorization"] == "Bearer bearer-secret"


async def test_netrc_credentials_are_sent(
    make: Callable[..., object], server: CacheServer, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login u password p\n")
    server.require_basic("u", "p")
    fetcher = await make(netrc_file=netrc)  # type: ignore[misc]
    assert fetcher.is_up and isinstance(await fetcher.locate(HASH), Offer)


# --- the helpers ----------------------------------------------------------------------------------


class _Headers:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = {k.lower(): v for k, v in headers.items()}


def test_retry_after_parsing() -> None:
    def parse(value: str) -> float | None:
        return retry_after_seconds(_Headers({"Retry-After": value}))

    assert parse("12") == 12.0
    assert parse("soon") is None
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse(past) == 0.0
    assert retry_after_seconds(_Headers({})) is None


def test_backoff_is_bounded() -> None:
    policy = RetryPolicy(retries=10, base_delay=1.0, max_delay=5.0)
    assert policy.tries == 11
    assert all(2.5 <= policy.delay(n) <= 5.0 for n in range(4, 11))
    assert policy.delay(3, retry_after=1000) == 5.0


def test_bearer_auth_matches_origin_with_default_ports(tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine other.example login u password p\n")
    auth = RequestAuth(netrc, "tok", "https://cache.example/prefix/")
    assert auth.header("https://cache.example:443/nar/x") == "Bearer tok"
    assert auth.header("https://CACHE.example/x") == "Bearer tok"
    assert auth.header("http://cache.example/x") is None
    assert auth.header("https://cache.example.evil/x") is None
    assert auth.header("https://other.example/x") == "Basic dTpw"
    assert "tok" not in repr(auth)
