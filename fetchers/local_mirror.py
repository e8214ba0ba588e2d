"""The ``local-mirror`` fetcher: a directory written by ``nix copy --to file://DIR``.

Narinfos are read straight from ``DIR/<hash>.narinfo`` and NARs streamed from ``DIR/<URL>``.  All
file I/O runs in the default executor so the event loop never waits on a disk, in as few hops as
possible: a locate is one worker call, and so is a whole small NAR.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
        self._real_root: str | None = None  # realpath of root + "/", resolved once on first open
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
        return await asyncio.to_thread(self._locate, hash_part)

    def _locate(self, hash_part: str) -> Answer:
        """The whole lookup in one worker call (reading, parsing, checking the NAR is there)."""
        narinfo_file = self.root / f"{hash_part}.narinfo"
        try:
            data = narinfo_file.read_bytes()
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
        if not nar.is_file():
            return Unavailable(f"{narinfo_file} names {info.url}, which is missing")
        return Offer(
            info=info,
            uri=nar.as_uri(),
            compression=info.compression,
            file_size=info.file_size,
            file_hash=None if info.file_hash is None else str(info.file_hash),
        )

    def _nar_path(self, url: str) -> Path | None:
        """``url`` resolved inside the mirror, or None when it would point elsewhere."""
        if urlsplit(url).scheme or url.startswith("/"):
            return None
        candidate = Path(os.path.normpath(self.root / unquote(url)))
        return candidate if candidate.is_relative_to(self.root) else None

    async def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream a local file from ``offset`` in 1 MiB reads, off the event loop.

        Only files under this mirror are opened: the broker routes offers by fetcher name, and a
        peer on the dataspace must not be able to make the daemon read other local files.
        """
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
