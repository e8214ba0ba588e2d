"""Where ERIS blocks live: a local directory, an HTTP N2R server, or several of them in turn.

A block store is addressed by reference (the 32-byte BLAKE2b-256 of the encrypted block). Stores
only move bytes; whether a block is the right one is checked by the codec while decoding (and by
`put`, so a store never keeps a block under the wrong name).

HTTP stores speak "ERIS over HTTP": ``GET {url}/uri-res/N2R?urn:blake2b:<ref>`` answers the raw
block (404 when missing) and ``PUT`` to the same URL stores one. A server-decoded
``N2R?urn:eris:...`` is never asked for: its bytes could not be checked block by block.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from substituter.errors import (
    FetchError,
    HashMismatch,
    NotAvailable,
    TransientFetchError,
)

from .._http import RetryPolicy, is_missing_status, is_transient_status, stream_url, translate_http_error
from .codec import BLOCK_SIZES, ErisError, ReadCapability, block_urn, decode

__all__ = [
    "BlockStore",
    "DirectoryBlockStore",
    "HttpBlockStore",
    "FallbackBlockStore",
    "check_block",
    "n2r_path",
    "open_block_store",
    "open_block_stores",
    "decode_from",
]

log = logging.getLogger("fetchers.eris.blockstore")

#: The largest block ERIS has; anything longer from a server is refused unread.
MAX_BLOCK = max(BLOCK_SIZES)
N2R_PATH = "/uri-res/N2R"


class BlockStore(Protocol):
    """A place to get and put ERIS blocks by reference."""

    async def get(self, ref: bytes) -> bytes | None:
        """The block named ``ref``, or None when this store does not have it."""

    async def put(self, ref: bytes, block: bytes) -> None:
        """Store ``block`` under ``ref`` (which must be its BLAKE2b-256)."""

    async def aclose(self) -> None:
        """Release connections and file handles."""

    def describe(self) -> str:
        """Where the blocks are, for logs and errors."""


def check_block(ref: bytes, block: bytes) -> None:
    """Refuse to store a block under a name it does not have, or of a size ERIS never makes."""
    if len(block) not in BLOCK_SIZES:
        raise ErisError(f"a block has {len(block)} bytes; ERIS blocks have {BLOCK_SIZES}")
    actual = hashlib.blake2b(block, digest_size=32).digest()
    if actual != ref:
        raise HashMismatch(f"block {block_urn(ref)} has BLAKE2b-256 {block_urn(actual)}")


def n2r_path(ref: bytes) -> str:
    """The N2R request target of one block: ``/uri-res/N2R?urn:blake2b:<ref>``."""
    return f"{N2R_PATH}?{block_urn(ref)}"


# --- a local directory --------------------------------------------------------------------


class DirectoryBlockStore:
    """One file per block, ``ROOT/<2 chars>/<52-char base32 ref>``; writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()

    def describe(self) -> str:
        return str(self.root)

    def path_of(self, ref: bytes) -> Path:
        name = block_urn(ref).rpartition(":")[2]
        # 1024 shards keep directories small even for millions of blocks.
        return self.root / name[:2] / name

    async def get(self, ref: bytes) -> bytes | None:
        return await asyncio.to_thread(self.get_sync, ref)

    def get_sync(self, ref: bytes) -> bytes | None:
        path = self.path_of(ref)
        try:
            with path.open("rb") as file:
                block = file.read(MAX_BLOCK + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FetchError(f"{path}: cannot read block: {exc.strerror}") from exc
        return block

    async def put(self, ref: bytes, block: bytes) -> None:
        await asyncio.to_thread(self.put_sync, ref, block)

    def put_sync(self, ref: bytes, block: bytes) -> None:
        check_block(ref, block)
        path = self.path_of(ref)
        if path.exists():  # content-addressed: the file already holds these bytes
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(block)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    async def aclose(self) -> None:
        pass


# --- an HTTP N2R server -------------------------------------------------------------------


class HttpBlockStore:
    """Blocks over HTTP N2R, with a pooled client and retries of transient failures."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 32,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an N2R block store needs an http(s) URL, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    def describe(self) -> str:
        return self.url

    def block_url(self, ref: bytes) -> str:
        return self.url + n2r_path(ref)

    async def get(self, ref: bytes) -> bytes | None:
        url = self.block_url(ref)
        for attempt in range(1, self.retry.tries + 1):
            try:
                return await self._get_once(url)
            except NotAvailable:
                return None
            except TransientFetchError as exc:
                if attempt == self.retry.tries:
                    raise TransientFetchError(f"gave up after {attempt} tries: {exc}") from exc
                log.info("%s; retrying", exc)
            await self.retry.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    async def _get_once(self, url: str) -> bytes:
        block = bytearray()
        async for chunk in stream_url(self._client, url, 0, self.timeout):
            block += chunk
            if len(block) > MAX_BLOCK:
                raise FetchError(f"{url}: answer is longer than any ERIS block ({MAX_BLOCK} bytes)")
        return bytes(block)

    async def put(self, ref: bytes, block: bytes) -> None:
        check_block(ref, block)
        url = self.block_url(ref)
        for attempt in range(1, self.retry.tries + 1):
            try:
                response = await self._client.put(
                    url, content=block, headers={"Content-Type": "application/octet-stream"}
                )
            except httpx.HTTPError as exc:
                error = translate_http_error(exc, url)
                if not isinstance(error, TransientFetchError) or attempt == self.retry.tries:
                    raise error from exc
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return
                message = f"{url}: PUT refused with HTTP {status} {response.reason_phrase}"
                if is_missing_status(status) or not is_transient_status(status):
                    raise FetchError(message)
                if attempt == self.retry.tries:
                    raise TransientFetchError(message)
            await self.retry.sleep(self.retry.delay(attempt))

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()


# --- several stores, tried in order -------------------------------------------------------


class FallbackBlockStore:
    """Asks each store in turn; a store that answers a wrong block is skipped like a missing one.

    Checking here (the codec checks again) lets a good copy elsewhere stand in for a damaged one.
    """

    def __init__(self, stores: Sequence[BlockStore]) -> None:
        if not stores:
            raise ValueError("FallbackBlockStore needs at least one store")
        self.stores = list(stores)

    def describe(self) -> str:
        return ", ".join(store.describe() for store in self.stores)

    async def get(self, ref: bytes) -> bytes | None:
        problems: list[str] = []
        damaged = transient = False
        for store in self.stores:
            try:
                block = await store.get(ref)
                if block is None:
                    continue
                check_block(ref, block)
            except FetchError as exc:
                transient = transient or isinstance(exc, TransientFetchError)
                problems.append(f"{store.describe()}: {exc}")
                continue
            except (HashMismatch, ErisError) as exc:  # from check_block, or a checking store
                log.warning("%s served a damaged block: %s", store.describe(), exc)
                damaged = True
                problems.append(f"{store.describe()}: {exc}")
                continue
            return block
        if not problems:
            return None
        message = f"block {block_urn(ref)}: " + "; ".join(problems)
        if damaged:  # the codec would refuse it too; say which store sent it
            raise HashMismatch(message)
        raise TransientFetchError(message) if transient else FetchError(message)

    async def put(self, ref: bytes, block: bytes) -> None:
        for store in self.stores:
            await store.put(ref, block)

    async def aclose(self) -> None:
        for store in self.stores:
            await store.aclose()


# --- construction and decoding ------------------------------------------------------------


def open_block_store(spec: str | Path, *, timeout: float = 30.0, max_connections: int = 32) -> BlockStore:
    """An http(s) URL is an N2R server; anything else a local block directory."""
    text = str(spec)
    if urlsplit(text).scheme in ("http", "https"):
        return HttpBlockStore(text, timeout=timeout, max_connections=max_connections)
    return DirectoryBlockStore(Path(text))


def open_block_stores(
    specs: Sequence[str | Path], *, timeout: float = 30.0, max_connections: int = 32
) -> BlockStore:
    """One store for one spec, else a FallbackBlockStore over them in the given order."""
    stores = [open_block_store(s, timeout=timeout, max_connections=max_connections) for s in specs]
    return stores[0] if len(stores) == 1 else FallbackBlockStore(stores)


async def decode_from(
    cap: ReadCapability, store: BlockStore, *, max_size: int, concurrency: int = 16
) -> AsyncGenerator[bytes, None]:
    """The content of ``cap`` from ``store``, every block checked, never more than ``max_size``.

    Up to ``concurrency`` blocks are fetched at once. A missing block is
    :class:`~substituter.errors.NotAvailable` naming it and the store.
    """

    async def get_block(ref: bytes) -> bytes | None:
        block = await store.get(ref)
        if block is None:
            raise NotAvailable(f"block {block_urn(ref)} is not in {store.describe()}")
        return block

    stream = decode(cap, get_block, max_size=max_size, concurrency=concurrency)
    try:
        async for piece in stream:
            yield piece
    finally:
        await stream.aclose()
