"""ERIS blocks exchanged over a dataspace: interest in a block is answered by asserting it.

A consumer that needs block ``ref`` observes ``<eris-chunk _ ref ?content>`` (with the block size
in place of ``_`` when it knows it). A provider (:func:`serve_blocks`) observes those observers
(``Observe`` of an ``eris-chunk`` pattern with a literal ``ref``) and, for as long as the interest
stands, asserts ``<eris-chunk size ref content>`` from its block store. Several providers may
answer the same interest; the consumer checks every answer (length, BLAKE2b-256) and takes the
first good one, so a damaged copy from one provider cannot hide a good one from another.

Prior art: eris-nim's Syndicate block store (``<eris-chunk a|f #"ref" ?content>``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from preserves import Symbol
from syndicate import patterns as P
from syndicate import turn
from syndicate.dataspace import during

from substituter.errors import FetchError, HashMismatch, TransientFetchError
from substituter.plugin import DataspaceLink
from substituter.protocol import ErisChunk, record_pattern

from .blockstore import BlockStore, check_block
from .codec import BLOCK_SIZES, ErisError, block_urn

__all__ = ["DataspaceBlockStore", "SCHEME", "chunk_interest", "serve_blocks"]

log = logging.getLogger("fetchers.eris.dataspace")

#: The block-store spec meaning "the dataspace this fetcher's host is attached to".
SCHEME = "dataspace:"
REF_LENGTH = 32

# Interest in one block by reference, whatever the consumer captures of it:
#   <Observe <group <rec eris-chunk> {… 1: <lit ?ref> …}> _>
# Group patterns are extensible, so the size position and the content's pattern do not matter.
_INTEREST = P.rec(
    "Observe",
    P.rec(
        "group",
        P.rec("rec", P.lit(Symbol("eris-chunk"))),
        P.dict((1, P.rec("lit", P.CAPTURE))),
    ),
    P._,
)


def chunk_interest(ref: bytes, block_size: int | None = None) -> Any:
    """The pattern a consumer observes for block ``ref``: ``<eris-chunk size ref ?content>``."""
    size = P._ if block_size is None else block_size
    return record_pattern(ErisChunk, blockSize=size, ref=ref, content=P.CAPTURE)


# --- providing ----------------------------------------------------------------------------


def serve_blocks(ds: Any, store: BlockStore) -> None:
    """Inside a turn: answer interest in any block ``store`` holds, for as long as it stands.

    Runs in the active facet; stopping that facet withdraws every answer. Blocks that fail their
    check are not asserted (a damaged local copy is logged, not spread).
    """

    @during(ds, _INTEREST)
    def on_interest(ref: Any) -> None:
        if not isinstance(ref, bytes) or len(ref) != REF_LENGTH:
            return
        facet = turn.active_facet()

        @turn.linked_task()
        async def answer(_facet: Any) -> bool:
            block = await _checked_local_block(store, ref)
            if block is not None:
                turn.external(facet, lambda: turn.publish(ds, ErisChunk(len(block), ref, block)))
            return True  # keep the facet, and so the answer, until the interest goes


async def _checked_local_block(store: BlockStore, ref: bytes) -> bytes | None:
    try:
        block = await store.get(ref)
        if block is not None:
            check_block(ref, block)
        return block
    except (FetchError, ErisError, HashMismatch) as exc:
        log.warning("not serving block %s from %s: %s", block_urn(ref), store.describe(), exc)
        return None


# --- consuming ----------------------------------------------------------------------------


class DataspaceBlockStore:
    """Gets blocks by asserting interest in them in a dataspace and waiting for a provider.

    ``get`` returns None when no good block arrives within ``timeout`` seconds and no provider
    offered a bad one; bad blocks only (every answer failed its check) raise
    :class:`~substituter.errors.HashMismatch`. Interest is retracted as soon as ``get`` returns.
    """

    def __init__(self, link: DataspaceLink, *, timeout: float = 30.0,
                 block_size: int | None = None) -> None:
        if not timeout > 0:
            raise ValueError("a dataspace block store needs a positive timeout")
        if block_size is not None and block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {block_size} is not one of ERIS's {BLOCK_SIZES}")
        self.link = link
        self.timeout = timeout
        self.block_size = block_size

    def describe(self) -> str:
        return "the dataspace" if self.link.attached else "the dataspace (detached)"

    async def get(self, ref: bytes) -> bytes | None:
        link = self.link
        if not link.attached:
            raise TransientFetchError(f"block {block_urn(ref)}: not attached to a dataspace")
        ds = link.ref
        found: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        damaged: list[str] = []
        # The facet holding our interest; the turn creating it runs after this coroutine yields,
        # so `done` tells a late turn not to assert interest nobody waits for any more.
        holder: list[Any] = []
        done = False

        def on_chunk(content: Any) -> None:
            if found.done():
                return
            try:
                if not isinstance(content, bytes):
                    raise ErisError(f"content is a {type(content).__name__}, not bytes")
                check_block(ref, content)
            except (ErisError, HashMismatch) as exc:
                log.warning("a provider answered a damaged block: %s", exc)
                damaged.append(str(exc))
                return
            found.set_result(content)

        def on_stopped() -> None:
            if not done and not found.done():
                found.set_exception(TransientFetchError(
                    f"block {block_urn(ref)}: lost the dataspace while waiting for it"))

        def express_interest() -> None:
            turn.on_stop(on_stopped)
            during(ds, chunk_interest(ref, self.block_size))(on_chunk)

        def begin() -> None:
            if not done:
                holder.append(turn.facet(express_interest))

        turn.external(link.facet, begin)
        try:
            await asyncio.wait({found}, timeout=self.timeout)
        finally:
            done = True
            if holder:
                facet = holder[0]
                turn.external(facet, lambda: turn.stop(facet))
        if found.done():
            return found.result()
        found.cancel()
        if damaged:
            raise HashMismatch(f"block {block_urn(ref)}: every answer was damaged: {damaged[0]}")
        return None

    async def put(self, ref: bytes, block: bytes) -> None:
        raise FetchError("blocks are put in a dataspace by serving a store (serve_blocks), not one by one")

    async def aclose(self) -> None:
        pass
