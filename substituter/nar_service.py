"""Verified NAR bytes for a resolved path: from the local cache, or from the sources.

Small NARs (up to ``spool_limit``) are verified completely into the local NAR cache before the
first byte is handed out, so a corrupt source is replaced by the next one transparently.  Larger
NARs stream through while being verified (the last chunk held back until the hash checks) and are
teed into the cache, committed only once verified.  Both paths are shared by the HTTP endpoint and
the CLI's store import.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from .nar_cache import CachedNar, CacheWriter, NarCache, ZstdFrame
from .transfer import Source, TransferEvents, TransferFailed, prefetched, verified_nar

if TYPE_CHECKING:
    from .broker import Resolution

__all__ = ["NarService", "DEFAULT_SPOOL_LIMIT"]

log = logging.getLogger("substituter.nar")

DEFAULT_SPOOL_LIMIT = 32 * 1024 * 1024
#: How many times a spool starts over with the remaining sources after one sent wrong bytes.
MAX_RESTARTS = 3
#: NARs up to this size are spooled in memory and written to the cache in one worker call.
MEMORY_SPOOL = 1024 * 1024

SourcesFn = Callable[["Resolution", set[str]], list[Source]]
EventsFn = Callable[["Resolution"], TransferEvents]


class NarService:
    def __init__(
        self,
        sources: SourcesFn,
        cache: NarCache | None,
        *,
        spool_limit: int = DEFAULT_SPOOL_LIMIT,
        events: EventsFn | None = None,
    ) -> None:
        self._sources = sources
        self.cache = cache
        self.spool_limit = spool_limit
        self._events = events or (lambda res: TransferEvents())
        self._spooling: dict[str, asyncio.Task[bytes | None]] = {}

    def cached(self, nar_hash: str) -> bool:
        return self.cache is not None and self.cache.get(nar_hash) is not None

    async def cached_file(self, res: Resolution) -> CachedNar | None:
        """The verified zstd file of a small NAR, spooling it first if needed (None: stream it)."""
        assert res.info is not None
        if self.cache is None:
            return None
        nar_hash = res.info.nar_hash.nix32()
        if self.cache.get(nar_hash) is None and res.info.nar_size <= self.spool_limit:
            await self._spool_once(res, nar_hash)
        return self.cache.get(nar_hash)

    async def stream_zstd(self, res: Resolution) -> AsyncIterator[bytes]:
        """A zstd frame of the verified NAR, produced while it streams (teed into the cache).

        The frame's end (with its checksum) is yielded only after the NAR verified, so a client
        never holds a complete frame of unverified bytes.
        """
        assert res.info is not None
        info = res.info
        writer: CacheWriter | ZstdFrame
        if self.cache is not None:
            writer = self.cache.writer(info.nar_hash.nix32(), info.nar_size)
        else:
            writer = ZstdFrame(info.nar_size)
        try:
            verified = verified_nar(info, self._sources(res, set()), self._events(res))
            async for chunk in prefetched(verified):
                compress = writer.write if isinstance(writer, CacheWriter) else writer.compress
                out = await asyncio.to_thread(compress, chunk)
                if out:
                    yield out
            yield await writer.commit() if isinstance(writer, CacheWriter) else writer.finish()
        except BaseException:
            if isinstance(writer, CacheWriter):
                writer.abort()
            raise

    async def stream(self, res: Resolution, offset: int = 0) -> AsyncIterator[bytes]:
        """Yield the verified NAR from ``offset``; raises TransferFailed when it cannot."""
        assert res.info is not None
        nar_hash = res.info.nar_hash.nix32()
        if self.cache is not None:
            if self.cache.get(nar_hash) is None and res.info.nar_size <= self.spool_limit:
                data = await self._spool_once(res, nar_hash)
                if data is not None:
                    # Just verified and cached: serve the bytes in hand, not the file again.
                    if offset < len(data):
                        yield data[offset:] if offset else data
                    return
            if self.cache.get(nar_hash) is not None:
                async for chunk in self.cache.open(nar_hash, offset):
                    yield chunk
                return
        async for chunk in self._stream_through(res, offset):
            yield chunk

    async def verified_bytes(self, res: Resolution) -> bytes:
        """The whole NAR in memory, verified against the signed NarHash/NarSize; not cached.

        For small NARs that go straight into a store (``substituter fetch``): no cache file is
        written and read back.  As when spooling, a source that sent wrong bytes is dropped and
        the NAR starts over with the remaining sources; nothing is returned unless it verified.
        """
        assert res.info is not None
        bad: set[str] = set()
        for _attempt in range(MAX_RESTARTS + 1):
            sources = self._sources(res, bad)
            if not sources:
                break
            try:
                chunks = [chunk async for chunk in verified_nar(res.info, sources, self._events(res))]
            except TransferFailed as exc:
                if not exc.bad:
                    raise
                bad.update(exc.bad)
                log.warning("%s: starting over without %s", res.info.store_path, ", ".join(exc.bad))
                continue
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        raise TransferFailed(
            f"no source could deliver {res.info.store_path}: "
            + (f"wrong bytes from {', '.join(sorted(bad))}" if bad else "no trusted source left"),
            sorted(bad),
        )

    async def _spool_once(self, res: Resolution, nar_hash: str) -> bytes | None:
        """One spool per NAR at a time; concurrent requests wait for the same one.

        Returns the verified NAR when it was small enough to be spooled in memory.
        """
        task = self._spooling.get(nar_hash)
        if task is None:
            task = asyncio.ensure_future(self._spool(res, nar_hash))
            self._spooling[nar_hash] = task
            task.add_done_callback(lambda _t: self._spooling.pop(nar_hash, None))
        return await asyncio.shield(task)

    async def _spool(self, res: Resolution, nar_hash: str) -> bytes | None:
        assert self.cache is not None and res.info is not None
        in_memory = res.info.nar_size <= MEMORY_SPOOL
        bad: set[str] = set()
        for _attempt in range(MAX_RESTARTS + 1):
            sources = self._sources(res, bad)
            if not sources:
                break
            writer = None if in_memory else self.cache.writer(nar_hash, res.info.nar_size)
            try:
                if writer is None:
                    # Small NAR: collect the verified bytes, then compress, write, fsync and
                    # rename in one worker call.
                    chunks = [chunk async for chunk in verified_nar(res.info, sources, self._events(res))]
                    data = b"".join(chunks)
                    await asyncio.to_thread(self.cache.put, nar_hash, res.info.nar_size, data)
                    return data
                async for chunk in verified_nar(res.info, sources, self._events(res)):
                    await asyncio.to_thread(writer.write, chunk)
                await writer.commit()
                return None
            except TransferFailed as exc:
                if writer is not None:
                    writer.abort()
                if not exc.bad:
                    raise
                bad.update(exc.bad)
                log.warning("%s: starting over without %s", res.info.store_path, ", ".join(exc.bad))
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
        raise TransferFailed(
            f"no source could deliver {res.info.store_path}: "
            + (f"wrong bytes from {', '.join(sorted(bad))}" if bad else "no trusted source left"),
            sorted(bad),
        )

    async def _stream_through(self, res: Resolution, offset: int) -> AsyncIterator[bytes]:
        """Stream while verifying; a source sending wrong bytes before anything was handed out is
        dropped and the NAR starts over from the others (after that, the stream must fail)."""
        assert res.info is not None
        bad: set[str] = set()
        for _attempt in range(MAX_RESTARTS + 1):
            yielded = False
            try:
                async for chunk in self._stream_once(res, offset, bad):
                    yielded = True
                    yield chunk
                return
            except TransferFailed as exc:
                if yielded or not exc.bad:
                    raise
                bad.update(exc.bad)
                log.warning("%s: starting over without %s", res.info.store_path, ", ".join(exc.bad))
        raise TransferFailed(f"no source could deliver {res.info.store_path}: wrong bytes from "
                             f"{', '.join(sorted(bad))}", sorted(bad))

    async def _stream_once(self, res: Resolution, offset: int, bad: set[str]) -> AsyncIterator[bytes]:
        assert res.info is not None
        writer = (
            self.cache.writer(res.info.nar_hash.nix32(), res.info.nar_size)
            if self.cache is not None
            else None
        )
        position = 0
        compressing: asyncio.Future[bytes] | None = None
        try:
            verified = verified_nar(res.info, self._sources(res, bad), self._events(res))
            async for chunk in prefetched(verified):
                if writer is not None:
                    # Compression for the cache runs in a thread (it releases the GIL) while the
                    # chunk is sent; chunks still reach the writer one after another, in order.
                    if compressing is not None:
                        await compressing
                    compressing = asyncio.ensure_future(asyncio.to_thread(writer.write, chunk))
                end = position + len(chunk)
                if end > offset:
                    yield chunk[max(0, offset - position):]
                position = end
            if writer is not None:
                if compressing is not None:
                    await compressing
                await writer.commit()
        except BaseException:
            if compressing is not None:
                await asyncio.gather(compressing, return_exceptions=True)
            if writer is not None:
                writer.abort()
            raise
