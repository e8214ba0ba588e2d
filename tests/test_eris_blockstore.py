"""ERIS block stores: a directory, a real N2R server on loopback, fallback, and verified decoding."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from fetchers._http import RetryPolicy
from fetchers.eris.blockstore import (
    DirectoryBlockStore,
    FallbackBlockStore,
    HttpBlockStore,
    decode_from,
    n2r_path,
)
from fetchers.eris.codec import ErisError, block_urn, encode
from fetchers.eris.server import start_server
from substituter.errors import FetchError, HashMismatch, NotAvailable, SizeMismatch, TransientFetchError


def a_block(size: int = 1024) -> tuple[bytes, bytes]:
    block = os.urandom(size)
    return hashlib.blake2b(block, digest_size=32).digest(), block


async def no_sleep(_: float) -> None:
    pass


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[DirectoryBlockStore, str]]:
    store = DirectoryBlockStore(tmp_path / "served")
    runner, port = await start_server(store)
    try:
        yield store, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


# --- directory ------------------------------------------------------------------------------


async def test_directory_round_trip_sharded_and_atomic(tmp_path: Path) -> None:
    store = DirectoryBlockStore(tmp_path / "blocks")
    ref, block = a_block(32768)
    assert await store.get(ref) is None
    await store.put(ref, block)
    await store.put(ref, block)  # idempotent
    assert await store.get(ref) == block
    name = block_urn(ref).rpartition(":")[2]
    assert store.path_of(ref) == tmp_path / "blocks" / name[:2] / name
    files = [p for p in (tmp_path / "blocks").rglob("*") if p.is_file()]
    assert files == [store.path_of(ref)]  # no temporary file left behind


async def test_directory_refuses_misnamed_and_odd_sized_blocks(tmp_path: Path) -> None:
    store = DirectoryBlockStore(tmp_path / "blocks")
    ref, block = a_block()
    with pytest.raises(HashMismatch, match=block_urn(ref)):
        await store.put(ref, block[:-1] + bytes([block[-1] ^ 1]))
    with pytest.raises(ErisError, match="1000 bytes"):
        await store.put(hashlib.blake2b(block[:1000], digest_size=32).digest(), block[:1000])
    assert not (tmp_path / "blocks").exists() or not any((tmp_path / "blocks").rglob("*"))


# --- N2R over HTTP --------------------------------------------------------------------------


async def test_http_put_then_get_through_real_server(server: tuple[DirectoryBlockStore, str]) -> None:
    served, url = server
    store = HttpBlockStore(url)
    try:
        ref, block = a_block()
        assert await store.get(ref) is None
        await store.put(ref, block)
        assert served.get_sync(ref) == block
        assert await store.get(ref) == block
    finally:
        await store.aclose()


async def test_server_validates_urns_and_methods(
    server: tuple[DirectoryBlockStore, str], client: httpx.AsyncClient
) -> None:
    served, url = server
    ref, block = a_block()
    await served.put(ref, block)
    head = await client.head(url + n2r_path(ref))
    assert head.status_code == 200 and head.headers["content-length"] == "1024"
    got = await client.get(url + n2r_path(ref))
    assert got.content == block and "immutable" in got.headers["cache-control"]
    for query in ("urn:blake2b:short", "urn:eris:" + "A" * 106, "garbage", ""):
        response = await client.get(f"{url}/uri-res/N2R?{query}")
        assert response.status_code == 400, query
    missing = await client.get(url + n2r_path(bytes(32)))
    assert missing.status_code == 404 and missing.headers["cache-control"] == "no-store"


async def test_server_put_checks_the_name_and_can_name_it(
    server: tuple[DirectoryBlockStore, str], client: httpx.AsyncClient
) -> None:
    served, url = server
    ref, block = a_block()
    other_ref, _ = a_block()
    wrong = await client.put(url + n2r_path(other_ref), content=block)
    assert wrong.status_code == 400 and "BLAKE2b" in wrong.text
    assert served.get_sync(other_ref) is None
    named = await client.put(url + "/uri-res/N2R", content=block)
    assert named.status_code == 201 and named.headers["content-location"] == n2r_path(ref)
    assert served.get_sync(ref) == block
    too_big = await client.put(url + "/uri-res/N2R", content=bytes(32769))
    assert too_big.status_code == 413


async def test_read_only_server_refuses_put(tmp_path: Path, client: httpx.AsyncClient) -> None:
    runner, port = await start_server(DirectoryBlockStore(tmp_path), writable=False)
    try:
        ref, block = a_block()
        response = await client.put(f"http://127.0.0.1:{port}{n2r_path(ref)}", content=block)
        assert response.status_code == 405
    finally:
        await runner.cleanup()


@asynccontextmanager
async def scripted_server(answers: list[tuple[int, bytes]]) -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback server answering each request with the next (status, body) (the last repeats)."""
    asked: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        asked.append(request.path_qs)
        status, body = answers.pop(0) if len(answers) > 1 else answers[0]
        return web.Response(status=status, body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", asked
    finally:
        await runner.cleanup()


async def test_http_store_retries_transient_failures_then_gives_up() -> None:
    ref, block = a_block()
    answers = [(503, b""), (200, block)]
    async with scripted_server(answers) as (url, asked):
        store = HttpBlockStore(url, retry=RetryPolicy(retries=2, sleep=no_sleep))
        try:
            assert await store.get(ref) == block
            assert asked == [n2r_path(ref)] * 2
            answers[:] = [(502, b"")]
            with pytest.raises(TransientFetchError, match="gave up after 3 tries"):
                await store.get(ref)
            answers[:] = [(200, bytes(40000))]
            with pytest.raises(FetchError, match="longer than any ERIS block"):
                await store.get(ref)
            answers[:] = [(403, b"")]
            assert await store.get(ref) is None
        finally:
            await store.aclose()


async def test_http_store_refuses_an_overlong_answer_of_unknown_length() -> None:
    ref, _ = a_block()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(40):
            await response.write(bytes(1024))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/uri-res/N2R", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    store = HttpBlockStore(f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        with pytest.raises(FetchError, match="longer than any ERIS block"):
            await store.get(ref)
    finally:
        await store.aclose()
        await runner.cleanup()


async def test_http_store_connection_refused_is_transient() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = HttpBlockStore(f"http://127.0.0.1:{port}", retry=RetryPolicy(retries=1, sleep=no_sleep))
    try:
        with pytest.raises(TransientFetchError, match="gave up after 2 tries"):
            await store.get(bytes(32))
    finally:
        await store.aclose()


# --- fallback -------------------------------------------------------------------------------


async def test_fallback_skips_damaged_and_missing_copies(tmp_path: Path) -> None:
    first, second = DirectoryBlockStore(tmp_path / "a"), DirectoryBlockStore(tmp_path / "b")
    ref, block = a_block()
    await second.put(ref, block)
    damaged = first.path_of(ref)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(bytes(1024))
    both = FallbackBlockStore([first, second])
    assert await both.get(ref) == block
    only_damaged = FallbackBlockStore([first])
    with pytest.raises(HashMismatch, match=str(tmp_path / "a")):
        await only_damaged.get(ref)
    assert await FallbackBlockStore([second]).get(bytes(32)) is None


# --- decoding through a store ---------------------------------------------------------------


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in stream])


async def test_decode_from_http_store(server: tuple[DirectoryBlockStore, str]) -> None:
    served, url = server
    content = os.urandom(200_000)
    cap, blocks = encode(content, 1024)
    for ref, block in blocks.items():
        await served.put(ref, block)
    store = HttpBlockStore(url)
    try:
        assert cap.level >= 2
        assert await collect(decode_from(cap, store, max_size=len(content), concurrency=8)) == content
        missing_ref = next(r for r in blocks if r != cap.root_ref)
        served.path_of(missing_ref).unlink()
        with pytest.raises(NotAvailable, match=block_urn(missing_ref)):
            await collect(decode_from(cap, store, max_size=len(content)))
    finally:
        await store.aclose()


async def test_decode_from_refuses_a_tree_too_big_before_fetching(tmp_path: Path) -> None:
    content = os.urandom(100_000)
    cap, blocks = encode(content, 1024)
    asked: list[bytes] = []

    class Counting(DirectoryBlockStore):
        async def get(self, ref: bytes) -> bytes | None:
            asked.append(ref)
            return blocks.get(ref)

    with pytest.raises(SizeMismatch):
        await collect(decode_from(cap, Counting(tmp_path), max_size=1000))
    assert asked == []


async def test_decode_from_detects_a_tampered_block(tmp_path: Path) -> None:
    content = os.urandom(50_000)
    cap, blocks = encode(content, 1024)
    store = DirectoryBlockStore(tmp_path)
    for ref, block in blocks.items():
        await store.put(ref, block)
    victim = next(r for r in blocks if r != cap.root_ref)
    path = store.path_of(victim)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match=block_urn(victim).rpartition(":")[2]):
        await collect(decode_from(cap, store, max_size=len(content)))
