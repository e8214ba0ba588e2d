"""Which ERIS capability holds which store path: store hash part -> {urn, compression, narinfo}.

Two forms are read:

* a JSON-lines file (what ``substituter eris publish`` writes), one object per line::

      {"hash": "<32 chars>", "urn": "urn:eris:...", "compression": "none",
       "file_size": 1234, "narinfo": "StorePath: ...\\nSig: ...\\n"}

  ``narinfo`` is the cache's original signed narinfo text; ``compression`` and ``file_size``
  describe the encoded file (``none``: the NAR itself, and its size is the signed NarSize).
  A later line for the same hash replaces an earlier one, so appending is an update.

* narinfos with an ``ERIS: urn:eris:...`` line (as Guix proposes), read as ``<hash>.narinfo``
  from a directory or an HTTP(S) URL. The capability then encodes the file the narinfo's
  ``URL`` names, so ``Compression`` and ``FileSize`` describe it.

Nix signs only the fingerprint (path, NarHash, NarSize, references), so the URN is unsigned
location data either way: the core checks the decoded NAR against the signed NarHash/NarSize.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from substituter.errors import FetchError, FormatError, NotAvailable
from substituter.nix.compression import normalize
from substituter.nix.narinfo import NarInfo

from .._http import new_session, stream_url
from .codec import ReadCapability

__all__ = [
    "ERIS_KEY",
    "IndexEntry",
    "ErisIndex",
    "JsonLinesIndex",
    "NarinfoIndex",
    "open_index",
    "save_entries",
]

log = logging.getLogger("fetchers.eris.index")

#: The narinfo line naming an ERIS capability (Guix's proposal).
ERIS_KEY = "ERIS"
#: A narinfo is small; a bigger answer is not one.
MAX_NARINFO = 1 << 20


@dataclass(frozen=True)
class IndexEntry:
    """One store path's ERIS capability, the signed narinfo, and what the capability encodes."""

    cap: ReadCapability
    compression: str
    narinfo: NarInfo
    file_size: int | None = None

    @property
    def hash_part(self) -> str:
        return self.narinfo.hash_part

    @property
    def max_size(self) -> int | None:
        """The most bytes the capability may decode to: the signed NarSize for a raw NAR."""
        return self.narinfo.nar_size if self.compression == "none" else self.file_size

    def to_json(self) -> str:
        return json.dumps(
            {
                "hash": self.hash_part,
                "urn": self.cap.urn(),
                "compression": self.compression,
                "file_size": self.file_size,
                "narinfo": self.narinfo.to_text(),
            },
            sort_keys=True,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str) -> IndexEntry:
        """Build from a decoded JSON object; FormatError says which field of ``where`` is wrong."""
        try:
            return cls._from_record(record, where)
        except FormatError as exc:
            if str(exc).startswith(where):
                raise
            raise FormatError(f"{where}: {exc}") from exc

    @classmethod
    def _from_record(cls, record: Mapping[str, Any], where: str) -> IndexEntry:
        narinfo_text = record.get("narinfo")
        if not isinstance(narinfo_text, str):
            raise FormatError(f"{where}: 'narinfo' must be the narinfo text")
        narinfo = NarInfo.parse(narinfo_text)
        urn = record.get("urn") or eris_line(narinfo)
        if not isinstance(urn, str):
            raise FormatError(f"{where}: 'urn' must be a urn:eris: string")
        compression = record.get("compression", "none")
        file_size = record.get("file_size")
        if not isinstance(compression, str):
            raise FormatError(f"{where}: 'compression' must be a string")
        if file_size is not None and (not isinstance(file_size, int) or file_size < 0):
            raise FormatError(f"{where}: 'file_size' must be a non-negative integer")
        hash_part = record.get("hash")
        if hash_part is not None and hash_part != narinfo.hash_part:
            raise FormatError(f"{where}: entry for {hash_part} holds the narinfo of {narinfo.store_path}")
        return cls(ReadCapability.parse(urn), normalize(compression), narinfo, file_size)

    @classmethod
    def from_narinfo(cls, narinfo: NarInfo, where: str) -> IndexEntry | None:
        """The entry an ``ERIS:`` line gives (None without one): it encodes the URL's file."""
        urn = eris_line(narinfo)
        if urn is None:
            return None
        try:
            cap = ReadCapability.parse(urn)
        except FormatError as exc:
            raise FormatError(f"{where}: ERIS line: {exc}") from exc
        return cls(cap, normalize(narinfo.compression), narinfo, narinfo.file_size)


def eris_line(narinfo: NarInfo) -> str | None:
    for key, value in narinfo.extra:
        if key == ERIS_KEY:
            return value.strip()
    return None


class ErisIndex(Protocol):
    async def lookup(self, hash_part: str) -> IndexEntry | None:
        """The entry for a store hash part; None when absent, FormatError when malformed."""

    async def aclose(self) -> None: ...

    def describe(self) -> str: ...


class JsonLinesIndex:
    """A JSON-lines index file, re-read whenever it changes on disk (publish may run meanwhile)."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().absolute()
        self._stamp: tuple[int, int] | None = None
        self._records: dict[str, tuple[int, dict[str, Any]]] = {}

    def describe(self) -> str:
        return str(self.path)

    async def lookup(self, hash_part: str) -> IndexEntry | None:
        await asyncio.to_thread(self._refresh)
        found = self._records.get(hash_part)
        if found is None:
            return None
        line, record = found
        return IndexEntry.from_record(record, f"{self.path}:{line}")

    async def aclose(self) -> None:
        pass

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._records = None, {}
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._records = read_records(self.path)
            self._stamp = stamp


def read_records(path: Path) -> dict[str, tuple[int, dict[str, Any]]]:
    """Records by hash with their line numbers; unreadable lines are logged and skipped."""
    records: dict[str, tuple[int, dict[str, Any]]] = {}
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                log.warning("%s:%d: not JSON (%s); line skipped", path, number, exc.msg)
                continue
            hash_part = record.get("hash") if isinstance(record, dict) else None
            if not isinstance(hash_part, str):
                log.warning("%s:%d: no 'hash' string; line skipped", path, number)
                continue
            records[hash_part] = (number, record)
    return records


class NarinfoIndex:
    """``<hash>.narinfo`` files carrying an ``ERIS:`` line, in a directory or under a URL."""

    def __init__(self, base: str | Path, *, timeout: float = 30.0) -> None:
        text = str(base)
        self.url: str | None = None
        self.root: Path | None = None
        self._session: aiohttp.ClientSession | None = None  # made on first use, in the loop
        self.timeout = timeout
        if urlsplit(text).scheme in ("http", "https"):
            self.url = text.rstrip("/") + "/"
        else:
            self.root = Path(text).expanduser().absolute()

    def describe(self) -> str:
        return self.url or str(self.root)

    async def lookup(self, hash_part: str) -> IndexEntry | None:
        where = f"{self.describe().rstrip('/')}/{hash_part}.narinfo"
        data = await (self._read_url(where) if self.url else self._read_file(where))
        if data is None:
            return None
        try:
            narinfo = NarInfo.parse(data)
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from exc
        return IndexEntry.from_narinfo(narinfo, where)

    async def _read_file(self, path: str) -> bytes | None:
        try:
            return await asyncio.to_thread(Path(path).read_bytes)
        except FileNotFoundError:
            return None

    async def _read_url(self, url: str) -> bytes | None:
        if self._session is None:
            self._session = new_session(connect_timeout=min(3.0, self.timeout), stall_timeout=self.timeout)
        body = bytearray()
        try:
            async for chunk in stream_url(self._session, url, 0, self.timeout):
                body += chunk
                if len(body) > MAX_NARINFO:
                    raise FetchError(f"{url}: more than {MAX_NARINFO} bytes, not a narinfo")
        except NotAvailable:
            return None
        return bytes(body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def open_index(spec: str | Path, *, timeout: float = 30.0) -> ErisIndex:
    """A URL or a directory holds narinfos with ERIS lines; a file is a JSON-lines index."""
    text = str(spec)
    if urlsplit(text).scheme in ("http", "https") or Path(text).is_dir():
        return NarinfoIndex(text, timeout=timeout)
    return JsonLinesIndex(Path(text))


def save_entries(path: Path, entries: Iterable[IndexEntry]) -> int:
    """Merge entries into a JSON-lines index (new ones win), written atomically; returns the count."""
    lines: dict[str, str] = {}
    if path.exists():
        for hash_part, (_, record) in read_records(path).items():
            lines[hash_part] = json.dumps(record, sort_keys=True)
    for entry in entries:
        lines[entry.hash_part] = entry.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.writelines(line + "\n" for line in lines.values())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return len(lines)
