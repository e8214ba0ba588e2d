"""The ``eris`` fetcher: store paths whose NARs are ERIS-encoded into content-addressed blocks.

An index maps a store hash part to a read capability and the path's signed narinfo; the blocks
come from one or more block stores (directories, HTTP N2R servers, or ``dataspace:`` - peers
answering interest in the dataspace the fetcher's host is attached to - tried in order).

Offers name the capability as ``eris:urn:eris:<base32>``: the ``eris`` scheme says which plugin
opens it, the rest is the standard ERIS URN. ``open`` decodes with every block checked against
its reference, at most ``concurrency`` blocks in flight, and never more content than the signed
NarSize (or, for an encoded compressed file, its FileSize). Whether the NAR is the signed one is
the core's decision, as for every fetcher.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from substituter.errors import (
    ConfigError,
    FetchError,
    FormatError,
    HashMismatch,
    NotAvailable,
    PluginError,
    StorePathError,
    TransientFetchError,
)
from substituter.nix.store_path import validate_hash_part
from substituter.plugin import Answer, Fetcher, FetcherContext, Offer, Unavailable

from .blockstore import BlockStore, FallbackBlockStore, decode_from, open_block_store
from .codec import ErisError, ReadCapability
from .dataspace_store import SCHEME as DATASPACE_SPEC
from .dataspace_store import DataspaceBlockStore
from .index import ErisIndex, open_index

__all__ = ["ErisFetcher", "ErisOptions", "URI_SCHEME", "offer_uri", "parse_offer_uri"]

log = logging.getLogger("fetchers.eris")

URI_SCHEME = "eris"
_T = TypeVar("_T")


def offer_uri(cap: ReadCapability) -> str:
    """The URI an offer carries: ``eris:`` followed by the capability's ``urn:eris:`` URN."""
    return f"{URI_SCHEME}:{cap.urn()}"


def parse_offer_uri(uri: str) -> ReadCapability:
    prefix = URI_SCHEME + ":"
    if not uri.startswith(prefix):
        raise FetchError(f"cannot open {uri[:60]!r}: not an {prefix}urn:eris: URI")
    return ReadCapability.parse(uri[len(prefix) :])


@dataclass(frozen=True)
class ErisOptions:
    index: str = field(
        metadata={
            "help": "JSON-lines index file (from `substituter eris publish`), or a directory or"
            " http(s) URL of narinfos with an `ERIS:` line"
        }
    )
    blocks: list[str] = field(
        metadata={
            "help": "block directories, N2R server URLs and/or `dataspace:` (peers in the"
            " dataspace this fetcher is attached to), asked in this order"
        }
    )
    concurrency: int = field(default=16, metadata={"help": "most blocks fetched at once per NAR"})
    timeout: float = field(
        default=30.0, metadata={"help": "seconds an HTTP request (index, block) may take"}
    )

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("option 'blocks' needs at least one directory or N2R URL")
        if self.concurrency < 1:
            raise ValueError(f"option 'concurrency' must be 1 or more, got {self.concurrency}")
        if not self.timeout > 0:
            raise ValueError("option 'timeout' must be a positive number of seconds")


class ErisFetcher(Fetcher):
    """Fetch NARs from ERIS block stores through an index of capabilities."""

    kind = "eris"
    Options = ErisOptions
    schemes = (URI_SCHEME,)

    options: ErisOptions

    def __init__(
        self,
        name: str,
        options: ErisOptions,
        context: FetcherContext | None = None,
        priority: int | None = None,
    ) -> None:
        super().__init__(name, options, context, priority)
        self._index: ErisIndex | None = None
        self._store: BlockStore | None = None

    def describe(self) -> str:
        return f"{self.options.index} -> {', '.join(self.options.blocks)}"

    async def start(self) -> None:
        opts = self.options
        try:
            self._index = open_index(opts.index, timeout=opts.timeout)
            self._store = self._open_block_stores()
        except ValueError as exc:
            raise ConfigError(f"{self.name}: {exc}") from exc

    def _open_block_stores(self) -> BlockStore:
        opts = self.options
        stores: list[BlockStore] = []
        for spec in opts.blocks:
            if spec == DATASPACE_SPEC:
                link = self.context.dataspace
                if link is None:
                    raise ValueError(
                        f"blocks {spec!r} needs the host's dataspace; this host offers none"
                        " (run the fetcher in the daemon or with `substituter fetcher`)"
                    )
                stores.append(DataspaceBlockStore(link, timeout=opts.timeout))
            else:
                stores.append(
                    open_block_store(spec, timeout=opts.timeout, max_connections=opts.concurrency)
                )
        return stores[0] if len(stores) == 1 else FallbackBlockStore(stores)

    async def stop(self) -> None:
        if self._index is not None:
            await self._index.aclose()
            self._index = None
        if self._store is not None:
            await self._store.aclose()
            self._store = None

    async def locate(self, hash_part: str) -> Answer:
        try:
            validate_hash_part(hash_part)
        except StorePathError as exc:
            return Unavailable(str(exc))
        index = self._require(self._index)
        try:
            entry = await index.lookup(hash_part)
        except FormatError as exc:
            log.warning("%s: index entry for %s is malformed: %s", self.name, hash_part, exc)
            return Unavailable(f"bad index entry: {exc}")
        except FetchError as exc:
            return Unavailable(f"index {index.describe()}: {exc}")
        if entry is None:
            return Unavailable(f"not in {index.describe()}")
        if entry.hash_part != hash_part:
            return Unavailable(f"index entry for {hash_part} describes {entry.narinfo.store_path}")
        if entry.max_size is None:
            # Without a size there is no bound on how much a hostile tree could make us fetch.
            return Unavailable(
                f"index entry for {hash_part} encodes a {entry.compression} file of unknown size"
            )
        return Offer(
            info=entry.narinfo,
            uri=offer_uri(entry.cap),
            compression=entry.compression,
            file_size=entry.max_size,
        )

    async def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        """Decode the offered capability and yield its bytes from ``offset`` on."""
        try:
            cap = parse_offer_uri(offer.uri)
        except FormatError as exc:
            raise NotAvailable(f"{self.name}: {exc}") from exc
        max_size = offer.info.nar_size if offer.compression == "none" else offer.file_size
        if max_size is None:
            raise NotAvailable(f"{self.name}: {offer.uri}: no size to bound the decode by")
        if offset > max_size:
            raise FetchError(f"{offer.uri}: offset {offset} is beyond its {max_size} bytes")
        store = self._require(self._store)
        skip = offset
        stream = decode_from(cap, store, max_size=max_size, concurrency=self.options.concurrency)
        try:
            async for piece in stream:
                if skip:
                    # ERIS leaves must be decoded from the root anyway; dropping is cheap.
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                    if not piece:
                        continue
                yield piece
        except (TransientFetchError, NotAvailable):
            raise
        except ErisError as exc:
            # Blocks that hash right but do not form a valid tree: this source's data is wrong.
            raise HashMismatch(f"{self.name}: {offer.uri[:40]}...: malformed ERIS data: {exc}") from exc
        except FetchError as exc:
            # A block store that cannot serve (bad answer, refused) is no source for this NAR.
            raise NotAvailable(f"{self.name}: {exc}") from exc
        finally:
            await stream.aclose()

    def _require(self, resource: _T | None) -> _T:
        if resource is None:
            raise PluginError(f"{self.name}: used before start() or after stop()")
        return resource
