"""The ``local-mirror`` fetcher: a directory written by ``nix copy --to file://DIR``.

Narinfos are read straight from ``DIR/<hash>.narinfo`` and NARs streamed from ``DIR/<URL>``.  All
file I/O runs in the default executor so the event loop never waits on a disk, in as few hops as
possible: the locates asked in one event-loop step share worker calls (up to LOCATE_BATCH each),
and a small NAR is read in the same call as its narinfo (kept until opened, READ_AHEAD_TOTAL
bytes at most), so fetching a small path costs no worker call of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from substituter.errors import (
    ConfigError,
    FetchError,
    NarInfoError,
    NotAvailable,
    StorePathError,
)
from substituter.nix.narinfo import NarInfo
from substituter.nix.store_path import validate_hash_part
from substituter.plugin import Answer, Fetcher, FetcherContext, Offer, Unavailable

from .cache_info import check_store_dir, parse_cache_info

__all__ = ["LocalMirrorFetcher", "LocalMirrorOptions", "file_uri_path"]

log = logging.getLogger("fetchers.local_mirror")

#: Bytes per read: large enough that the per-call executor hop costs nothing noticeable.
READ_SIZE = 1 << 20
#: Locates handled by one worker call: a batch answers together, so not too many at once.
LOCATE_BATCH = 16
#: NAR files up to this size are read along with their narinfo, ...
READ_AHEAD = 64 * 1024
#: ... and kept until opened, up to this many bytes in all (the oldest dropped first).
READ_AHEAD_TOTAL = 8 * 1024 * 1024


@dataclass(frozen=True)
class LocalMirrorOptions:
    path: Path = field(metadata={"help": "directory written by `nix copy --to file://DIR`"})
    check_cache_info: bool = field(
        default=True,
        metadata={"help": "at start, require DIR/nix-cache-info with this store's StoreDir"},
    )


def file_uri_path(uri: str) -> Path:
    """The local path a ``file://`` URI names (only local hosts are accepted)."""
    parts = urlsplit(uri)
    if parts.scheme != "file":
        raise FetchError(f"cannot open {uri!r}: not a file:// URI")
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"cannot open {uri!r}: file URIs on other hosts are not local")
    return Path(unquote(parts.path))


class LocalMirrorFetcher(Fetcher):
    """Fetch paths from a local (or network-mounted) ``file://`` binary cache directory."""

    kind = "local-mirror"
    Options = LocalMirrorOptions
    schemes = ("file",)

    options: LocalMirrorOptions

    def __init__(
        self,
        name: str,
        options: LocalMirrorOptions,
        context: FetcherContext | None = None,
        priority: int | None = None,
    ) -> None:
        super().__init__(name, options, context, priority)
        self.root = options.path.expanduser().absolute()
        self._real_root: str | None = None  # realpath of root + "/", resolved once
        #: With a root that has no "." or ".." parts, a plain relative URL needs no normalising.
        self._plain_prefix = (str(self.root).rstrip("/") + "/"
                              if os.path.normpath(self.root) == str(self.root) else None)
        #: Locates asked in this event-loop step, answered together by worker calls.
        self._asked: list[tuple[str, asyncio.Future[Answer]]] = []
        #: file:// URI of an offered NAR -> its bytes, read with the narinfo, until opened.
        self._read_ahead: OrderedDict[str, bytes] = OrderedDict()
        self._read_ahead_bytes = 0
        self._read_ahead_lock = threading.Lock()  # filled by worker threads
        #: The mirror's ``Priority`` from nix-cache-info, when it has one.
        self.cache_priority: int | None = None

    def describe(self) -> str:
        return str(self.root)

    async def start(self) -> None:
        if not self.root.is_dir():
            raise ConfigError(f"{self.name}: option 'path': {self.root} is not a directory")
        if not self.options.check_cache_info:
            return
        info_file = self.root / "nix-cache-info"
        try:
            text = await asyncio.to_thread(info_file.read_text)
        except OSError as exc:
            raise ConfigError(
                f"{self.name}: {info_file} is missing ({exc.strerror}); is {self.root} a "
                "`nix copy --to file://...` directory? (set check-cache-info = false to skip)"
            ) from exc
        info = parse_cache_info(text)
        check_store_dir(info, self.context.store_dir, f"{self.name} ({self.root})")
        self.cache_priority = info.priority

    async def locate(self, hash_part: str) -> Answer:
        try:
            validate_hash_part(hash_part)
        except StorePathError as exc:
            return Unavailable(str(exc))
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        if not self._asked:
            loop.call_soon(self._locate_asked, loop)  # after the rest of this step's callbacks
        self._asked.append((hash_part, answer))
        return await answer

    def _locate_asked(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand this step's locates to worker calls, LOCATE_BATCH at a time."""
        asked, self._asked = self._asked, []
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root) + os.sep
        for start in range(0, len(asked), LOCATE_BATCH):
            batch = asked[start:start + LOCATE_BATCH]
            done = loop.run_in_executor(None, self._locate_many, [h for h, _ in batch], self._real_root)
            done.add_done_callback(lambda f, batch=batch: _settle(batch, f))  # type: ignore[misc]

    def _locate_many(self, hash_parts: list[str], real_root: str) -> list[Answer]:
        return [self._locate(h, real_root) for h in hash_parts]

    def _locate(self, hash_part: str, real_root: str | None = None) -> Answer:
        """The whole lookup in one worker call (reading, parsing, checking the NAR is there,
        and reading it when small)."""
        narinfo_file = f"{self.root}/{hash_part}.narinfo"
        try:
            data = _read_file(narinfo_file)
        except FileNotFoundError:
            return Unavailable(f"not in {self.root}")
        except OSError as exc:
            log.warning("%s: cannot read %s: %s", self.name, narinfo_file, exc)
            return Unavailable(f"{narinfo_file}: {exc}")
        try:
            info = NarInfo.parse(data)
        except NarInfoError as exc:
            log.warning("%s: %s does not parse: %s", self.name, narinfo_file, exc)
            return Unavailable(f"{narinfo_file}: bad narinfo: {exc}")
        if info.hash_part != hash_part:
            log.warning("%s: %s describes %s", self.name, narinfo_file, info.store_path)
            return Unavailable(f"{narinfo_file}: narinfo is for {info.store_path}")
        nar = self._nar_path(info.url)
        if nar is None:
            log.warning(
                "%s: %s names a file outside the mirror: %r", self.name, narinfo_file, info.url
            )
            return Unavailable(f"{narinfo_file}: URL {info.url!r} leaves {self.root}")
        uri = nar.as_uri()
        if not self._read_small(nar, uri, real_root, info.file_size or info.nar_size):
            return Unavailable(f"{narinfo_file} names {info.url}, which is missing")
        return Offer(
            info=info,
            uri=uri,
            compression=info.compression,
            file_size=info.file_size,
            file_hash=None if info.file_hash is None else str(info.file_hash),
        )

    def _read_small(self, nar: Path, uri: str, real_root: str | None, size_hint: int) -> bool:
        """Whether ``nar`` is a file; a small one really under the mirror is read ahead."""
        if real_root is None or size_hint > READ_AHEAD:
            return nar.is_file()
        data = _read_regular_under(nar, real_root, READ_AHEAD)
        if isinstance(data, bool):
            return data
        with self._read_ahead_lock:
            old = self._read_ahead.pop(uri, None)
            self._read_ahead_bytes += len(data) - (0 if old is None else len(old))
            self._read_ahead[uri] = data
            while self._read_ahead_bytes > READ_AHEAD_TOTAL:
                self._read_ahead_bytes -= len(self._read_ahead.popitem(last=False)[1])
        return True

    def _nar_path(self, url: str) -> Path | None:
        """``url`` resolved inside the mirror, or None when it would point elsewhere."""
        if self._plain_prefix and _PLAIN_URL.fullmatch(url) and ".." not in url.split("/"):
            return Path(self._plain_prefix + url)  # what the general case below gives, sooner
        if urlsplit(url).scheme or url.startswith("/"):
            return None
        candidate = Path(os.path.normpath(self.root / unquote(url)))
        return candidate if candidate.is_relative_to(self.root) else None

    async def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream a local file from ``offset`` in 1 MiB reads, off the event loop.

        Only files under this mirror are opened: the broker routes offers by fetcher name, and a
        peer on the dataspace must not be able to make the daemon read other local files.
        """
        if offset == 0 and self._read_ahead:
            with self._read_ahead_lock:
                data = self._read_ahead.pop(offer.uri, None)
                if data is not None:
                    self._read_ahead_bytes -= len(data)
            if data is not None:  # read with the narinfo, from a file under the mirror
                if data:
                    yield data
                return
        path = file_uri_path(offer.uri)
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root) + os.sep
        loop = asyncio.get_running_loop()
        # The containment check (a dozen lstat calls) runs in the same worker call as the read.
        fd, chunk = await loop.run_in_executor(None, _open_and_read, path, offset, self._real_root)
        if fd is None:  # a small file: read whole in that one call
            if chunk:
                yield chunk
            return
        try:
            position = offset + len(chunk)
            yield chunk
            while True:
                try:
                    chunk = await loop.run_in_executor(None, os.pread, fd, READ_SIZE, position)
                except OSError as exc:
                    raise FetchError(
                        f"{path}: read failed at byte {position}: {exc.strerror}"
                    ) from exc
                if not chunk:
                    break
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)


def _settle(batch: list[tuple[str, asyncio.Future[Answer]]], done: asyncio.Future[list[Answer]]) -> None:
    """Each locate of a batch gets its answer (a locate given up on meanwhile is skipped)."""
    if done.cancelled():
        return
    exc = done.exception()
    answers = done.result() if exc is None else None
    for i, (_, answer) in enumerate(batch):
        if answer.done():
            continue
        if answers is not None:
            answer.set_result(answers[i])
        else:
            answer.set_exception(exc)  # type: ignore[arg-type]


def _read_file(path: str) -> bytes:
    """A small file's bytes (a third of the time of ``Path.read_bytes``, which builds a
    buffered file object for it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if data:
            while more := os.read(fd, 65536):
                data += more
        return data
    finally:
        os.close(fd)


#: A relative URL naming a file under the mirror as it is (no scheme, no escapes, no empty
#: or "." parts): e.g. ``nar/<hash>.nar.zst``.
_PLAIN_URL = re.compile(r"[^/%:?#]+(?:/[^/%:?#]+)*")


def _read_regular_under(path: Path, real_root: str, limit: int) -> bytes | bool:
    """``path``'s bytes when it is a regular file of at most ``limit`` bytes really under
    ``real_root``; else whether it is a regular file at all (opened non-blocking, so a FIFO
    never makes a locate wait)."""
    if not os.path.realpath(path).startswith(real_root):
        return path.is_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size > limit:
            return True
        data = os.read(fd, st.st_size + 1)
    except OSError:
        return True  # a read error is reported when the NAR is opened
    finally:
        os.close(fd)
    return data if len(data) == st.st_size else True


def _open_and_read(path: Path, offset: int, real_root: str) -> tuple[int | None, bytes]:
    """Open ``path`` (only when it really lies under ``real_root``) and read its first piece
    from ``offset``; the fd is closed again (None) when that piece reached the end of the file."""
    if not os.path.realpath(path).startswith(real_root):
        raise NotAvailable(f"{path} is not inside {real_root.rstrip(os.sep)}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotAvailable(f"{path}: the file is gone") from exc
    except OSError as exc:
        raise FetchError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        if offset > size:
            raise FetchError(f"{path}: offset {offset} is beyond the end ({size} bytes)")
        try:
            chunk = os.pread(fd, READ_SIZE, offset)
        except OSError as exc:
            raise FetchError(f"{path}: read failed at byte {offset}: {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        raise
    if offset + len(chunk) >= size:
        os.close(fd)
        return None, chunk
    return fd, chunk
