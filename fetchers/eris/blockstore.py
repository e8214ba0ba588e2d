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

import aiohttp

from substituter.errors import (
    FetchError,
    HashMismatch,
    NotAvailable,
    TransientFetchError,
)

from .._http import RetryPolicy, is_missing_status, is_transient_status
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
    """Blocks over HTTP N2R, on keep-alive connections, with retries of transient failures.

    aiohttp rather than httpx: a block is one small request, and httpx's per-request cost
    (connection-pool bookkeeping, async-library detection) was most of an ERIS fetch's time.
    At most ``max_connections`` requests are in flight; more wait for a free connection.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 32,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an N2R block store needs an http(s) URL, got {url!r}")
        if max_connections < 1:
            raise ValueError(f"an N2R block store needs 1 or more connections, got {max_connections}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_connections = max_connections
        self._own_session = session is None
        self._session = session

    def describe(self) -> str:
        return self.url

    def block_url(self, ref: bytes) -> str:
        return self.url + n2r_path(ref)

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: an aiohttp session belongs to the event loop it was created in.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                # Blocks are stored bytes: never ask for, or undo, a content encoding.
                headers={"Accept-Encoding": "identity"},
                auto_decompress=False,
            )
        return self._session

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
        try:
            async with asyncio.timeout(self.timeout):
                async with self._client().get(url) as response:
                    if response.status != 200:
                        raise _status_error(url, "GET", response)
                    return await _read_block(url, response)
        except TimeoutError as exc:
            raise TransientFetchError(f"{url}: no complete answer in {self.timeout:g}s") from exc
        except aiohttp.ClientError as exc:
            raise _translate(exc, url) from exc

    async def put(self, ref: bytes, block: bytes) -> None:
        check_block(ref, block)
        url = self.block_url(ref)
        headers = {"Content-Type": "application/octet-stream"}
        for attempt in range(1, self.retry.tries + 1):
            try:
                async with asyncio.timeout(self.timeout):
                    async with self._client().put(url, data=block, headers=headers) as response:
                        if 200 <= response.status < 300:
                            return
                        error = _status_error(url, "PUT", response)
            except TimeoutError as exc:
                error = TransientFetchError(f"{url}: PUT not answered in {self.timeout:g}s")
                error.__cause__ = exc
            except aiohttp.ClientError as exc:
                error = _translate(exc, url)
                error.__cause__ = exc
            if isinstance(error, NotAvailable):  # a store that will not take it is no retry case
                raise FetchError(f"{error} (PUT refused)") from error
            if not isinstance(error, TransientFetchError) or attempt == self.retry.tries:
                raise error
            await self.retry.sleep(self.retry.delay(attempt))

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None


async def _read_block(url: str, response: aiohttp.ClientResponse) -> bytes:
    """The body of a block answer, refused unread (or once too long) beyond the largest block."""
    if response.content_length is not None:
        if response.content_length > MAX_BLOCK:
            raise FetchError(
                f"{url}: answer of {response.content_length} bytes is longer than any ERIS block"
                f" ({MAX_BLOCK} bytes)"
            )
        return await response.read()
    block = bytearray()
    async for chunk in response.content.iter_any():
        block += chunk
        if len(block) > MAX_BLOCK:
            raise FetchError(f"{url}: answer is longer than any ERIS block ({MAX_BLOCK} bytes)")
    return bytes(block)


def _status_error(url: str, method: str, response: aiohttp.ClientResponse) -> FetchError:
    message = f"{url}: {method} answered HTTP {response.status} {response.reason or ''}".rstrip()
    if is_missing_status(response.status):
        return NotAvailable(message)
    if is_transient_status(response.status):
        return TransientFetchError(message)
    return FetchError(message)


def _translate(exc: aiohttp.ClientError, url: str) -> FetchError:
    """Connection trouble (refused, reset, closed mid-body) may pass; anything else will not."""
    detail = f"{url}: {type(exc).__name__}: {exc}"
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return TransientFetchError(detail)
    return FetchError(detail)


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
