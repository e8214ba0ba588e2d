"""HTTP failure handling of the binary-cache fetcher, driven by respx (no sockets).

Real-server behaviour lives in test_fetcher_binary_cache.py; here are the failures a loopback
server cannot produce on cue: bursts of 5xx, Retry-After, 429, resets and stalls mid-body.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import respx

from fetchers._http import BearerAuth, RetryPolicy, retry_after_seconds
from fetchers.binary_cache import BinaryCacheFetcher, BinaryCacheOptions
from substituter.errors import FetchError, NotAvailable, PluginError, TransientFetchError
from substituter.nix.hashes import Hash
from substituter.nix.narinfo import NarInfo
from substituter.nix.store_path import validate_hash_part
from substituter.plugin import Offer, Unavailable

BASE = "http://127.0.0.1:8"
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
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        mock.get("/nix-cache-info").respond(200, text="StoreDir: /nix/store\nPriority: 30\n")
        yield mock


class Recorder:
    """Stands in for asyncio.sleep in the retry policy: records delays, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
async def fetcher(router: respx.MockRouter) -> AsyncIterator[BinaryCacheFetcher]:
    fetcher = await make_fetcher()
    yield fetcher
    await fetcher.stop()


async def make_fetcher(**options: object) -> BinaryCacheFetcher:
    opts = BinaryCacheOptions(url=BASE, **options)  # type: ignore[arg-type]
    fetcher = BinaryCacheFetcher("mocked", opts)
    fetcher.retry.sleep = Recorder()
    await fetcher.start()
    return fetcher


def delays(fetcher: BinaryCacheFetcher) -> list[float]:
    recorder = fetcher.retry.sleep
    assert isinstance(recorder, Recorder)
    return recorder.delays


def an_offer(uri: str = f"{BASE}/nar/hello.nar", size: int | None = len(NAR)) -> Offer:
    return Offer(info=NarInfo.parse(NARINFO), uri=uri, file_size=size)


async def read_all(fetcher: BinaryCacheFetcher, offer: Offer, offset: int = 0) -> bytes:
    return b"".join([chunk async for chunk in fetcher.open(offer, offset)])


def test_hash_constant_is_valid() -> None:
    assert validate_hash_part(HASH) == HASH


# --- locate: retries ------------------------------------------------------------------------------


async def test_burst_of_5xx_then_success(
    fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    route = router.get(f"/{HASH}.narinfo").mock(
        side_effect=[httpx.Response(503), httpx.Response(502), httpx.Response(504),
                     httpx.Response(200, text=NARINFO)]
    )
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Offer) and answer.uri == f"{BASE}/nar/hello.nar"
    assert route.call_count == 4
    # jittered exponential: each delay within [ceiling/2, ceiling], ceilings doubling
    ceilings = [0.2, 0.4, 0.8]
    assert len(delays(fetcher)) == 3
    for delay, ceiling in zip(delays(fetcher), ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


async def test_retry_after_seconds_is_honoured(
    fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    router.get(f"/{HASH}.narinfo").mock(
        side_effect=[httpx.Response(503, headers={"Retry-After": "7"}),
                     httpx.Response(200, text=NARINFO)]
    )
    assert isinstance(await fetcher.locate(HASH), Offer)
    assert delays(fetcher) == [7.0]


async def test_retry_after_date_is_honoured_and_bounded(
    fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    soon = email.utils.formatdate(time.time() + 20, usegmt=True)
    router.get(f"/{HASH}.narinfo").mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": soon}),
                     httpx.Response(503, headers={"Retry-After": "86400"}),
                     httpx.Response(200, text=NARINFO)]
    )
    assert isinstance(await fetcher.locate(HASH), Offer)
    first, second = delays(fetcher)
    assert 15 <= first <= 20
    assert second == fetcher.retry.max_delay


@pytest.mark.parametrize("status", [429, 408, 500])
async def test_transient_status_gives_up_after_the_configured_tries(
    status: int, router: respx.MockRouter
) -> None:
    fetcher = await make_fetcher(retries=2)
    try:
        route = router.get(f"/{HASH}.narinfo").respond(status)
        answer = await fetcher.locate(HASH)
        assert isinstance(answer, Unavailable)
        assert f"after 3 tries: {BASE}/{HASH}.narinfo: HTTP {status}" in answer.reason
        assert route.call_count == 3 and len(delays(fetcher)) == 2
        assert fetcher.is_up  # the server answered: it is up, just unhappy
    finally:
        await fetcher.stop()


async def test_retries_zero_means_one_try(router: respx.MockRouter) -> None:
    fetcher = await make_fetcher(retries=0)
    try:
        route = router.get(f"/{HASH}.narinfo").respond(503)
        answer = await fetcher.locate(HASH)
        assert isinstance(answer, Unavailable) and "after 1 tries" in answer.reason
        assert route.call_count == 1 and delays(fetcher) == []
    finally:
        await fetcher.stop()


@pytest.mark.parametrize("status", [404, 403, 410, 401])
async def test_missing_statuses_are_not_retried(
    status: int, fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    route = router.get(f"/{HASH}.narinfo").respond(status)
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and f"HTTP {status}" in answer.reason
    assert route.call_count == 1 and delays(fetcher) == []


async def test_resets_are_retried(fetcher: BinaryCacheFetcher, router: respx.MockRouter) -> None:
    router.get(f"/{HASH}.narinfo").mock(
        side_effect=[httpx.ReadError("connection reset by peer"),
                     httpx.RemoteProtocolError("server disconnected"),
                     httpx.Response(200, text=NARINFO)]
    )
    assert isinstance(await fetcher.locate(HASH), Offer)
    assert len(delays(fetcher)) == 2


async def test_refused_connections_mark_the_cache_down(
    fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    route = router.get(f"/{HASH}.narinfo").mock(side_effect=httpx.ConnectError("refused"))
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and "ConnectError" in answer.reason
    assert route.call_count == 4 and not fetcher.is_up
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and answer.reason.startswith("cache unreachable")
    assert route.call_count == 4  # answered from the down mark


async def test_start_with_cache_info_5xx_marks_down(router: respx.MockRouter) -> None:
    router.get("/nix-cache-info").respond(503)
    fetcher = await make_fetcher()
    try:
        assert not fetcher.is_up and fetcher.cache_priority is None
        answer = await fetcher.locate(HASH)
        assert isinstance(answer, Unavailable) and "HTTP 503" in answer.reason
    finally:
        await fetcher.stop()


async def test_cache_priority_and_latency_cost(
    fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    assert fetcher.cache_priority == 30
    router.get(f"/{HASH}.narinfo").respond(200, text=NARINFO)
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Offer) and answer.cost >= 0


async def test_oversized_narinfo_is_refused(
    fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    router.get(f"/{HASH}.narinfo").respond(200, content=b"X: y\n" * 300_000)
    answer = await fetcher.locate(HASH)
    assert isinstance(answer, Unavailable) and "more than" in answer.reason


# --- open: errors at the boundary -----------------------------------------------------------------


async def test_stall_mid_body_is_transient(router: respx.MockRouter) -> None:
    async def stalling() -> AsyncIterator[bytes]:
        yield NAR[:10]
        await asyncio.sleep(3600)
        yield NAR[10:]

    router.get("/nar/hello.nar").respond(200, stream=stalling())
    fetcher = await make_fetcher(stall_timeout=0.05)
    received = bytearray()
    try:
        with pytest.raises(TransientFetchError, match="stalled"):
            async for chunk in fetcher.open(an_offer()):
                received += chunk
        assert bytes(received) == NAR[:10]
    finally:
        await fetcher.stop()


async def test_no_response_at_all_is_transient(router: respx.MockRouter) -> None:
    async def never(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    router.get("/nar/hello.nar").mock(side_effect=never)
    fetcher = await make_fetcher(stall_timeout=0.05)
    try:
        with pytest.raises(TransientFetchError, match="no response"):
            await read_all(fetcher, an_offer())
    finally:
        await fetcher.stop()


@pytest.mark.parametrize(
    "error", [httpx.ReadError("connection reset by peer"), httpx.ReadTimeout("read timed out")]
)
async def test_error_mid_body_is_translated(
    error: httpx.HTTPError, fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    async def breaking() -> AsyncIterator[bytes]:
        yield NAR[:10]
        raise error

    router.get("/nar/hello.nar").respond(200, stream=breaking())
    with pytest.raises(TransientFetchError) as info:
        await read_all(fetcher, an_offer())
    assert info.value.__cause__ is error
    assert f"{BASE}/nar/hello.nar" in str(info.value)


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, NotAvailable), (410, NotAvailable), (503, TransientFetchError),
     (429, TransientFetchError), (400, FetchError)],
)
async def test_open_statuses(
    status: int, error: type[Exception], fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    router.get("/nar/hello.nar").respond(status)
    with pytest.raises(error, match=f"HTTP {status}") as info:
        await read_all(fetcher, an_offer())
    if error is FetchError:
        assert not isinstance(info.value, (NotAvailable, TransientFetchError))


async def test_connect_error_on_open_is_transient(
    fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    router.get("/nar/hello.nar").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(TransientFetchError, match="ConnectError") as info:
        await read_all(fetcher, an_offer())
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_range_requests(fetcher: BinaryCacheFetcher, router: respx.MockRouter) -> None:
    route = router.get("/nar/hello.nar")
    end = len(NAR) - 1
    route.respond(206, content=NAR[100:], headers={"Content-Range": f"bytes 100-{end}/{len(NAR)}"})
    assert await read_all(fetcher, an_offer(), 100) == NAR[100:]
    assert route.calls.last.request.headers["Range"] == "bytes=100-"
    route.respond(200, content=NAR)  # a server that ignores Range: we skip ourselves
    assert await read_all(fetcher, an_offer(), 100) == NAR[100:]
    route.respond(206, content=NAR[50:], headers={"Content-Range": f"bytes 50-{end}/{len(NAR)}"})
    with pytest.raises(FetchError, match="Content-Range"):
        await read_all(fetcher, an_offer(), 100)
    route.respond(416)
    with pytest.raises(FetchError, match="416"):
        await read_all(fetcher, an_offer(size=None), 10_000)
    route.respond(200, content=NAR[:50])
    with pytest.raises(FetchError, match="ends before offset"):
        await read_all(fetcher, an_offer(size=None), 100)
    route.respond(200, content=NAR)
    assert await read_all(fetcher, an_offer()) == NAR
    assert "Range" not in route.calls.last.request.headers


async def test_compressed_bytes_are_never_decoded(
    fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    packed = gzip.compress(NAR)
    route = router.get("/nar/hello.nar.gz").respond(
        200,
        content=packed,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/x-xz"},
    )
    assert await read_all(fetcher, an_offer(f"{BASE}/nar/hello.nar.gz", None)) == packed
    assert route.calls.last.request.headers["Accept-Encoding"] == "identity"


async def test_open_works_for_any_http_uri_but_nothing_else(
    fetcher: BinaryCacheFetcher, router: respx.MockRouter
) -> None:
    with respx.mock(base_url="https://[::1]:9") as other:
        other.get("/x.nar").respond(200, content=NAR)
        assert await read_all(fetcher, an_offer("https://[::1]:9/x.nar")) == NAR
    with pytest.raises(FetchError, match="not an http"):
        await read_all(fetcher, an_offer("ftp://127.0.0.1/x.nar"))


async def test_use_before_start_is_a_plugin_error() -> None:
    fetcher = BinaryCacheFetcher("idle", BinaryCacheOptions(url=BASE))
    with pytest.raises(PluginError, match="before start"):
        await read_all(fetcher, an_offer())


async def test_bearer_token_wins_over_netrc(router: respx.MockRouter, tmp_path: Path) -> None:
    netrc, token = tmp_path / "netrc", tmp_path / "token"
    netrc.write_text("machine 127.0.0.1 login u password p\n")
    token.write_text("bearer-secret")
    route = router.get(f"/{HASH}.narinfo").respond(200, text=NARINFO)
    fetcher = await make_fetcher(netrc_file=netrc, bearer_token_file=token)
    try:
        assert isinstance(await fetcher.locate(HASH), Offer)
        assert route.calls.last.request.headers["Authorization"] == "Bearer bearer-secret"
    finally:
        await fetcher.stop()


# --- the helpers ----------------------------------------------------------------------------------


def test_retry_after_parsing() -> None:
    def parse(value: str) -> float | None:
        return retry_after_seconds(httpx.Response(503, headers={"Retry-After": value}))

    assert parse("12") == 12.0
    assert parse("soon") is None
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse(past) == 0.0
    assert retry_after_seconds(httpx.Response(503)) is None


def test_backoff_is_bounded() -> None:
    policy = RetryPolicy(retries=10, base_delay=1.0, max_delay=5.0)
    assert policy.tries == 11
    assert all(2.5 <= policy.delay(n) <= 5.0 for n in range(4, 11))
    assert policy.delay(3, retry_after=1000) == 5.0


def test_bearer_auth_matches_origin_with_default_ports() -> None:
    auth = BearerAuth("tok", "https://cache.example/prefix/")

    def header(url: str) -> str | None:
        request = httpx.Request("GET", url)
        return next(auth.sync_auth_flow(request)).headers.get("Authorization")

    assert header("https://cache.example:443/nar/x") == "Bearer tok"
    assert header("https://CACHE.example/x") == "Bearer tok"
    assert header("http://cache.example/x") is None
    assert header("https://cache.example.evil/x") is None
    assert "tok" not in repr(auth)
