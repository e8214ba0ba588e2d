"""Incremental codecs for the compressions a binary cache uses: none, xz, zstd, bzip2, br.

Decoders have ``decode(data) -> bytes`` and ``flush() -> bytes``; encoders have
``compress(data) -> bytes`` and ``flush() -> bytes``. Decoders built with ``max_output``
raise SizeMismatch as soon as the output would exceed it, and they only ever ask the
libraries for bounded pieces of output, so a decompression bomb stops after about
``max_output`` bytes instead of allocating its full size. Corrupt or truncated input
raises CompressionError (truncation is reported by ``flush()``).
"""

from __future__ import annotations

import bz2
import lzma
from collections.abc import Callable
from typing import Protocol, cast

import brotli  # ships no type hints (mypy: ignore_missing_imports)
import zstandard

from substituter.errors import CompressionError, SizeMismatch

from .zstd_frames import ZstdDecoder

__all__ = [
    "SUPPORTED",
    "Compressor",
    "Decompressor",
    "compressor",
    "decompressor",
    "normalize",
]

SUPPORTED = ("none", "xz", "zstd", "bzip2", "br")
_STEP = 256 * 1024  # largest piece of output requested from a library at once


class Decompressor(Protocol):
    def decode(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


def normalize(name: str | None) -> str:
    """The codec name for a narinfo ``Compression`` value (missing means bzip2)."""
    if not name:
        return "bzip2"
    if name not in SUPPORTED:
        raise CompressionError(f"unsupported compression {name!r}; supported: {', '.join(SUPPORTED)}")
    return name


def decompressor(name: str, max_output: int | None = None) -> Decompressor:
    """A fresh decoder for ``name``; output beyond ``max_output`` raises SizeMismatch."""
    name = normalize(name)
    if name == "none":
        return _Identity(max_output)
    if name == "xz":
        return _StdlibDecoder("xz", lzma.LZMADecompressor, max_output)
    if name == "bzip2":
        return _StdlibDecoder("bzip2", bz2.BZ2Decompressor, max_output)
    if name == "zstd":
        return ZstdDecoder(max_output)  # whole units at a time, see zstd_frames
    return _BrotliDecoder(max_output)


def compressor(name: str, level: int | None = None) -> Compressor:
    """A fresh encoder for ``name`` at ``level`` (the library default when None)."""
    name = normalize(name)
    if name == "none":
        return _IdentityEncoder()
    if name == "xz":
        return _CallEncoder(lzma.LZMACompressor(preset=6 if level is None else level))
    if name == "bzip2":
        return _CallEncoder(bz2.BZ2Compressor(9 if level is None else level))
    if name == "zstd":
        zlevel = 3 if level is None else level
        return _CallEncoder(zstandard.ZstdCompressor(level=zlevel).compressobj())
    return _BrotliEncoder(brotli.Compressor(quality=11 if level is None else level))


# -- decoders ---------------------------------------------------------------------------


class _Budget:
    """Counts output and enforces ``max_output``."""

    def __init__(self, name: str, max_output: int | None) -> None:
        self.name = name
        self.max_output = max_output
        self.produced = 0

    def take(self, chunk: bytes, out: list[bytes]) -> None:
        self.produced += len(chunk)
        if self.max_output is not None and self.produced > self.max_output:
            raise SizeMismatch(f"{self.name} output exceeds the limit of {self.max_output} bytes")
        if chunk:
            out.append(chunk)


class _Identity:
    def __init__(self, max_output: int | None) -> None:
        self._budget = _Budget("uncompressed", max_output)

    def decode(self, data: bytes) -> bytes:
        out: list[bytes] = []
        self._budget.take(bytes(data), out)
        return out[0] if out else b""

    def flush(self) -> bytes:
        return b""


class _StdlibDecoder:
    """xz and bzip2: both offer ``decompress(data, max_length)``; streams may be concatenated."""

    def __init__(
        self,
        name: str,
        factory: Callable[[], lzma.LZMADecompressor | bz2.BZ2Decompressor],
        max_output: int | None,
    ) -> None:
        self._factory = factory
        self._decoder = factory()
        self._budget = _Budget(name, max_output)
        self._seen_input = False

    def decode(self, data: bytes) -> bytes:
        out: list[bytes] = []
        pending = bytes(data)
        self._seen_input = self._seen_input or bool(pending)
        try:
            while True:
                if self._decoder.eof:
                    pending = self._decoder.unused_data + pending
                    if not pending:
                        break
                    self._decoder = self._factory()  # a concatenated stream follows
                chunk = self._decoder.decompress(pending, _STEP)
                pending = b""
                self._budget.take(chunk, out)
                if not self._decoder.eof and self._decoder.needs_input:
                    break
        except (lzma.LZMAError, OSError, EOFError) as exc:
            raise CompressionError(f"corrupt {self._budget.name} data: {exc}") from exc
        return b"".join(out)

    def flush(self) -> bytes:
        if not self._decoder.eof or not self._seen_input:
            raise CompressionError(f"{self._budget.name} stream is truncated")
        return b""


class _BrotliDecoder:
    def __init__(self, max_output: int | None) -> None:
        self._decoder = brotli.Decompressor()
        self._budget = _Budget("br", max_output)

    def decode(self, data: bytes) -> bytes:
        out: list[bytes] = []
        try:
            self._budget.take(self._decoder.process(data, output_buffer_limit=_STEP), out)
            while not self._decoder.can_accept_more_data():
                self._budget.take(self._decoder.process(b"", output_buffer_limit=_STEP), out)
        except brotli.error as exc:
            raise CompressionError(f"corrupt br data: {exc}") from exc
        return b"".join(out)

    def flush(self) -> bytes:
        out: list[bytes] = []
        try:  # the decoder may still hold input it accepted but has not expanded yet
            while not self._decoder.is_finished():
                chunk = self._decoder.process(b"", output_buffer_limit=_STEP)
                if not chunk:
                    break
                self._budget.take(chunk, out)
        except brotli.error as exc:
            raise CompressionError(f"corrupt br data: {exc}") from exc
        if not self._decoder.is_finished():
            raise CompressionError("br stream is truncated")
        return b"".join(out)


# -- encoders ---------------------------------------------------------------------------


class _IdentityEncoder:
    def compress(self, data: bytes) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


class _CallEncoder:
    """Wraps the stdlib/zstandard shape: ``compress(data)`` then ``flush()``."""

    def __init__(
        self,
        encoder: lzma.LZMACompressor | bz2.BZ2Compressor | zstandard.ZstdCompressionObj,
    ) -> None:
        self._encoder = encoder

    def compress(self, data: bytes) -> bytes:
        return self._encoder.compress(data)

    def flush(self) -> bytes:
        return self._encoder.flush()


class _BrotliEncoder:
    def __init__(self, encoder: brotli.Compressor) -> None:
        self._encoder = encoder

    def compress(self, data: bytes) -> bytes:
        return cast(bytes, self._encoder.process(data))

    def flush(self) -> bytes:
        return cast(bytes, self._encoder.finish())
