"""Store paths: parsing and validating them, and computing them the way Nix does.

A store path is ``<store dir>/<hash part>-<name>``; the hash part is 32 nix32 characters
(20 bytes). Content-addressed paths are computed from a "fingerprint" string:

    hash part = nix32(compress(sha256("<type>:sha256:<hex inner>:<store dir>:<name>"), 20))

where ``<type>`` is ``text``, ``source`` or ``output:out`` and, for the first two, is
followed by ``:<full reference path>`` for every reference (sorted) and ``:self``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..errors import HashError, StorePathError
from . import base32
from .hashes import Hash, compress_hash

__all__ = [
    "DEFAULT_STORE_DIR",
    "HASH_PART_LENGTH",
    "ContentAddress",
    "StorePath",
    "ca_path",
    "make_fixed_output_path",
    "make_source_path",
    "make_store_path",
    "make_text_path",
    "parse_content_address",
    "validate_hash_part",
    "validate_name",
]

DEFAULT_STORE_DIR = "/nix/store"
HASH_PART_LENGTH = 32  # nix32 characters for 20 bytes
MAX_NAME_LENGTH = 211

_HASH_PART_CHARS = frozenset(base32.ALPHABET)
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")

FileIngestionMethod = Literal["flat", "recursive"]


def validate_hash_part(text: str) -> str:
    """Return ``text`` if it is a valid hash part (32 nix32 characters), else StorePathError."""
    if len(text) != HASH_PART_LENGTH:
        raise StorePathError(
            f"store path hash part {text!r} has {len(text)} characters, expected {HASH_PART_LENGTH}"
        )
    bad = sorted(set(text) - _HASH_PART_CHARS)
    if bad:
        raise StorePathError(
            f"store path hash part {text!r} contains characters outside nix32: {''.join(bad)!r}"
        )
    return text


def validate_name(name: str) -> str:
    """Return ``name`` if Nix accepts it as a store path name, else StorePathError."""
    if not name:
        raise StorePathError("store path name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise StorePathError(
            f"store path name {name[:40]!r}... is {len(name)} characters, "
            f"longer than {MAX_NAME_LENGTH}"
        )
    if not _NAME_RE.fullmatch(name):
        bad = sorted({c for c in name if not _NAME_RE.fullmatch(c)})
        raise StorePathError(
            f"store path name {name!r} contains forbidden characters {''.join(bad)!r} "
            "(allowed: letters, digits and +-._?=)"
        )
    if name in (".", ".."):
        raise StorePathError(f"store path name {name!r} is not allowed")
    if name.startswith((".-", "..-")):
        raise StorePathError(f"store path name {name!r} must not start with '.-' or '..-'")
    return name


def _validate_store_dir(store_dir: str) -> str:
    if not store_dir.startswith("/") or (store_dir != "/" and store_dir.endswith("/")):
        raise StorePathError(
            f"store directory {store_dir!r} must be absolute and have no trailing slash"
        )
    return store_dir


@dataclass(frozen=True, order=True)
class StorePath:
    """A store path without its directory: ``<hash part>-<name>``."""

    hash_part: str
    name: str

    def __post_init__(self) -> None:
        validate_hash_part(self.hash_part)
        validate_name(self.name)

    @classmethod
    def parse(cls, text: str, store_dir: str = DEFAULT_STORE_DIR) -> StorePath:
        """Parse a full path in ``store_dir`` or a bare base name."""
        base_name = text
        if "/" in text:
            prefix = _validate_store_dir(store_dir).rstrip("/") + "/"
            if not text.startswith(prefix):
                raise StorePathError(f"path {text!r} is not in the store directory {store_dir!r}")
            base_name = text[len(prefix) :]
            if "/" in base_name:
                raise StorePathError(
                    f"path {text!r} is inside a store path, not a store path itself"
                )
        if len(base_name) < HASH_PART_LENGTH + 2 or base_name[HASH_PART_LENGTH] != "-":
            raise StorePathError(f"store path {text!r} is not '<32 hash characters>-<name>'")
        return cls(base_name[:HASH_PART_LENGTH], base_name[HASH_PART_LENGTH + 1 :])

    @property
    def base_name(self) -> str:
        return f"{self.hash_part}-{self.name}"

    def path(self, store_dir: str = DEFAULT_STORE_DIR) -> str:
        return f"{_validate_store_dir(store_dir).rstrip('/')}/{self.base_name}"

    def __str__(self) -> str:
        return self.base_name


def _full_path(reference: StorePath | str, store_dir: str) -> str:
    if isinstance(reference, str):
        reference = StorePath.parse(reference, store_dir)
    return reference.path(store_dir)


def _type_with_references(
    kind: str, references: Iterable[StorePath | str], self_ref: bool, store_dir: str
) -> str:
    parts = [kind, *sorted(_full_path(ref, store_dir) for ref in references)]
    if self_ref:
        parts.append("self")
    return ":".join(parts)


def make_store_path(
    kind: str,
    inner: Hash,
    name: str,
    store_dir: str = DEFAULT_STORE_DIR,
    references: Iterable[StorePath | str] = (),
    self_ref: bool = False,
) -> StorePath:
    """Compute a store path of type ``kind`` (``text``, ``source``, ``output:out``...).

    References (base names, full paths or StorePaths) and ``self_ref`` are appended to the
    type as Nix does; pass none for ``output:out``.
    """
    _validate_store_dir(store_dir)
    validate_name(name)
    type_text = _type_with_references(kind, references, self_ref, store_dir)
    fingerprint = f"{type_text}:{inner.algorithm}:{inner.hex()}:{store_dir}:{name}"
    digest = hashlib.sha256(fingerprint.encode()).digest()
    return StorePath(base32.encode(compress_hash(digest, 20)), name)


def make_text_path(
    name: str,
    text: bytes,
    references: Iterable[StorePath | str] = (),
    store_dir: str = DEFAULT_STORE_DIR,
) -> StorePath:
    """The path of ``builtins.toFile name text`` (and of ``.drv`` files)."""
    return _make_text_path_from_hash(name, Hash.of_bytes(text), references, store_dir)


def _make_text_path_from_hash(
    name: str, text_hash: Hash, references: Iterable[StorePath | str], store_dir: str
) -> StorePath:
    if text_hash.algorithm != "sha256":
        raise HashError(f"text paths are hashed with sha256, got {text_hash.algorithm}")
    return make_store_path("text", text_hash, name, store_dir, references)


def make_source_path(
    nar_hash: Hash,
    name: str,
    references: Iterable[StorePath | str] = (),
    self_ref: bool = False,
    store_dir: str = DEFAULT_STORE_DIR,
) -> StorePath:
    """The path of a recursively (NAR) sha256-hashed path, as ``nix-store --add`` makes."""
    if nar_hash.algorithm != "sha256":
        raise HashError(f"source paths are hashed with sha256, got {nar_hash.algorithm}")
    return make_store_path("source", nar_hash, name, store_dir, references, self_ref)


def make_fixed_output_path(
    name: str,
    method: FileIngestionMethod,
    hash: Hash,
    store_dir: str = DEFAULT_STORE_DIR,
    references: Iterable[StorePath | str] = (),
    self_ref: bool = False,
) -> StorePath:
    """The path of a fixed-output path (``nix-store --add-fixed``, fetchurl...).

    Recursive sha256 is a source path; anything else is ``output:out`` over the inner
    fingerprint ``fixed:out:[r:]<algo>:<hex>:``, which cannot carry references.
    """
    if method not in ("flat", "recursive"):
        raise StorePathError(f"ingestion method must be 'flat' or 'recursive', got {method!r}")
    if method == "recursive" and hash.algorithm == "sha256":
        return make_source_path(hash, name, references, self_ref, store_dir)
    references = list(references)
    if references or self_ref:
        raise StorePathError(
            f"fixed-output path {name!r} hashed {method} with {hash.algorithm} "
            "cannot have references"
        )
    method_tag = "r:" if method == "recursive" else ""
    inner_text = f"fixed:out:{method_tag}{hash.algorithm}:{hash.hex()}:"
    return make_store_path("output:out", Hash.of_bytes(inner_text.encode()), name, store_dir)


@dataclass(frozen=True)
class ContentAddress:
    """A parsed narinfo ``CA:`` field: ``text:<hash>`` or ``fixed:[r:]<hash>``."""

    kind: Literal["text", "fixed"]
    method: FileIngestionMethod  # "flat" for text
    hash: Hash

    def __str__(self) -> str:
        if self.kind == "text":
            return f"text:{self.hash}"
        return f"fixed:{'r:' if self.method == 'recursive' else ''}{self.hash}"


def parse_content_address(ca: str) -> ContentAddress:
    """Parse ``text:sha256:…``, ``fixed:r:sha256:…`` or ``fixed:sha256:…``."""
    kind, colon, rest = ca.partition(":")
    try:
        if kind == "text" and colon:
            text_hash = Hash.parse(rest)
            if text_hash.algorithm != "sha256":
                raise StorePathError(f"content address {ca!r}: text hashes must be sha256")
            return ContentAddress("text", "flat", text_hash)
        if kind == "fixed" and colon:
            if rest.startswith("r:"):
                return ContentAddress("fixed", "recursive", Hash.parse(rest[2:]))
            return ContentAddress("fixed", "flat", Hash.parse(rest))
    except HashError as exc:
        raise StorePathError(f"content address {ca!r} has a bad hash: {exc}") from exc
    raise StorePathError(
        f"content address {ca!r} is not 'text:<hash>', 'fixed:r:<hash>' or 'fixed:<hash>'"
    )


def ca_path(
    ca: str | ContentAddress,
    name: str,
    references: Iterable[StorePath | str] = (),
    store_dir: str = DEFAULT_STORE_DIR,
    self_ref: bool = False,
) -> StorePath:
    """Recompute the store path a narinfo's CA field claims.

    ``references`` must not include the path itself; say ``self_ref=True`` instead.
    """
    address = parse_content_address(ca) if isinstance(ca, str) else ca
    if address.kind == "text":
        if self_ref:
            raise StorePathError(f"text path {name!r} cannot refer to itself")
        return _make_text_path_from_hash(name, address.hash, references, store_dir)
    return make_fixed_output_path(
        name, address.method, address.hash, store_dir, references, self_ref
    )
