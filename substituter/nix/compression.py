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
from collections.abc import Callable, Generator
from typing import IO, Protocol, cast

import brotli  # ships no type hints (mypy: ignore_missing_imports)
import zstandard

from substituter.errors import CompressionError, SizeMismatch

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
        return _ZstdDecoder(max_output)
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


class _Collector:
    """The file-like object zstandard's stream_writer writes each output piece to."""

    def __init__(self, budget: _Budget) -> None:
        self.budget = budget
        self.out: list[bytes] = []

    def write(self, chunk: bytes) -> int:
        self.budget.take(bytes(chunk), self.out)  # raises SizeMismatch mid-decode
        return len(chunk)


class _ZstdDecoder:
    """zstd via stream_writer, which hands output over in pieces of at most ``_STEP``.

    (``decompressobj().decompress`` would return a bomb's whole output at once.)
    stream_writer cannot say whether the last frame ended, so ``_ZstdFrames`` follows
    the frame structure alongside to detect truncation.
    """

    def __init__(self, max_output: int | None) -> None:
        self._collector = _Collector(_Budget("zstd", max_output))
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            cast(IO[bytes], self._collector), write_size=_STEP, closefd=False
        )
        self._frames = _ZstdFrames()

    def decode(self, data: bytes) -> bytes:
        self._frames.feed(data)
        try:
            self._writer.write(data)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"corrupt zstd data: {exc}") from exc
        out, self._collector.out = self._collector.out, []
        return b"".join(out)

    def flush(self) -> bytes:
        if not self._frames.complete:
            raise CompressionError("zstd stream is truncated")
        return b""


class _ZstdFrames:
    """Follows zstd frame boundaries (RFC 8878 section 3.1) without decoding any block."""

    _MAGIC = 0xFD2FB528

    def __init__(self) -> None:
        self._buf = bytearray()
        self._want = 0  # header bytes the grammar asked for
        self._skip = 0  # block or frame bytes to pass over
        self._frames = 0
        self._between_frames = False
        self._grammar = self._stream()
        self._resume(None)

    @property
    def complete(self) -> bool:
        """True when at least one frame was seen and the input ends between frames."""
        return self._frames > 0 and self._between_frames and not self._buf

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while True:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                if self._skip:
                    return
                self._resume(None)
                continue
            if not view:
                return
            take = min(self._want - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == self._want:
                header = bytes(self._buf)
                self._buf.clear()
                self._resume(header)

    def _resume(self, value: bytes | None) -> None:
        while True:
            request = self._grammar.send(value)
            if request > 0:
                self._want = request
                return
            self._skip = -request
            if self._skip:
                return
            value = None  # an empty block: nothing to skip, carry on

    def _stream(self) -> Generator[int, bytes | None, None]:
        """Yields n > 0 to read n header bytes, -n to skip n bytes."""
        while True:
            self._between_frames = True
            magic = int.from_bytes((yield 4) or b"", "little")
            self._between_frames = False
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                yield -int.from_bytes((yield 4) or b"", "little")
                self._frames += 1
                continue
            if magic != self._MAGIC:
                raise CompressionError(f"corrupt zstd data: bad frame magic {magic:#x}")
            descriptor = ((yield 1) or b"\0")[0]
            single_segment = descriptor >> 5 & 1
            fcs_size = (single_segment, 2, 4, 8)[descriptor >> 6]
            header_rest = (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + fcs_size
            if header_rest:
                yield header_rest
            while True:
                block = int.from_bytes((yield 3) or b"", "little")
                kind, size = block >> 1 & 3, block >> 3
                yield -(1 if kind == 1 else size)  # an RLE block stores one byte
                if block & 1:
                    break
            if descriptor >> 2 & 1:
                yield -4  # content checksum
            self._frames += 1


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
