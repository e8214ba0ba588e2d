"""The daemon's local cache of verified NARs: zstd files named by NarHash, bounded by LRU.

The cache never decides trust: callers commit only NARs they have verified.  A NAR becomes
visible only by an atomic rename after ``commit()`` checked its size, so a crash or an abort
leaves at most a ``.tmp-*`` file, removed at the next start.  Recency is kept in memory (seeded
from file mtimes at start, refreshed by touching mtime on use), since atime is unreliable.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import zstandard

from .errors import SizeMismatch

__all__ = ["CacheWriter", "CachedNar", "NarCache", "RawCacheWriter", "ZstdFrame"]

log = logging.getLogger("substituter.nar_cache")

_NAR_HASH = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{52}")
_ENTRY = re.compile(r"([0123456789abcdfghijklmnpqrsvwxyz]{52})-(\d+)\.nar\.zst")
READ_CHUNK = 256 * 1024
#: Entries up to this NarSize are read and decompressed whole, in one worker call.
SMALL_READ = 1024 * 1024
#: Seconds between refreshes of an entry's mtime (its recency across restarts).
TOUCH_INTERVAL = 60.0
#: Seconds between checks that an entry's file is still there (a stat per lookup was several
#: syscalls per path served: Nix asks for a narinfo several times, then for its NAR).
EXISTS_INTERVAL = 1.0
#: Flags of a new entry's temp file (created here, never an existing one).
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
#: Files of entries up to this size are also kept in memory (recently used, SMALL_MEMORY in all),
#: so that serving them reads no disk and needs no worker thread.
SMALL_ENTRY = 64 * 1024
SMALL_MEMORY = 8 * 1024 * 1024


@dataclass(frozen=True)
class CachedNar:
    nar_hash: str
    nar_size: int
    file_size: int
    path: Path


def _check_nar_hash(nar_hash: str) -> None:
    if not _NAR_HASH.fullmatch(nar_hash):
        raise ValueError(f"not a nix32 sha256 NarHash: {nar_hash!r}")


class NarCache:
    def __init__(self, directory: Path, max_size: int, *, level: int = 1, durable: bool = True) -> None:
        self.directory = Path(directory)
        self.max_size = max_size
        self.level = level
        #: fsync each entry before it becomes visible (off for throwaway spools, e.g. one `fetch`).
        self.durable = durable
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, CachedNar] = OrderedDict()  # least recently used first
        self._total = 0
        self._touched: dict[str, float] = {}
        self._seen: dict[str, float] = {}  # when each entry's file was last known to exist
        self._small: OrderedDict[str, bytes] = OrderedDict()  # file bytes of small entries, LRU
        self._small_bytes = 0
        self._pid = os.getpid()
        self._serial = itertools.count()
        self._scan()

    def _scan(self) -> None:
        found = []
        for path in self.directory.iterdir():
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)  # an interrupted write
                continue
            m = _ENTRY.fullmatch(path.name)
            if m is None:
                continue
            st = path.stat()
            found.append((st.st_mtime, CachedNar(m.group(1), int(m.group(2)), st.st_size, path)))
        for _mtime, entry in sorted(found, key=lambda item: item[0]):
            self._entries[entry.nar_hash] = entry
            self._total += entry.file_size

    def small_file(self, nar_hash: str) -> bytes | None:
        """The file of a small entry, if it is held in memory (see :meth:`keep_small`)."""
        with self._lock:
            data = self._small.get(nar_hash)
            if data is not None:
                self._small.move_to_end(nar_hash)
                self._entries.move_to_end(nar_hash)
            return data

    def keep_small(self, entry: CachedNar, data: bytes) -> None:
        """Hold a small entry's file bytes in memory (dropped with the entry, or when the
        memory is needed for more recently used ones)."""
        if entry.file_size > SMALL_ENTRY or len(data) != entry.file_size:
            return
        with self._lock:
            if entry.nar_hash not in self._entries or entry.nar_hash in self._small:
                return
            self._small[entry.nar_hash] = data
            self._small_bytes += len(data)
            while self._small_bytes > SMALL_MEMORY:
                _, old = self._small.popitem(last=False)
                self._small_bytes -= len(old)

    def total_size(self) -> int:
        return self._total

    def __contains__(self, nar_hash: object) -> bool:
        return isinstance(nar_hash, str) and nar_hash in self._entries

    def get(self, nar_hash: str) -> CachedNar | None:
        if not _NAR_HASH.fullmatch(nar_hash):
            return None
        with self._lock:
            entry = self._entries.get(nar_hash)
            if entry is None:
                return None
            now = time.monotonic()
            if now - self._seen.get(nar_hash, -EXISTS_INTERVAL) >= EXISTS_INTERVAL:
                if not entry.path.exists():  # removed behind our back
                    self._forget(nar_hash)
                    return None
                self._seen[nar_hash] = now
            self._entries.move_to_end(nar_hash)
            # The in-memory order is the LRU; mtime only seeds it at the next start, so it is
            # refreshed at most once a minute per entry (not a syscall per request).
            touch = now - self._touched.get(nar_hash, -TOUCH_INTERVAL) >= TOUCH_INTERVAL
            if touch:
                self._touched[nar_hash] = now
        if touch:
            try:
                os.utime(entry.path)
            except OSError:
                pass
        return entry

    async def open(self, nar_hash: str, offset: int = 0) -> AsyncIterator[bytes]:
        """Raw NAR bytes from ``offset``; decompression runs in a worker thread."""
        entry = self.get(nar_hash)
        if entry is None:
            raise FileNotFoundError(f"NAR {nar_hash} is not in the cache")
        if entry.nar_size <= SMALL_READ:
            # One worker call for the whole small NAR (the fd opened there; a concurrent
            # eviction between get() and open() reads as a missing entry).
            data = await asyncio.to_thread(self._read_entry, entry)
            if offset < len(data):
                yield data[offset:] if offset else data
            return
        # Opening the fd now keeps the data readable even if the entry is evicted meanwhile.
        f = open(entry.path, "rb")  # noqa: ASYNC230 - one open of a local file; reads go to a thread
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_size=READ_CHUNK, read_across_frames=True)
            skip = offset
            while skip > 0:
                got = await asyncio.to_thread(reader.read, min(skip, 4 * READ_CHUNK))
                if not got:
                    return
                skip -= len(got)
            while True:
                chunk = await asyncio.to_thread(reader.read, READ_CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            f.close()

    def put(self, nar_hash: str, nar_size: int, data: bytes) -> None:
        """Cache a whole verified NAR held in memory: compress, write, commit, in the calling
        thread (one worker call for a small NAR instead of one per step)."""
        error = self.put_many([(nar_hash, nar_size, data, False)])[0]
        if error is not None:
            raise error

    def put_many(self, items: list[tuple[str, int, bytes, bool]]) -> list[Exception | None]:
        """Cache verified NARs held in memory, each ``(nar_hash, nar_size, data, is_zstd)``
        (``data`` the NAR, or with ``is_zstd`` a source's zstd file of it), in the calling thread:
        all written and made durable first, then all published.  Returns each item's error (None
        when it was cached).

        Each entry costs five syscalls (open, write, fsync, close, rename), and its file bytes
        are kept in memory as they were written: this runs in a worker beside the event loop,
        and every syscall hands the GIL back and forth between the two."""
        staged: list[tuple[int, str, int, bytes, str]] = []
        errors: list[Exception | None] = []
        for i, (nar_hash, nar_size, data, is_zstd) in enumerate(items):
            tmp = None
            try:
                _check_nar_hash(nar_hash)
                if not is_zstd:
                    if len(data) != nar_size:
                        raise SizeMismatch(f"cache got {len(data)} bytes, NarSize is {nar_size}")
                    frame = ZstdFrame(nar_size, self.level)
                    data = frame.compress(data) + frame.finish()
                tmp = self._tmp_name(nar_hash)
                self._write_file(tmp, data)
                staged.append((i, nar_hash, nar_size, data, tmp))
                errors.append(None)
            except Exception as exc:
                if tmp is not None:
                    _unlink(tmp)
                errors.append(exc)
        for i, nar_hash, nar_size, data, tmp in staged:
            try:
                entry = self._publish(tmp, nar_hash, nar_size, len(data))
            except Exception as exc:
                _unlink(tmp)
                errors[i] = exc
                continue
            if entry is not None:
                self.keep_small(entry, data)
        return errors

    def _tmp_name(self, nar_hash: str) -> str:
        return f"{self.directory}/.tmp-{nar_hash}-{self._pid}-{next(self._serial)}"

    def _write_file(self, path: str, data: bytes) -> None:
        """A new file holding ``data``, durable when the cache is (not yet visible)."""
        fd = os.open(path, _CREATE, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _publish(self, tmp: str, nar_hash: str, nar_size: int, file_size: int) -> CachedNar | None:
        """A finished, durable temp file becomes the entry (atomic rename); None when it is
        not kept (cached meanwhile, or larger than the whole cache)."""
        if nar_hash in self._entries:
            _unlink(tmp)  # someone else cached it first
            return None
        if file_size > self.max_size:
            log.info("NAR %s (%d bytes compressed) is larger than the cache; not kept", nar_hash, file_size)
            _unlink(tmp)
            return None
        final = self._final_path(nar_hash, nar_size)
        os.replace(tmp, final)
        entry = CachedNar(nar_hash, nar_size, file_size, final)
        self._add(entry)
        return entry

    @staticmethod
    def _read_entry(entry: CachedNar) -> bytes:
        with open(entry.path, "rb") as f:
            # Entries kept from a source may hold several frames.
            data = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(f.read())
        if len(data) != entry.nar_size:
            raise SizeMismatch(f"cached NAR {entry.nar_hash} has {len(data)} bytes, NarSize is {entry.nar_size}")
        return data

    def writer(self, nar_hash: str, nar_size: int) -> CacheWriter:
        """An entry written as raw NAR bytes, compressed on the way."""
        _check_nar_hash(nar_hash)
        return CacheWriter(self, nar_hash, nar_size)

    def raw_writer(self, nar_hash: str, nar_size: int) -> RawCacheWriter:
        """An entry written as a source's zstd file, unchanged (see :class:`RawCacheWriter`)."""
        _check_nar_hash(nar_hash)
        return RawCacheWriter(self, nar_hash, nar_size)

    def put_raw(self, nar_hash: str, nar_size: int, data: bytes) -> None:
        """Cache a verified NAR's zstd file held in memory, in the calling thread."""
        error = self.put_many([(nar_hash, nar_size, data, True)])[0]
        if error is not None:
            raise error

    def _final_path(self, nar_hash: str, nar_size: int) -> Path:
        return self.directory / f"{nar_hash}-{nar_size}.nar.zst"

    def _add(self, entry: CachedNar) -> None:
        with self._lock:
            if entry.nar_hash in self._entries:
                return
            self._entries[entry.nar_hash] = entry
            self._total += entry.file_size
            now = time.monotonic()
            self._touched[entry.nar_hash] = now  # a new file: its mtime is now
            self._seen[entry.nar_hash] = now
        self.evict()

    def _forget(self, nar_hash: str) -> None:
        self._touched.pop(nar_hash, None)
        self._seen.pop(nar_hash, None)
        small = self._small.pop(nar_hash, None)
        if small is not None:
            self._small_bytes -= len(small)
        entry = self._entries.pop(nar_hash, None)
        if entry is not None:
            self._total -= entry.file_size

    def evict(self) -> None:
        """Remove least recently used entries until the total fits ``max_size``."""
        with self._lock:
            while self._total > self.max_size and self._entries:
                nar_hash, entry = next(iter(self._entries.items()))
                self._forget(nar_hash)
                entry.path.unlink(missing_ok=True)
                log.debug("evicted %s (%d bytes)", nar_hash, entry.file_size)


class ZstdFrame:
    """One zstd frame built incrementally (checksummed, content size declared).

    Callers compress in a worker thread (libzstd releases the GIL); single-threaded zstd keeps
    the buffers small.  The output is what both the cache file and a client receive.
    """

    def __init__(self, size: int, level: int = 1) -> None:
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                              write_content_size=True)
        self._obj = compressor.compressobj(size=size)

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def finish(self) -> bytes:
        return self._obj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


class _EntryWriter:
    """A cache entry being written to a temp file; visible only after :meth:`commit`."""

    def __init__(self, cache: NarCache, nar_hash: str, nar_size: int) -> None:
        self.cache = cache
        self.nar_hash = nar_hash
        self.nar_size = nar_size
        self._tmp = Path(cache._tmp_name(nar_hash))
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit/abort
        self._done = False
        self._prepared = False

    async def commit(self) -> bytes:
        """Finish the entry and make it visible; returns the bytes written last (the frame's end)."""
        if self._done:
            return b""
        return await asyncio.to_thread(self.commit_sync)

    def commit_sync(self) -> bytes:
        """:meth:`commit` in the calling thread (finishing, fsync and rename: run it in a worker)."""
        tail = self.prepare()
        self.publish()
        return tail

    def prepare(self) -> bytes:
        """First half of a commit: finish the file and make it durable (fsync); still invisible.

        Entries all prepared before any is published share the journal commits of their fsyncs
        (ext4 and most filesystems flush what is pending together)."""
        if self._done:
            return b""
        self._check_complete()
        self._done = True
        try:
            tail = self._tail()
            self._finish(tail)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        self._prepared = True
        return tail

    def publish(self) -> None:
        """Second half of a commit: the prepared file becomes the entry (atomic rename)."""
        if not self._prepared:
            return
        self._prepared = False
        self.cache._publish(str(self._tmp), self.nar_hash, self.nar_size, os.stat(self._tmp).st_size)

    def _check_complete(self) -> None:
        pass

    def _tail(self) -> bytes:
        return b""

    def _finish(self, tail: bytes) -> None:
        self._file.write(tail)
        self._file.flush()
        if self.cache.durable:
            os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        if self._prepared:  # finished but never published
            self._prepared = False
            self._tmp.unlink(missing_ok=True)
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


class CacheWriter(_EntryWriter):
    """Raw NAR bytes in, zstd to a temp file; visible only after :meth:`commit`.

    ``write`` and ``commit`` return the compressed bytes they produced, so a caller can send the
    very file it is caching while it is being written (the frame's end only after commit).
    """

    def __init__(self, cache: NarCache, nar_hash: str, nar_size: int) -> None:
        super().__init__(cache, nar_hash, nar_size)
        self.written = 0
        self._frame = ZstdFrame(nar_size, cache.level)

    def write(self, data: bytes) -> bytes:
        if self._done:
            raise ValueError("write after commit or abort")
        self.written += len(data)
        if self.written > self.nar_size:
            self.abort()
            raise SizeMismatch(f"more than NarSize {self.nar_size} bytes written to the cache")
        out = self._frame.compress(data)
        if out:
            self._file.write(out)
        return out

    def _check_complete(self) -> None:
        if self.written != self.nar_size:
            self.abort()
            raise SizeMismatch(f"cache got {self.written} bytes, NarSize is {self.nar_size}")

    def _tail(self) -> bytes:
        return self._frame.finish()


class RawCacheWriter(_EntryWriter):
    """A source's own zstd file, kept as the entry exactly as it arrived (nothing recompressed).

    The caller commits it only after every byte written here was decoded and the NAR verified
    against its signed NarHash and NarSize; a partial file can still be turned into an ordinary
    entry with :meth:`recompressed`.
    """

    def __init__(self, cache: NarCache, nar_hash: str, nar_size: int) -> None:
        super().__init__(cache, nar_hash, nar_size)
        self.written = 0

    def write(self, data: bytes) -> None:
        if self._done:
            raise ValueError("write after commit or abort")
        self._file.write(data)
        self.written += len(data)

    def recompressed(self, prefix: int) -> CacheWriter:
        """A compressing writer holding the first ``prefix`` NAR bytes this file decodes to
        (in the calling thread); this writer is aborted.  For a transfer that went on from
        another source, after this one sent part of its file."""
        if self._done:
            raise ValueError("recompressed after commit or abort")
        self._file.flush()
        writer = CacheWriter(self.cache, self.nar_hash, self.nar_size)
        try:
            with open(self._tmp, "rb") as f:
                reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
                left = prefix
                while left:
                    data = reader.read(min(left, READ_CHUNK))
                    if not data:
                        raise SizeMismatch(f"partial cache file decodes to {prefix - left} bytes, not {prefix}")
                    writer.write(data)
                    left -= len(data)
        except BaseException:
            writer.abort()
            raise
        finally:
            self.abort()
        return writer


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
