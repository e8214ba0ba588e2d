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
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from .nar_cache import CachedNar, CacheWriter, NarCache, RawCacheWriter
from .nix.narinfo import NarInfo
from .nix.zstd_frames import ZstdRelay
from .transfer import THREAD_THRESHOLD, Source, TransferEvents, TransferFailed, prefetched, verified_nar

if TYPE_CHECKING:
    from .broker import Resolution


def nar_hash32(info: NarInfo) -> str:
    """The NarHash's nix32 digits, encoded once per narinfo (~10 µs an encoding)."""
    return info.nar_hash_text().partition(":")[2]

__all__ = ["NarService", "DEFAULT_SPOOL_LIMIT"]

log = logging.getLogger("substituter.nar")

DEFAULT_SPOOL_LIMIT = 32 * 1024 * 1024
#: How many times a spool starts over with the remaining sources after one sent wrong bytes.
MAX_RESTARTS = 3
#: NARs up to this size are spooled in memory and written to the cache in one worker call.
MEMORY_SPOOL = 1024 * 1024
#: Bytes of handed-out small NARs waiting for their cache write, beyond which a spool waits.
WRITE_BEHIND_LIMIT = 64 * 1024 * 1024
#: Recently verified small NARs kept in memory (bytes in all), served with no disk read.
RECENT_LIMIT = 8 * 1024 * 1024

SourcesFn = Callable[["Resolution", set[str]], list[Source]]
#: Waits until every fetcher has answered for the path (after the sources in hand failed).
RefreshFn = Callable[["Resolution"], Awaitable[object]]
EventsFn = Callable[["Resolution"], TransferEvents]


class NarService:
    def __init__(
        self,
        sources: SourcesFn,
        cache: NarCache | None,
        *,
        spool_limit: int = DEFAULT_SPOOL_LIMIT,
        events: EventsFn | None = None,
        prefetch_limit: int = 0,
        refresh: RefreshFn | None = None,
    ) -> None:
        self._sources = sources
        self._refresh = refresh
        self.cache = cache
        self.spool_limit = spool_limit
        self.prefetch_limit = min(prefetch_limit, spool_limit)
        self._events = events or (lambda res: TransferEvents())
        self._spooling: dict[str, asyncio.Task[bytes | None]] = {}
        self._prefetches: set[asyncio.Future[bytes | None]] = set()
        self._small_spools: set[asyncio.Future[bytes | None]] = set()
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0
        #: Cache writes of small NARs already handed out from memory (finished in a worker).
        self._writing: dict[str, asyncio.Future[None]] = {}
        self._queued: list[tuple[str, int, bytes, bool, asyncio.Future[None]]] = []
        self._queued_bytes = 0
        self._writer: asyncio.Future[None] | None = None

    async def writes_done(self) -> None:
        """Wait for the cache writes still running behind handed-out NARs."""
        while self._writing:
            await asyncio.gather(*map(asyncio.shield, list(self._writing.values())), return_exceptions=True)

    def prefetch(self, res: Resolution) -> None:
        """Start fetching a small NAR whose narinfo was just served, not waiting for it: when
        the client asks for the NAR, it is in hand or on its way (see ``nar-cache.prefetch``)."""
        info = res.info
        if self.cache is None or info is None or info.nar_size > self.prefetch_limit:
            return
        nar_hash = nar_hash32(info)
        if nar_hash in self._spooling or nar_hash in self.cache:
            return
        spool = self._start_spool(res, nar_hash)
        self._prefetches.add(spool)
        spool.add_done_callback(self._prefetches.discard)
        spool.add_done_callback(_quietly)

    def recent(self, nar_hash: str) -> bytes | None:
        """A small NAR verified lately, if still in memory (the cache has it, or will)."""
        data = self._recent.get(nar_hash)
        if data is not None:
            self._recent.move_to_end(nar_hash)
        return data

    def spooling_small(self, nar_hash: str) -> bool:
        """Whether a small NAR (one spooled in memory) is being fetched right now (e.g.
        prefetched): a request for it can wait for those bytes."""
        task = self._spooling.get(nar_hash)
        return task is not None and not task.done() and task in self._small_spools

    def _remember(self, nar_hash: str, data: bytes) -> None:
        if nar_hash in self._recent or len(data) > RECENT_LIMIT // 16:
            return
        self._recent[nar_hash] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_LIMIT:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)

    def cached(self, nar_hash: str) -> bool:
        return self.cache is not None and self.cache.get(nar_hash) is not None

    async def cached_file(self, res: Resolution) -> CachedNar | None:
        """The verified zstd file of a small NAR, spooling it first if needed (None: stream it)."""
        assert res.info is not None
        if self.cache is None:
            return None
        nar_hash = nar_hash32(res.info)
        if self.cache.get(nar_hash) is None and res.info.nar_size <= self.spool_limit:
            await self._spool_once(res, nar_hash)
        writing = self._writing.get(nar_hash)
        if writing is not None:
            await asyncio.gather(asyncio.shield(writing), return_exceptions=True)
        return self.cache.get(nar_hash)

    async def stream_zstd(self, res: Resolution) -> AsyncIterator[bytes]:
        """The verified NAR as a zstd stream, for a client that decodes it (teed into the cache).

        A zstd source's own blocks are passed on once the NAR bytes they carry verified, so
        nothing is sent decoded and the client decodes what it would have fetched itself; bytes
        from any other source (or after a failover) follow as raw blocks (see ZstdRelay).  The
        transfer holds its last chunk back until the NarHash checks, so the client cannot finish
        the NAR before that; restarts are those of :meth:`stream`.
        """
        async for piece in self._stream_through(res, 0, zstd=True):
            yield piece

    async def stream(self, res: Resolution, offset: int = 0) -> AsyncIterator[bytes]:
        """Yield the verified NAR from ``offset``; raises TransferFailed when it cannot."""
        assert res.info is not None
        nar_hash = nar_hash32(res.info)
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
        tries = self._tries(res)
        while sources := await tries.next():
            try:
                chunks = [chunk async for chunk in verified_nar(res.info, sources, self._events(res))]
            except TransferFailed as exc:
                await tries.failed(exc, sources)
                continue
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        raise tries.nobody_left()

    def _tries(self, res: Resolution) -> _Tries:
        return _Tries(res, self._sources, self._refresh)

    async def _spool_once(self, res: Resolution, nar_hash: str) -> bytes | None:
        """One spool per NAR at a time; concurrent requests wait for the same one.

        Returns the verified NAR when it was small enough to be spooled in memory.
        """
        task = self._spooling.get(nar_hash)
        if task is not None and task in self._prefetches:
            try:
                return await asyncio.shield(task)
            except TransferFailed:
                # The prefetch began with the first answers; more may have come since (a
                # source ranked below one that turned out bad): start over with what is known.
                if self._spooling.get(nar_hash) is task:
                    del self._spooling[nar_hash]
                task = self._spooling.get(nar_hash)
        if task is None:
            task = self._start_spool(res, nar_hash)
        return await asyncio.shield(task)

    def _start_spool(self, res: Resolution, nar_hash: str) -> asyncio.Task[bytes | None]:
        assert res.info is not None
        task = asyncio.ensure_future(self._spool(res, nar_hash))
        self._spooling[nar_hash] = task
        if res.info.nar_size <= MEMORY_SPOOL:
            self._small_spools.add(task)
            task.add_done_callback(self._small_spools.discard)
        task.add_done_callback(lambda t: self._release(nar_hash, t))
        return task

    def _release(self, nar_hash: str, task: asyncio.Task[bytes | None]) -> None:
        """Forget a finished spool, once its cache write (if still going) is done: until then
        the spool's result is what later requests get."""

        def forget(_done: object = None) -> None:
            if self._spooling.get(nar_hash) is task:
                del self._spooling[nar_hash]

        writing = self._writing.get(nar_hash)
        if writing is None:
            forget()
        else:
            writing.add_done_callback(forget)

    def _write_behind(self, nar_hash: str, nar_size: int, data: bytes, is_zstd: bool) -> asyncio.Future[None]:
        """Cache a small NAR already handed out, without making anyone wait (its fsync can take
        milliseconds).  Writes queue up and go to a worker in batches that share their fsyncs.
        A write cut short by a crash leaves only a temp file, removed at the next start."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writing[nar_hash] = done
        done.add_done_callback(lambda _f: self._writing.pop(nar_hash, None))
        self._queued.append((nar_hash, nar_size, data, is_zstd, done))
        self._queued_bytes += len(data)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_queued())
        return done

    async def _write_queued(self) -> None:
        assert self.cache is not None
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                errors: list[Exception | None] = await asyncio.to_thread(
                    self.cache.put_many, [item[:4] for item in batch]
                )
            except Exception as exc:
                errors = [exc] * len(batch)
            finally:
                self._queued_bytes -= sum(len(item[2]) for item in batch)
            for (nar_hash, _size, _data, _zstd, done), error in zip(batch, errors, strict=True):
                if error is not None:
                    log.warning("NAR %s not cached: %s", nar_hash, error)
                if not done.done():
                    done.set_result(None)

    async def _spool(self, res: Resolution, nar_hash: str) -> bytes | None:
        assert self.cache is not None and res.info is not None
        in_memory = res.info.nar_size <= MEMORY_SPOOL
        tries = self._tries(res)
        while sources := await tries.next():
            if in_memory:
                tee: _MemoryTee | _CacheFill = _MemoryTee()
            else:
                tee = _CacheFill(self.cache, nar_hash, res.info.nar_size)
            try:
                verified = verified_nar(res.info, sources, self._events(res), tee)
                if isinstance(tee, _MemoryTee):
                    # Small NAR: collect the verified bytes and hand them out at once; the cache
                    # write (compressing only if the source's own file is not zstd), fsync and
                    # rename follow in one worker call.
                    data = b"".join([chunk async for chunk in verified])
                    self._remember(nar_hash, data)
                    if tee.complete:
                        written = self._write_behind(nar_hash, res.info.nar_size, tee.data(), True)
                    else:
                        written = self._write_behind(nar_hash, res.info.nar_size, data, False)
                    if self._queued_bytes > WRITE_BEHIND_LIMIT:
                        await asyncio.shield(written)  # the disk is behind: do not pile up memory
                    return data
                async for chunk in verified:
                    await tee.add(chunk)
                await tee.commit()
                return None
            except TransferFailed as exc:
                if isinstance(tee, _CacheFill):
                    tee.abort()
                await tries.failed(exc, sources)
            except BaseException:
                if isinstance(tee, _CacheFill):
                    tee.abort()
                raise
        raise tries.nobody_left()

    async def _stream_through(self, res: Resolution, offset: int, zstd: bool = False) -> AsyncIterator[bytes]:
        """Stream while verifying; if the sources fail before anything was handed out (wrong
        bytes, or every one failing), the NAR starts over from the others, waiting for fetchers
        still to answer; after that, the stream must fail."""
        assert res.info is not None
        tries = self._tries(res)
        while sources := await tries.next():
            yielded = False
            try:
                async for chunk in self._stream_once(res, offset, sources, zstd):
                    yielded = True
                    yield chunk
                return
            except TransferFailed as exc:
                if yielded:
                    raise
                await tries.failed(exc, sources)
        raise tries.nobody_left()

    async def _stream_once(self, res: Resolution, offset: int, sources: list[Source],
                           zstd: bool) -> AsyncIterator[bytes]:
        assert res.info is not None
        fill = (
            _CacheFill(self.cache, nar_hash32(res.info), res.info.nar_size)
            if self.cache is not None
            else None
        )
        relay = ZstdRelay() if zstd else None
        position = 0
        filling: asyncio.Future[None] | None = None
        try:
            verified = verified_nar(res.info, sources, self._events(res), fill, relay)
            async for chunk in prefetched(verified):
                if fill is not None:
                    # Filling the cache (compressing, when the source's own file is not zstd)
                    # runs while the chunk is sent; chunks still reach it one after another.
                    if filling is not None:
                        await filling
                    filling = asyncio.ensure_future(fill.add(chunk))
                if relay is not None:
                    pieces = relay.forward(chunk)
                    if pieces:
                        yield b"".join(pieces)
                    continue
                end = position + len(chunk)
                if end > offset:
                    yield chunk[max(0, offset - position):]
                position = end
            if relay is not None and (tail := relay.finish()):
                yield tail
            if fill is not None:
                if filling is not None:
                    await filling
                await fill.commit()
        except BaseException:
            if filling is not None:
                await asyncio.gather(filling, return_exceptions=True)
            if fill is not None:
                fill.abort()
            raise


class _MemoryTee:
    """A small NAR's source bytes kept in memory while it is verified (see :class:`_CacheFill`)."""

    def __init__(self) -> None:
        self._pieces: list[bytes] | None = None
        self._retired = False

    @property
    def complete(self) -> bool:
        return self._pieces is not None and not self._retired

    def data(self) -> bytes:
        assert self._pieces is not None
        return b"".join(self._pieces)

    def start(self, compression: str) -> bool:
        if compression != "zstd" or self._retired:
            return False
        self._pieces = []
        return True

    def write(self, data: bytes) -> None:
        assert self._pieces is not None
        self._pieces.append(data)

    def abandon(self) -> None:
        if self._pieces:
            self._retired = True  # the NAR goes on from another source: compress it instead
        self._pieces = None


class _CacheFill:
    """Fills one cache entry during a transfer (a :class:`~substituter.transfer.RawSink`).

    When the source sends zstd, its own file becomes the entry: every byte of it is decoded and
    verified on the way, so nothing needs compressing again.  Otherwise, or once a zstd source
    failed part-way and another went on, the verified NAR is compressed (starting with what the
    partial file decodes to).  Transfer side: ``start``/``write``/``abandon``; consumer side:
    ``add`` each verified chunk in order, then ``commit`` or ``abort``.
    """

    def __init__(self, cache: NarCache, nar_hash: str, nar_size: int) -> None:
        self.cache = cache
        self.nar_hash = nar_hash
        self.nar_size = nar_size
        self._raw: RawCacheWriter | None = None
        self._retired = False  # a raw file was begun and its source failed
        self._compress: CacheWriter | None = None
        self._position = 0  # verified bytes added so far

    def start(self, compression: str) -> bool:
        if compression != "zstd" or self._retired or self._compress is not None:
            return False
        self._raw = self.cache.raw_writer(self.nar_hash, self.nar_size)
        return True

    def write(self, data: bytes) -> None:
        assert self._raw is not None
        self._raw.write(data)

    def abandon(self) -> None:
        if self._raw is None:
            return
        if self._raw.written:
            self._retired = True  # kept until add() turns it into a compressed prefix
        else:
            self._raw.abort()
            self._raw = None

    async def add(self, chunk: bytes) -> None:
        if self._raw is not None and not self._retired:
            self._position += len(chunk)  # already in the raw file
            return
        if self._compress is None:
            self._compress = await asyncio.to_thread(self._compressing)
        if len(chunk) >= THREAD_THRESHOLD:
            await asyncio.to_thread(self._compress.write, chunk)
        else:
            self._compress.write(chunk)
        self._position += len(chunk)

    def _compressing(self) -> CacheWriter:
        if self._raw is None:
            return self.cache.writer(self.nar_hash, self.nar_size)
        raw, self._raw = self._raw, None
        return raw.recompressed(self._position)

    async def commit(self) -> None:
        if self._compress is not None:
            await self._compress.commit()
        elif self._raw is not None and not self._retired:
            await self._raw.commit()

    def abort(self) -> None:
        for writer in (self._compress, self._raw):
            if writer is not None:
                writer.abort()


def _quietly(task: asyncio.Future[bytes | None]) -> None:
    """A prefetch that failed: nobody waits for it, and the request for the NAR will say why."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("prefetch failed: %s", exc)


class _Tries:
    """The sources to try for one NAR, attempt after attempt (at most MAX_RESTARTS restarts).

    A source that sent wrong bytes is never tried again; when every source in hand failed on
    its own, the fetchers still to answer are waited for (``refresh``: the broker answers as soon
    as the best offer looked certain) and tried next.
    """

    def __init__(self, res: Resolution, sources: SourcesFn, refresh: RefreshFn | None) -> None:
        assert res.info is not None
        self.res = res
        self.info = res.info
        self._sources = sources
        self._refresh = refresh
        self.bad: set[str] = set()
        self.gave_out: set[str] = set()  # failed on their own
        self._left = MAX_RESTARTS + 1

    async def next(self) -> list[Source]:
        """The sources for the next attempt; empty when nothing (or no attempt) is left."""
        if self._left <= 0:
            return []
        self._left -= 1
        return await self._remaining()

    async def failed(self, exc: TransferFailed, sources: list[Source]) -> None:
        """Note who failed in the attempt with ``sources``; raise ``exc`` when nobody else can
        be tried."""
        if exc.bad:
            self.bad.update(exc.bad)
            log.warning("%s: starting over without %s", self.info.store_path, ", ".join(exc.bad))
            return
        # Every source in hand failed on its own (none sent wrong bytes): others may have
        # answered since, or may still answer.
        self.gave_out.update(source.fetcher for source in sources)
        if not await self._remaining():
            raise exc
        log.info("%s: trying fetchers that answered since", self.info.store_path)

    def nobody_left(self) -> TransferFailed:
        why = [f"wrong bytes from {', '.join(sorted(self.bad))}"] if self.bad else []
        why += [f"{', '.join(sorted(self.gave_out))} failed"] if self.gave_out else []
        return TransferFailed(f"no source could deliver {self.info.store_path}: "
                              + ("; ".join(why) or "no trusted source left"), sorted(self.bad))

    async def _remaining(self) -> list[Source]:
        exclude = self.bad | self.gave_out
        sources = self._sources(self.res, exclude)
        if not sources and exclude and self._refresh is not None:
            await self._refresh(self.res)
            sources = self._sources(self.res, exclude)
        return sources
