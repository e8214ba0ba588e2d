"""The ``bazel-cas`` fetcher: NARs kept in a Bazel remote cache's content-addressed storage.

A store path is found in two steps.  Its narinfo comes from an index: the cache's action cache
(``GET {index-url}/ac/<sha256 hex of the hash part>``) or a directory of ``<hash>.narinfo`` files.
The NAR itself is the CAS blob named by the narinfo's NarHash (``GET {url}/cas/<hex>``), stored
uncompressed, so the signed NarHash covers every byte the fetcher hands over.

Like every fetcher, this one reports what it finds and decides nothing about trust: the core
checks the narinfo's signatures and the bytes' hash.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from substituter.errors import (
    ConfigError,
    FetchError,
    FormatError,
    NotAvailable,
    TransientFetchError,
)
from substituter.nix.narinfo import NarInfo
from substituter.plugin import Answer, Fetcher, FetcherContext, Offer, Unavailable

from .keys import cas_key, cas_url, index_url

__all__ = ["BazelCasFetcher", "BazelCasOptions"]

log = logging.getLogger("substituter_bazel_cas")

#: An index entry larger than this is not a narinfo: refuse to buffer it.
MAX_NARINFO_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class BazelCasOptions:
    url: str = field(
        metadata={"help": "base URL of the Bazel remote cache; NARs are {url}/cas/<NarHash hex>"}
    )
    index_url: str | None = field(
        default=None,
        metadata={
            "help": "narinfos are GET {index-url}/ac/<sha256 hex of the hash part> (default: url)"
        },
    )
    index_dir: Path | None = field(
        default=None,
        metadata={"help": "instead of index-url: a directory of <hash>.narinfo files"},
    )
    timeout: float = field(
        default=30.0, metadata={"help": "seconds to connect, and to wait for each next byte"}
    )
    check_blob: bool = field(
        default=True,
        metadata={"help": "HEAD the NAR blob before offering it (caches evict what indexes name)"},
    )

    def __post_init__(self) -> None:
        for option, value in (("url", self.url), ("index-url", self.index_url)):
            if value is None:
                continue
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"option {option!r} must be an http:// or https:// URL, got {value!r}"
                )
        if self.index_url is not None and self.index_dir is not None:
            raise ValueError("set option 'index-url' or 'index-dir', not both")
        if not self.timeout > 0:
            raise ValueError(
                f"option 'timeout' must be a positive number of seconds, got {self.timeout}"
            )


class BazelCasFetcher(Fetcher):
    """Fetch uncompressed NARs from a Bazel remote cache's CAS, narinfos from its index."""

    kind = "bazel-cas"
    Options = BazelCasOptions
    # Offers are plain URLs of CAS blobs, so any HTTP opener (and this one) can stream them.
    schemes = ("http", "https")

    options: BazelCasOptions

    def __init__(
        self,
        name: str,
        options: BazelCasOptions,
        context: FetcherContext | None = None,
        priority: int | None = None,
    ) -> None:
        super().__init__(name, options, context, priority)
        self._client: httpx.AsyncClient | None = None

    def describe(self) -> str:
        return self.options.url

    async def start(self) -> None:
        index_dir = self.options.index_dir
        if index_dir is not None and not index_dir.is_dir():
            raise ConfigError(f"{self.name}: option 'index-dir': {index_dir} is not a directory")
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.options.timeout))

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise FetchError(f"{self.name}: used before start() or after stop()")
        return self._client

    # --- locate -------------------------------------------------------------------------------

    async def locate(self, hash_part: str) -> Answer:
        found = await self._read_index(hash_part)
        if isinstance(found, Unavailable):
            return found
        try:
            info = NarInfo.parse(found)
        except FormatError as exc:
            return Unavailable(f"the index entry for {hash_part} is not a narinfo: {exc}")
        if info.hash_part != hash_part:
            return Unavailable(f"the index entry for {hash_part} describes {info.store_path}")
        try:
            uri = cas_url(self.options.url, info.nar_hash)
        except FormatError as exc:
            return Unavailable(str(exc))
        if self.options.check_blob:
            missing = await self._check_blob(uri, info.nar_size)
            if missing is not None:
                return missing
        # The CAS holds the NAR itself: the file is the NAR, its hash the NarHash.
        info = info.with_file(f"cas/{cas_key(info.nar_hash)}", "none", info.nar_hash, info.nar_size)
        return Offer(
            info=info,
            uri=uri,
            compression="none",
            file_size=info.nar_size,
            file_hash=str(info.nar_hash),
        )

    async def _read_index(self, hash_part: str) -> bytes | Unavailable:
        if self.options.index_dir is not None:
            return await self._read_index_dir(self.options.index_dir, hash_part)
        url = index_url(self.options.index_url or self.options.url, hash_part)
        try:
            async with self._http().stream("GET", url) as response:
                if response.status_code in (404, 410):
                    return Unavailable("not in the index")
                _raise_if_transient(response, url)
                if response.status_code != 200:
                    return Unavailable(f"the index answered HTTP {response.status_code} for {url}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_NARINFO_BYTES:
                        return Unavailable(
                            f"{url} is over {MAX_NARINFO_BYTES} bytes: not a narinfo"
                        )
                return bytes(body)
        except httpx.HTTPError as exc:
            raise _translate(exc, url) from exc

    async def _read_index_dir(self, index_dir: Path, hash_part: str) -> bytes | Unavailable:
        path = index_dir / f"{hash_part}.narinfo"
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return Unavailable(f"not in {index_dir}")
        except OSError as exc:
            return Unavailable(f"cannot read {path}: {exc.strerror}")

    async def _check_blob(self, uri: str, nar_size: int) -> Unavailable | None:
        """None when the CAS holds a blob of the signed size; else why not."""
        try:
            response = await self._http().head(uri)
        except httpx.HTTPError as exc:
            raise _translate(exc, uri) from exc
        if response.status_code == 404:
            return Unavailable(f"the index names {uri}, but the CAS does not hold it (evicted?)")
        _raise_if_transient(response, uri)
        if response.status_code != 200:
            return Unavailable(f"the CAS answered HTTP {response.status_code} for {uri}")
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != nar_size:
            return Unavailable(
                f"{uri} holds {length} bytes, but the narinfo says NarSize {nar_size}"
            )
        return None

    # --- open ---------------------------------------------------------------------------------

    async def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream a blob from ``offset`` with an HTTP Range request."""
        url = offer.uri
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            async with self._http().stream("GET", url, headers=headers) as response:
                skip = _bytes_to_skip(response, url, offset)
                async for chunk in response.aiter_bytes():
                    if skip:
                        # The server ignored Range and sent the whole blob: drop the head.
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                        if not chunk:
                            continue
                    yield chunk
                if skip:
                    raise FetchError(f"{url} ended before offset {offset}")
        except httpx.HTTPError as exc:
            raise _translate(exc, url) from exc


def _bytes_to_skip(response: httpx.Response, url: str, offset: int) -> int:
    """How many leading body bytes to drop to start at ``offset``; raises on a bad answer."""
    status = response.status_code
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
        if match is None or int(match.group(1)) != offset:
            got = response.headers.get("content-range")
            raise FetchError(f"{url}: asked for bytes from {offset}, got Content-Range {got!r}")
        return 0
    if status == 200:
        return offset
    if status in (404, 410):
        raise NotAvailable(f"{url}: the CAS no longer holds this blob (HTTP {status})")
    if status == 416:
        raise FetchError(f"{url}: offset {offset} is beyond the end of the blob")
    _raise_if_transient(response, url)
    raise FetchError(f"{url}: HTTP {status}")


def _raise_if_transient(response: httpx.Response, url: str) -> None:
    status = response.status_code
    if status in (408, 429) or 500 <= status <= 599:
        raise TransientFetchError(f"{url}: HTTP {status}, worth retrying")


def _translate(exc: httpx.HTTPError, url: str) -> FetchError:
    """httpx's errors in the project's tree: network trouble is transient, the rest is not."""
    if isinstance(exc, httpx.TransportError):
        return TransientFetchError(f"{url}: {type(exc).__name__}: {exc or 'connection failed'}")
    return FetchError(f"{url}: {type(exc).__name__}: {exc}")
