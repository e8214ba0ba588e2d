"""Verified NAR streams: decompress, parse strictly, count and hash, fail over between sources.

:func:`verified_nar` turns a ranked list of sources for one store path into the NAR's bytes.  Every
byte passes the strict NAR parser and the running sha256; the size is capped at the signed NarSize
as bytes arrive.  When a source fails or stalls mid-stream the next one continues at the same NAR
offset (NAR bytes are identical whatever the source).  The last chunk is held back until the whole
stream has been checked against the signed NarHash, so a consumer never sees a complete NAR that
did not verify: on a mismatch the stream ends with :class:`~substituter.errors.HashMismatch`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import (
    CompressionError,
    FetchError,
    HashMismatch,
    NarError,
    NotAvailable,
    SizeMismatch,
    TransientFetchError,
    VerificationError,
)
from .nix.compression import Decompressor, decompressor, normalize
from .nix.hashes import Hash
from .nix.nar import NarParser
from .nix.narinfo import NarInfo
from .nix.zstd_frames import ZstdRelay
from .plugin import Offer

__all__ = ["RawSink", "Source", "TransferEvents", "TransferFailed", "prefetched", "verified_nar"]

log = logging.getLogger("substituter.transfer")

Opener = Callable[[Offer, int], AsyncIterator[bytes]]

#: Chunks at least this big are decompressed and hashed in a worker thread: hashlib, zstd, lzma
#: and bz2 release the GIL, so the event loop keeps serving and a second core helps.
THREAD_THRESHOLD = 256 * 1024
#: Compressed input is decoded at most this much per library call.
DECODE_PIECE = 16 * 1024
#: ... and at least this much (for input that compresses extremely well).
MIN_DECODE_PIECE = 1024
#: A source that failed on its own after delivering more of the NAR is taken up again (from where
#: the NAR is) at most this many times.
SOURCE_RETRIES = 2
#: Input from a source is gathered into pieces this big before it is decoded and hashed.
COALESCE = 512 * 1024
#: Decoded output is handed on in pieces of about this size (never one piece per input piece:
#: text compresses ~20x, so 512 KiB of input is ~10 MiB of NAR, and the pipeline queues hold
#: several pieces: bounded pieces bound the memory of a transfer).
OUTPUT_PIECE = 512 * 1024


@dataclass(frozen=True)
class Source:
    """One place a NAR can come from: the fetcher's name, its offer, and how to open it."""

    fetcher: str
    offer: Offer
    open: Opener


class RawSink(Protocol):
    """Takes a source's bytes exactly as they arrive, before decoding (e.g. to keep a zstd
    source's own file as the cache entry instead of compressing the NAR again).

    The bytes are unverified until the whole transfer verified: whoever passes a sink decides
    what to do with them after that.
    """

    def start(self, compression: str) -> bool:
        """A source starts at NAR byte 0 sending ``compression``: True to receive its bytes."""
        ...

    def write(self, data: bytes) -> None:
        """Bytes of that source, in order; all of them are also decoded and verified."""
        ...

    def abandon(self) -> None:
        """That source failed; the next one (if any) goes on from where it stopped."""
        ...


class TransferFailed(FetchError):
    """No source could deliver a verified NAR.  ``bad`` names sources that sent wrong bytes."""

    def __init__(self, message: str, bad: list[str] | None = None, delivered: int = 0) -> None:
        super().__init__(message)
        self.bad = bad or []
        self.delivered = delivered


@dataclass
class TransferEvents:
    """Callbacks for observers (the broker asserts ``transfer``/``failed`` from these)."""

    progress: Callable[[str, int, int], None] = lambda fetcher, done, total: None
    failed: Callable[[str, str, bool], None] = lambda fetcher, reason, transient: None
    done: Callable[[], None] = lambda: None
    stall_timeout: float = 60.0
    #: For flat/text content-addressed paths trusted by CA alone (see trust.Verdict).
    content_hash: Hash | None = None


class _FlatContentHash:
    """NarSink hashing the contents of a NAR that must be one regular file (flat/text CA)."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()

    def _not_flat(self, *_args: object) -> None:
        raise HashMismatch("a flat content-addressed path must be a single regular file")

    directory_start = directory_end = entry = symlink = _not_flat

    def file_start(self, executable: bool, size: int) -> None:
        if executable:
            self._not_flat()

    def file_data(self, chunk: memoryview) -> None:
        self.hasher.update(chunk)

    def file_end(self) -> None:
        pass


class _Checker:
    """The strict parser plus size cap; one per transfer, fed across sources."""

    def __init__(self, info: NarInfo, content_hash: Hash | None = None) -> None:
        self.expected_size = info.nar_size
        self.expected_hash = info.nar_hash
        self.content_hash = content_hash
        self.content = _FlatContentHash() if content_hash is not None else None
        self.parser = NarParser(self.content)

    @property
    def size(self) -> int:
        return int(self.parser.nar_size)

    def feed(self, data: bytes) -> None:
        if self.parser.nar_size + len(data) > self.expected_size:
            raise SizeMismatch(
                f"NAR is longer than its signed NarSize {self.expected_size}"
            )
        self.parser.feed(data)

    def finish(self) -> None:
        if self.size != self.expected_size:
            raise SizeMismatch(f"NAR has {self.size} bytes, signed NarSize is {self.expected_size}")
        self.parser.finish()
        got = Hash("sha256", self.parser.nar_hash_digest())
        if got != self.expected_hash:
            raise HashMismatch(f"hash mismatch: NAR has {got}, signed NarHash is {self.expected_hash}")
        if self.content is not None:
            content = Hash("sha256", self.content.hasher.digest())
            if content != self.content_hash:
                raise HashMismatch(
                    f"hash mismatch: contents have {content}, content address says {self.content_hash}"
                )


async def _with_stall_timeout(
    it: AsyncIterator[bytes], timeout: float, fetcher: str
) -> AsyncIterator[bytes]:
    while True:
        try:
            async with asyncio.timeout(timeout):  # a timer, not a task per chunk as wait_for
                chunk = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise TransientFetchError(f"{fetcher}: no data for {timeout:g} s (stalled)") from None
        yield chunk


async def _coalesced(it: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """Bytes from ``it`` in pieces of about ``size``: few, large steps for the worker threads.

    If ``it`` fails, what it delivered before is still yielded, then the error is raised.
    """
    buffer = bytearray()
    try:
        async for chunk in it:
            if not buffer and len(chunk) >= size:
                yield chunk  # already big enough (1 MiB reads): no copy
                continue
            buffer += chunk
            if len(buffer) >= size:
                yield bytes(buffer)
                buffer.clear()
    except BaseException:
        if buffer:
            yield bytes(buffer)
        raise
    if buffer:
        yield bytes(buffer)


_END = object()


async def prefetched(it: AsyncIterator[bytes], depth: int = 2) -> AsyncIterator[bytes]:
    """Run ``it`` ahead of its consumer (at most ``depth`` items), so that stages overlap:
    reading the network, decoding and hashing in worker threads, and sending to a client.

    Errors of ``it`` reach the consumer in order; closing the consumer cancels ``it``.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue(depth)

    async def produce() -> None:
        try:
            async for item in it:
                await queue.put(item)
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer
            await queue.put(exc)

    task = asyncio.ensure_future(produce())
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def _decode_some(decoder: Any, data: bytes, start: int, step: int) -> tuple[bytes, int, int]:
    """Decode from ``start`` until about OUTPUT_PIECE bytes came out; returns them, where to go
    on and the input step to go on with.  Input goes in steps of at most DECODE_PIECE, halved
    while one step's output exceeds OUTPUT_PIECE / 4 (text compressing 100:1 made one 16 KiB step
    ~1.6 MiB, held twice by the joins) and doubled back when it falls under OUTPUT_PIECE / 16."""
    out: list[bytes] = []
    size = 0
    i = start
    while i < len(data) and size < OUTPUT_PIECE:
        piece = decoder.decode(data[i:i + step])
        i += step
        if piece:
            out.append(piece)
            size += len(piece)
        if len(piece) > OUTPUT_PIECE // 4 and step > MIN_DECODE_PIECE:
            step //= 2
        elif len(piece) < OUTPUT_PIECE // 16 and step < DECODE_PIECE:
            step *= 2
    return (out[0] if len(out) == 1 else b"".join(out)), i, step


class _SourceBytes:
    """One source's bytes made into checked NAR bytes: kept raw (``raw_sink``), decoded, skipped
    up to the NAR offset it continues from, fed to the checker.

    :meth:`step` does all of it for one piece of input in one call, so a big piece costs one
    worker-thread round trip (each round trip wakes the event loop and contends for the GIL).
    A big compressed NAR goes in two stages instead, :meth:`decode` running ahead of
    :meth:`check` in another worker, so that decoding and hashing use two cores.
    """

    def __init__(self, decoder: Any, skip: int, checker: _Checker, raw_sink: RawSink | None) -> None:
        self.decoder = decoder
        self.decode_step = DECODE_PIECE
        self.skip = skip
        self.checker = checker
        self.raw_sink = raw_sink

    def step(self, data: bytes, start: int) -> tuple[bytes, int]:
        """Checked NAR bytes from ``data[start:]`` (about OUTPUT_PIECE), and where to go on."""
        out, end = self.decode(data, start)
        return self.check(out), end

    def decode(self, data: bytes, start: int) -> tuple[bytes, int]:
        """NAR bytes (not yet checked) from ``data[start:]``, and where to go on."""
        if start == 0 and self.raw_sink is not None:
            self.raw_sink.write(data)
        if self.decoder is None:
            out, end = data, len(data)
        else:
            out, end, self.decode_step = _decode_some(self.decoder, data, start, self.decode_step)
        return self._skipped(out), end

    def check(self, out: bytes) -> bytes:
        """Feed decoded bytes, in order, to the checker (raises on bytes that are wrong)."""
        if out:
            self.checker.feed(out)
        return out

    def tail(self) -> bytes:
        return self._skipped(self.decoder.flush()) if self.decoder is not None else b""

    def _skipped(self, out: bytes) -> bytes:
        if self.skip and out:
            cut = min(self.skip, len(out))
            out, self.skip = out[cut:], self.skip - cut
        return out


async def _decoded(received: AsyncIterator[bytes], pipeline: _SourceBytes) -> AsyncIterator[bytes]:
    async for data in received:
        i = 0
        while i < len(data):
            out, i = await asyncio.to_thread(pipeline.decode, data, i)
            if out:
                yield out


async def _checked_chunks(
    source: Source, checker: _Checker, stall: float, raw_sink: RawSink | None = None,
    relay: ZstdRelay | None = None,
) -> AsyncIterator[bytes]:
    """The source's NAR bytes from where ``checker`` is, each piece fed to it before it is
    yielded: ranged when the source is uncompressed, decompressed and skipped otherwise (a zstd
    source from byte 0 by ``relay``'s decoder, when given, so that its blocks can be passed on)."""
    compression = normalize(source.offer.compression)
    raw = compression == "none"
    offset = checker.size
    stream = source.open(source.offer, offset if raw else 0)
    decoder: Decompressor | None
    if raw:
        decoder = None
    elif relay is not None and compression == "zstd" and offset == 0:
        decoder = relay.decoder(checker.expected_size)
    else:
        decoder = decompressor(compression, max_output=checker.expected_size)
    pipeline = _SourceBytes(decoder, 0 if raw else offset, checker, raw_sink)
    try:
        received = _coalesced(_with_stall_timeout(stream, stall, source.fetcher), COALESCE)
        if checker.expected_size <= COALESCE:
            # A small NAR is one piece: one call does it all.
            async for data in received:
                i = 0
                while i < len(data):
                    out, i = pipeline.step(data, i)
                    if out:
                        yield out
        elif decoder is None:
            # Reading runs ahead while a piece is checked.
            async for data in prefetched(received):
                out, _ = await asyncio.to_thread(pipeline.step, data, 0)
                yield out
        else:
            # Reading and decoding run ahead (one worker) while a piece is checked (another).
            async for out in prefetched(_decoded(prefetched(received), pipeline)):
                yield await asyncio.to_thread(pipeline.check, out)
        tail = pipeline.check(pipeline.tail())
        if tail:
            yield tail
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def verified_nar(
    info: NarInfo,
    sources: list[Source],
    events: TransferEvents | None = None,
    raw_sink: RawSink | None = None,
    relay: ZstdRelay | None = None,
) -> AsyncIterator[bytes]:
    """Yield the NAR of ``info`` from ``sources`` (best first), verified as described above.

    Raises :class:`TransferFailed` when no source can finish; bytes yielded before that are a
    correct prefix only as far as the parser could tell, so the consumer must abort (never
    present a short or unverified stream as complete).  ``raw_sink`` is offered the bytes of a
    source that starts at NAR byte 0 (see :class:`RawSink`); ``relay`` decodes a zstd source
    that starts there, for the consumer to pass its blocks on (see ZstdRelay).
    """
    events = events or TransferEvents()
    try:
        async for chunk in _verified_nar(info, sources, events, raw_sink, relay):
            yield chunk
    finally:
        events.done()


async def _verified_nar(
    info: NarInfo, sources: list[Source], events: TransferEvents, raw_sink: RawSink | None,
    relay: ZstdRelay | None,
) -> AsyncIterator[bytes]:
    checker = _Checker(info, events.content_hash)
    pending: bytes | None = None
    bad: list[str] = []
    reasons: list[str] = []
    queue = deque(sources)
    again: dict[str, int] = {}  # how often each source was taken up again
    while queue:
        source = queue.popleft()
        start = checker.size
        teeing = False
        finished = False
        try:
            teeing = raw_sink is not None and start == 0 and raw_sink.start(normalize(source.offer.compression))
            async for chunk in _checked_chunks(source, checker, events.stall_timeout,
                                               raw_sink if teeing else None, relay):
                if pending is not None:
                    yield pending
                pending = chunk
                events.progress(source.fetcher, checker.size, info.nar_size)
            if checker.size < info.nar_size:
                raise TransientFetchError(
                    f"{source.fetcher}: stream ended at byte {checker.size} of {info.nar_size}"
                )
            checker.finish()
            finished = True
        except (TransientFetchError, NotAvailable, OSError) as exc:
            transient = not isinstance(exc, NotAvailable)
            if transient and checker.size > start and again.get(source.fetcher, 0) < SOURCE_RETRIES:
                # It got further before it failed: worth another go from there, after the others
                # (a dropped connection on a long NAR; the client never notices).
                again[source.fetcher] = again.get(source.fetcher, 0) + 1
                queue.append(source)
            log.warning("%s: %s at NAR byte %d; trying the next source", source.fetcher, exc, checker.size)
            events.failed(source.fetcher, str(exc), transient)
            reasons.append(f"{source.fetcher}: {exc}")
            continue
        except (VerificationError, NarError, CompressionError) as exc:
            # Wrong bytes were already fed to the parser: this stream cannot be continued.
            reason = str(exc) if isinstance(exc, HashMismatch) else f"hash mismatch: {exc}"
            log.error("%s sent bad bytes for %s: %s", source.fetcher, info.store_path, reason)
            events.failed(source.fetcher, reason, False)
            bad.append(source.fetcher)
            raise TransferFailed(f"{source.fetcher}: {reason}", bad, checker.size) from exc
        except (asyncio.CancelledError, TransferFailed):
            raise
        except Exception as exc:  # any other failure of a source (a plugin's bug, a bad Range)
            # Only bytes the parser accepted were taken from it: the next source continues.
            log.warning("%s failed at NAR byte %d: %s: %s; trying the next source",
                        source.fetcher, checker.size, type(exc).__name__, exc)
            events.failed(source.fetcher, f"{type(exc).__name__}: {exc}", False)
            reasons.append(f"{source.fetcher}: {exc}")
            continue
        finally:
            if teeing and not finished:
                raw_sink.abandon()  # type: ignore[union-attr]
        if pending is not None:
            yield pending
        return
    summary = "; ".join(reasons) or "no sources"
    raise TransferFailed(
        f"no source could deliver {info.store_path} (got {checker.size} of {info.nar_size} bytes): "
        f"{summary}",
        bad,
        checker.size,
    )


async def drain(stream: AsyncIterator[bytes], sink: Callable[[bytes], Awaitable[None] | None]) -> int:
    """Consume a stream into ``sink``; returns the byte count."""
    total = 0
    async for chunk in stream:
        result = sink(chunk)
        if result is not None:
            await result
        total += len(chunk)
    return total
