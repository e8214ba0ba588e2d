"""What every store backend shares: the path metadata, the ``Store`` protocol, and the
guard that keeps an unfinished or oversized NAR from ever completing inside a store.

``PathInfo.nar_hash`` accepts every form Nix itself parses for a sha256: ``sha256:<nix32>``
(narinfo style, 52 characters), ``sha256:<hex>``, bare hex (what the daemon's QueryPathInfo
returns), ``sha256:<base64>`` and SRI ``sha256-<base64>``. ``nar_hash_digest`` turns any of
them into the 32 raw bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from substituter.errors import HashError, HashMismatch, SizeMismatch, StorePathError
from substituter.nix.hashes import Hash
from substituter.nix.store_path import StorePath

__all__ = [
    "DEFAULT_STORE_DIR",
    "PathInfo",
    "Store",
    "StoreItem",
    "check_path_info",
    "check_store_path",
    "guarded_nar",
    "nar_hash_digest",
    "strip_ansi",
]

DEFAULT_STORE_DIR = "/nix/store"


@dataclass(frozen=True)
class PathInfo:
    """Metadata of one store path, as the daemon stores it.

    ``references`` and ``deriver`` are full store paths; ``sigs`` are ``keyname:base64``
    strings; ``ca`` is a content address such as ``fixed:r:sha256:...`` or None.
    """

    store_path: str
    nar_hash: str
    nar_size: int
    references: frozenset[str] = field(default_factory=frozenset)
    deriver: str | None = None
    sigs: frozenset[str] = field(default_factory=frozenset)
    ca: str | None = None
    ultimate: bool = False
    registration_time: int = 0


# One path to add, with its NAR as a stream of chunks.
StoreItem = tuple[PathInfo, AsyncIterable[bytes]]


@runtime_checkable
class Store(Protocol):
    """A Nix store the broker can write verified paths into."""

    async def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        """The subset of ``paths`` that is valid in this store."""
        ...

    async def is_valid_path(self, path: str) -> bool: ...

    async def query_path_info(self, path: str) -> PathInfo | None:
        """The path's metadata, or None when it is not valid."""
        ...

    async def add_to_store_nar(
        self,
        info: PathInfo,
        nar_chunks: AsyncIterable[bytes],
        *,
        repair: bool = False,
        dont_check_sigs: bool = False,
    ) -> None:
        """Add one path. If ``nar_chunks`` raises, the path is not registered and the error
        propagates; a refusal by the store raises StoreError."""
        ...

    async def add_multiple_to_store(
        self,
        items: Iterable[StoreItem],
        *,
        repair: bool = False,
        dont_check_sigs: bool = False,
    ) -> None:
        """Add several paths in topological order (references first)."""
        ...

    async def close(self) -> None: ...


def nar_hash_digest(nar_hash: str) -> bytes:
    """The 32 bytes of a sha256 NarHash written in any form Nix accepts (see module doc)."""
    parsed = Hash.parse(nar_hash, default_algorithm="sha256")
    if parsed.algorithm != "sha256":
        raise HashError(f"NarHash {nar_hash!r} is not a sha256 hash")
    return parsed.digest


_CONTENT_ADDRESS = re.compile(r"(text:sha256|fixed:(r:)?(md5|sha1|sha256|sha512)):[A-Za-z0-9+/=]+")


#: (path, store dir) pairs found well-formed: a fetch checks each path several times (asked
#: about, imported, referenced by others), at ~6 µs a parse.  Cleared when it grows large.
_WELL_FORMED: set[tuple[str, str]] = set()
_WELL_FORMED_MAX = 1 << 16


def check_store_path(path: str, store_dir: str = DEFAULT_STORE_DIR) -> str:
    """Return ``path`` if it is a well-formed store path in ``store_dir``, else raise
    StorePathError. (A daemon given a malformed path drops the whole connection.)"""
    key = (path, store_dir)
    if key in _WELL_FORMED:
        return path
    directory, _, base = path.rpartition("/")
    try:
        parsed = StorePath.parse(base)
    except StorePathError as exc:
        raise StorePathError(f"{path!r} is not a valid store path in {store_dir}: {exc}") from exc
    # Nix 2.8 also refuses names starting with a period.
    if directory != store_dir or parsed.name.startswith("."):
        raise StorePathError(f"{path!r} is not a valid store path in {store_dir}")
    if len(_WELL_FORMED) >= _WELL_FORMED_MAX:
        _WELL_FORMED.clear()
    _WELL_FORMED.add(key)
    return path


def check_path_info(info: PathInfo, store_dir: str = DEFAULT_STORE_DIR) -> None:
    """Raise a FormatError unless every field Nix parses is well-formed."""
    check_store_path(info.store_path, store_dir)
    for reference in info.references:
        check_store_path(reference, store_dir)
    if info.deriver is not None:
        check_store_path(info.deriver, store_dir)
    nar_hash_digest(info.nar_hash)
    if info.nar_size <= 0:
        raise SizeMismatch(f"NarSize of {info.store_path} must be positive, not {info.nar_size}")
    if info.ca is not None and not _CONTENT_ADDRESS.fullmatch(info.ca):
        raise HashError(f"content address {info.ca!r} of {info.store_path} is malformed")


async def guarded_nar(
    info: PathInfo, nar_chunks: AsyncIterable[bytes], *, check_hash: bool
) -> AsyncIterator[bytes]:
    """Pass ``nar_chunks`` through, always holding the newest chunk back.

    A store completes a path as soon as it has parsed the last byte of its NAR, so the
    final chunk is released only after the producer has finished without raising, the
    byte count equals ``info.nar_size`` and (with ``check_hash``) the sha256 equals
    ``info.nar_hash``. Any failure therefore leaves the store holding an incomplete NAR,
    which it discards. Raises SizeMismatch / HashMismatch; the producer's own errors
    propagate unchanged.
    """
    expected_digest = nar_hash_digest(info.nar_hash) if check_hash else None
    hasher = hashlib.sha256() if check_hash else None
    size = 0
    pending: bytes | None = None
    async for chunk in nar_chunks:
        if not chunk:
            continue
        size += len(chunk)
        if size > info.nar_size:
            raise SizeMismatch(
                f"NAR of {info.store_path} is longer than its NarSize {info.nar_size}"
            )
        if hasher is not None:
            hasher.update(chunk)
        if pending is not None:
            yield pending
        pending = chunk
    if size != info.nar_size:
        raise SizeMismatch(
            f"NAR of {info.store_path} has {size} bytes, NarSize says {info.nar_size}"
        )
    if hasher is not None and hasher.digest() != expected_digest:
        raise HashMismatch(
            f"NAR of {info.store_path} has sha256 {hasher.hexdigest()},"
            f" NarHash says {info.nar_hash}"
        )
    if pending is not None:
        yield pending


# CSI sequences (colours), OSC sequences (hyperlinks) and lone two-byte escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    """Remove terminal escapes from a message Nix formatted for a terminal."""
    return _ANSI.sub("", text)
