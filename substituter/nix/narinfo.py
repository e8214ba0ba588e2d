"""The ``.narinfo`` file of a binary cache: strict parsing and byte-exact writing.

A parsed NarInfo remembers the order of its lines, the raw text of each value and any
unknown keys, so that ``NarInfo.parse(text).to_text() == text`` for what Nix writes;
fields changed afterwards are written in Nix's canonical form.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, NarInfoError
from .hashes import Hash
from .store_path import (
    DEFAULT_STORE_DIR,
    StorePath,
    ca_path,
    parse_content_address,
)

__all__ = ["DEFAULT_COMPRESSION", "UNKNOWN_DERIVER", "NarInfo"]

DEFAULT_COMPRESSION = "bzip2"  # what Nix assumes when the Compression line is missing
UNKNOWN_DERIVER = "unknown-deriver"

# Nix's own line order; also the order fields not present in a parsed file are added in.
_CANONICAL_ORDER = (
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "Sig",
    "CA",
)
_FIELD_OF_KEY = {
    "StorePath": "store_path",
    "URL": "url",
    "Compression": "compression",
    "FileHash": "file_hash",
    "FileSize": "file_size",
    "NarHash": "nar_hash",
    "NarSize": "nar_size",
    "References": "references",
    "Deriver": "deriver",
    "CA": "ca",
}
_REQUIRED_KEYS = ("StorePath", "URL", "NarHash", "NarSize")
_UNSIGNED_INT = re.compile(r"0|[1-9][0-9]*")
_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class _Layout:
    """How a parsed narinfo was written: its keys in order, and raw text of single values."""

    keys: tuple[str, ...]
    raw: dict[str, tuple[str, Any]]  # key -> (raw value text, the value it parsed to)


@dataclass
class NarInfo:
    """Metadata of one store path in a binary cache.

    ``references`` are base names; ``deriver`` is a base name or None; ``extra`` holds
    unknown ``(key, value)`` lines in their order.
    """

    store_path: str
    url: str
    nar_hash: Hash
    nar_size: int
    compression: str = DEFAULT_COMPRESSION
    file_hash: Hash | None = None
    file_size: int | None = None
    references: list[str] = field(default_factory=list)
    deriver: str | None = None
    sigs: list[str] = field(default_factory=list)
    ca: str | None = None
    extra: list[tuple[str, str]] = field(default_factory=list)
    # Set by parse(); lets to_text() reproduce the parsed file. Not part of equality.
    layout: _Layout | None = field(default=None, repr=False, compare=False)

    # -- derived ------------------------------------------------------------------

    @property
    def parsed_path(self) -> StorePath:
        return StorePath.parse(self.store_path, self.store_dir)

    @property
    def store_dir(self) -> str:
        directory, _, _ = self.store_path.rpartition("/")
        return directory or DEFAULT_STORE_DIR

    @property
    def hash_part(self) -> str:
        return self.parsed_path.hash_part

    def nar_hash_text(self) -> str:
        """``str(self.nar_hash)``, encoded once per hash object: an answer needs it several
        times (its record, its fingerprint), at ~10 µs an encoding."""
        memo = self.__dict__.get("_nar_hash_text")
        if memo is None or memo[0] is not self.nar_hash:
            memo = self.__dict__["_nar_hash_text"] = (self.nar_hash, str(self.nar_hash))
        return memo[1]

    def reference_paths(self) -> list[str]:
        """Full paths of the references, sorted (the order the fingerprint uses)."""
        return sorted(f"{self.store_dir}/{ref}" for ref in self.references)

    def fingerprint(self) -> bytes:
        """What a narinfo signature signs: ``1;path;narHash;narSize;refs``."""
        if self.nar_size <= 0:
            raise NarInfoError(f"cannot fingerprint {self.store_path}: NarSize is {self.nar_size}")
        refs = ",".join(self.reference_paths())
        return f"1;{self.store_path};{self.nar_hash_text()};{self.nar_size};{refs}".encode()

    def ca_matches(self) -> bool:
        """True when the CA field is present and recomputes to exactly this store path."""
        if self.ca is None:
            return False
        own = self.parsed_path
        others = [ref for ref in self.references if ref != own.base_name]
        try:
            computed = ca_path(
                self.ca,
                own.name,
                others,
                self.store_dir,
                self_ref=len(others) != len(self.references),
            )
        except FormatError:
            return False
        return computed == own

    # -- copies with changes (the daemon rewrites these when serving) ---------------

    def copy(self, **changes: Any) -> NarInfo:
        """A copy with ``changes`` applied; lists are copied, so the two never share state."""
        lists = {name: list(getattr(self, name)) for name in ("references", "sigs", "extra")}
        return dataclasses.replace(self, **{**lists, **changes})

    def with_url(self, url: str) -> NarInfo:
        return self.copy(url=url)

    def with_file(
        self, url: str, compression: str, file_hash: Hash | None, file_size: int | None
    ) -> NarInfo:
        """A copy describing a different file of the same NAR (another compression)."""
        return self.copy(url=url, compression=compression, file_hash=file_hash, file_size=file_size)

    def with_sigs(self, sigs: list[str]) -> NarInfo:
        return self.copy(sigs=list(sigs))

    # -- parsing ----------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str | bytes) -> NarInfo:
        """Parse strictly; NarInfoError names the offending line."""
        values: dict[str, Any] = {}
        raw: dict[str, tuple[str, Any]] = {}
        sigs: list[str] = []
        extra: list[tuple[str, str]] = []
        keys: list[str] = []
        for number, line in enumerate(_lines(text), start=1):
            key, value = _split_line(line, number)
            keys.append(key)
            if key == "Sig":
                sigs.append(_parse_sig(value, number))
                continue
            if key not in _FIELD_OF_KEY:
                extra.append((key, value))
                continue
            if key in raw:
                raise NarInfoError(f"duplicate key {key!r}", line=number)
            parsed = _PARSERS[key](value, number)
            raw[key] = (value, _frozen(parsed))
            values[_FIELD_OF_KEY[key]] = parsed

        missing = [key for key in _REQUIRED_KEYS if key not in raw]
        if missing:
            raise NarInfoError(f"missing required key(s): {', '.join(missing)}")
        return cls(**values, sigs=sigs, extra=extra, layout=_Layout(tuple(keys), raw))

    # -- writing ----------------------------------------------------------------------

    def to_text(self) -> str:
        """The narinfo as text; byte-identical to the parsed input for unchanged fields."""
        lines: list[str] = []
        unknown = iter(self.extra)
        for key in self._keys_to_write():
            if key == "Sig":
                lines.extend(f"Sig: {sig}\n" for sig in self.sigs)
            elif key in _FIELD_OF_KEY:
                rendered = self._render(key)
                if rendered is not None:
                    lines.append(f"{key}: {rendered}\n")
            else:
                item = next(unknown, None)
                if item is not None:
                    lines.append(f"{item[0]}: {item[1]}\n")
        lines.extend(f"{key}: {value}\n" for key, value in unknown)
        return "".join(lines)

    def to_bytes(self) -> bytes:
        return self.to_text().encode()

    def _keys_to_write(self) -> list[str]:
        """The parsed file's keys (one "Sig" slot for all signatures), with keys of fields
        set since then inserted where Nix would put them."""
        if self.layout is None:
            return [key for key in _CANONICAL_ORDER if self._is_set(key, fresh=True)]
        keys: list[str] = []
        for key in self.layout.keys:
            if key != "Sig" or "Sig" not in keys:
                keys.append(key)
        for key in _CANONICAL_ORDER:
            if key in keys or not self._is_set(key, fresh=False):
                continue
            rank = _CANONICAL_ORDER.index(key)
            position = 0
            for index, existing in enumerate(keys):
                if existing in _CANONICAL_ORDER and _CANONICAL_ORDER.index(existing) < rank:
                    position = index + 1
            keys.insert(position, key)
        return keys

    def _is_set(self, key: str, *, fresh: bool) -> bool:
        """Whether a key missing from the layout must be written. A parsed file that left
        out Compression or References keeps leaving them out while they hold the default."""
        if key == "Sig":
            return bool(self.sigs)
        if key == "Compression":
            return fresh or self.compression != DEFAULT_COMPRESSION
        if key == "References":
            return fresh or bool(self.references)
        return getattr(self, _FIELD_OF_KEY[key]) is not None

    def _render(self, key: str) -> str | None:
        value = getattr(self, _FIELD_OF_KEY[key])
        if self.layout and key in self.layout.raw:
            raw_text, parsed = self.layout.raw[key]
            if parsed == _frozen(value):
                return raw_text
        if value is None:
            return None
        if key == "References":
            return " ".join(value)
        return str(value)


def _frozen(value: Any) -> Any:
    # The layout keeps its own copy, so mutating a parsed list in place is noticed.
    return tuple(value) if isinstance(value, list) else value


# -- line and value parsers ------------------------------------------------------------


def _lines(text: str | bytes) -> list[str]:
    """The lines of a narinfo, each of which must end with a newline."""
    if isinstance(text, bytes):
        data = text
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise NarInfoError("narinfo is not valid UTF-8", line=line) from exc
    if not text:
        raise NarInfoError("narinfo is empty")
    lines = text.split("\n")
    if lines[-1] != "":
        raise NarInfoError("last line does not end with a newline", line=len(lines))
    return lines[:-1]


def _split_line(line: str, number: int) -> tuple[str, str]:
    key, colon, rest = line.partition(":")
    if not colon:
        raise NarInfoError(f"line {line!r} has no 'Key: value' colon", line=number)
    if not _KEY.fullmatch(key):
        raise NarInfoError(f"invalid key {key!r}", line=number)
    if not rest.startswith(" ") or rest[1:2].isspace():
        raise NarInfoError(f"key {key!r} must be followed by exactly one space", line=number)
    return key, rest[1:]


def _parse_sig(value: str, number: int) -> str:
    name, colon, signature = value.partition(":")
    if not name or not colon or not signature:
        raise NarInfoError(f"signature {value!r} is not 'keyname:base64'", line=number)
    return value


def _parse_store_path(value: str, number: int) -> str:
    store_dir = value.rpartition("/")[0]
    if not store_dir:
        raise NarInfoError(f"StorePath {value!r} is not an absolute store path", line=number)
    try:
        StorePath.parse(value, store_dir)
    except FormatError as exc:
        raise NarInfoError(f"bad StorePath: {exc}", line=number) from exc
    return value


def _check_base_name(value: str, number: int, key: str) -> str:
    try:
        StorePath.parse(value)
    except FormatError as exc:
        raise NarInfoError(f"bad {key}: {exc}", line=number) from exc
    return value


def _parse_text(key: str) -> Callable[[str, int], str]:
    def parse(value: str, number: int) -> str:
        if not value:
            raise NarInfoError(f"{key} is empty", line=number)
        return value

    return parse


def _parse_hash(key: str) -> Callable[[str, int], Hash]:
    def parse(value: str, number: int) -> Hash:
        try:
            return Hash.parse(value)
        except FormatError as exc:
            raise NarInfoError(f"bad {key}: {exc}", line=number) from exc

    return parse


def _parse_size(key: str, minimum: int) -> Callable[[str, int], int]:
    def parse(value: str, number: int) -> int:
        if not _UNSIGNED_INT.fullmatch(value):
            raise NarInfoError(f"{key} {value!r} is not a decimal number", line=number)
        size = int(value)
        if size < minimum:
            raise NarInfoError(f"{key} must be at least {minimum}, got {size}", line=number)
        return size

    return parse


def _parse_references(value: str, number: int) -> list[str]:
    if not value:
        return []
    names = value.split(" ")
    for name in names:
        _check_base_name(name, number, "reference")
    return names


def _parse_deriver(value: str, number: int) -> str | None:
    if value == UNKNOWN_DERIVER:
        return None
    return _check_base_name(value, number, "Deriver")


def _parse_ca(value: str, number: int) -> str:
    try:
        parse_content_address(value)
    except FormatError as exc:
        raise NarInfoError(f"bad CA: {exc}", line=number) from exc
    return value


_PARSERS: dict[str, Callable[[str, int], Any]] = {
    "StorePath": _parse_store_path,
    "URL": _parse_text("URL"),
    "Compression": _parse_text("Compression"),
    "FileHash": _parse_hash("FileHash"),
    "FileSize": _parse_size("FileSize", 0),
    "NarHash": _parse_hash("NarHash"),
    "NarSize": _parse_size("NarSize", 1),
    "References": _parse_references,
    "Deriver": _parse_deriver,
    "CA": _parse_ca,
}
