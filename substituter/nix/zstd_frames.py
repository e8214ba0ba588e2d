"""zstd streams taken apart at their units (RFC 8878 section 3.1), to decode them exactly and to
pass a source's compressed blocks on to a client.

A zstd stream is a sequence of frames: a header, blocks (each at most 128 KiB of content, the last
one flagged), an optional content checksum; skippable frames may sit in between.
:class:`ZstdDecoder` decodes only whole units, so after every call its output is exactly the
content of the blocks it has seen complete.  That exactness is what :class:`ZstdRelay` needs to
hand a client the source's own compressed blocks, once the NAR bytes they carry are verified,
instead of the NAR itself: if the source fails after some block, the client's decoder holds
exactly the NAR bytes verified so far, and the NAR goes on (from the next source) as raw blocks
in the same frame.

What the client gets is a valid zstd stream of the same content: each frame header is written
anew without content size, checksum or dictionary fields (a frame that a failover finishes with
raw blocks would contradict them), skippable frames and checksums are dropped (the decoder here
checks them), blocks pass unchanged.  Pure format code: no I/O.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import zstandard

from substituter.errors import CompressionError, SizeMismatch

__all__ = ["MAX_BLOCK", "Passed", "ZstdDecoder", "ZstdRelay", "raw_blocks", "window_descriptor"]

MAGIC = 0xFD2FB528
MAGIC_BYTES = MAGIC.to_bytes(4, "little")
_SKIPPABLE = 0x184D2A50  # magic of a skippable frame, low 4 bits free
#: A block holds at most this much content (less when the frame's window is smaller).
MAX_BLOCK = 128 * 1024
#: Blocks handed to the library per call: its output per call stays within 1 MiB, so a
#: decompression bomb stops at ``max_output`` without ever holding much more.
_BLOCKS_PER_CALL = 8
#: An empty raw block with the last-block flag: ends a frame.
END_BLOCK = bytes((1, 0, 0))

_FRAME, _BLOCK, _CHECKSUM, _SKIP = range(4)


class Passed(NamedTuple):
    """Compressed bytes a client may have once the NAR verified up to ``nar_end``."""

    nar_end: int
    data: bytes
    #: After ``data``, the frame left open and the largest raw block allowed in it (0: no frame
    #: open, the next bytes must start one).
    open_block_limit: int


def window_descriptor(size: int) -> int:
    """The smallest Window_Descriptor byte for a window of at least ``size`` bytes."""
    for exponent in range(32):
        base = 1 << (10 + exponent)
        for mantissa in range(8):
            if base + (base >> 3) * mantissa >= size:
                return exponent << 3 | mantissa
    raise CompressionError(f"zstd window of {size} bytes is too large")


def _window_size(descriptor: int) -> int:
    base = 1 << (10 + (descriptor >> 3))
    return base + (base >> 3) * (descriptor & 7)


def frame_header(window: int) -> bytes:
    """A frame header with only a window (no content size, checksum or dictionary)."""
    return MAGIC_BYTES + bytes((0, window_descriptor(window)))


def raw_blocks(data: bytes | memoryview, limit: int) -> list[bytes | memoryview]:
    """``data`` as raw blocks of at most ``limit`` bytes, none flagged last (see END_BLOCK)."""
    view = memoryview(data)
    out: list[bytes | memoryview] = []
    for i in range(0, len(view), limit):
        piece = view[i:i + limit]
        out.append((len(piece) << 3).to_bytes(3, "little"))  # last=0, type=raw(0)
        out.append(piece)
    return out


class ZstdDecoder:
    """A zstd decoder (``decode``/``flush``, as in nix.compression) fed whole units only.

    Input is cut at the end of the last complete block, header, checksum or skippable frame
    (the rest waits for more input), so the output of each call is the exact content of what
    came complete.  Output beyond ``max_output`` raises SizeMismatch, at most ~1 MiB late.
    With ``passed`` given, every call that completed units appends a :class:`Passed`: those
    units as the client gets them (headers rewritten, checksums and skippable frames dropped).
    """

    def __init__(self, max_output: int | None = None, passed: deque[Passed] | None = None) -> None:
        self.max_output = max_output
        self.produced = 0
        self.passed = passed
        self._library = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
        self._buffer = bytearray()
        self._state = _FRAME
        self._skip = 0  # bytes of a skippable frame still to come
        self._checksum = False
        self._frames = 0
        self._block_limit = 0  # of the open frame, as the client's decoder sees it (0: none open)

    def decode(self, data: bytes) -> bytes:
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        parts: list[bytes | memoryview] | None = [] if self.passed is not None else None
        view = memoryview(buffer)
        try:
            pos = self._units(view, out, parts)
            if parts is not None and pos:
                assert self.passed is not None
                self.passed.append(Passed(self.produced, b"".join(parts), self._block_limit))
        finally:
            parts = None  # slices of the buffer: gone before it is released and resized
            view.release()
        del buffer[:pos]
        return out[0] if len(out) == 1 else b"".join(out)

    def _units(self, view: memoryview, out: list[bytes], parts: list[bytes | memoryview] | None) -> int:
        """Decode the whole units at the start of ``view`` into ``out`` (and, with ``parts``,
        collect them as the client gets them); returns where the first incomplete unit starts."""
        end = len(view)
        pos = 0
        group = 0  # start of the units not yet decoded
        blocks = 0
        verbatim = 0  # start of the units passed on unchanged, not yet in ``parts``
        while pos < end:
            state = self._state
            if state == _BLOCK:
                if end - pos < 3:
                    break
                header = view[pos] | view[pos + 1] << 8 | view[pos + 2] << 16
                kind, size = header >> 1 & 3, header >> 3
                if kind == 3 or (kind != 1 and size > MAX_BLOCK):
                    raise CompressionError("corrupt zstd data: bad block header")
                unit = 3 + (1 if kind == 1 else size)
                if end - pos < unit:
                    break
                pos += unit
                if header & 1:
                    self._state = _CHECKSUM if self._checksum else _FRAME
                    self._block_limit = 0
                    self._frames += 0 if self._checksum else 1
                blocks += 1
                if blocks == _BLOCKS_PER_CALL:
                    self._decode(view[group:pos], out)
                    group, blocks = pos, 0
                continue
            # Every other unit is dropped or rewritten for the client.
            if parts is not None and verbatim < pos:
                parts.append(view[verbatim:pos])
            verbatim = pos
            if state == _SKIP:
                pos += (step := min(self._skip, end - pos))
                self._skip -= step
                if not self._skip:
                    self._state = _FRAME
                    self._frames += 1
            elif state == _CHECKSUM:
                if end - pos < 4:
                    break
                pos += 4
                self._state = _FRAME
                self._frames += 1
            else:
                unit = self._frame_start(view, pos, parts)
                if not unit:
                    break
                pos += unit
            verbatim = pos
        if group < pos:
            self._decode(view[group:pos], out)
        if parts is not None and verbatim < pos:
            parts.append(view[verbatim:pos])
        return pos

    def _frame_start(self, view: memoryview, pos: int, parts: list[bytes | memoryview] | None) -> int:
        """A frame header or a skippable frame's at ``pos``: its length (0: not complete yet)."""
        end = len(view)
        if end - pos < 4:
            return 0
        magic = int.from_bytes(view[pos:pos + 4], "little")
        if magic & 0xFFFFFFF0 == _SKIPPABLE:
            if end - pos < 8:
                return 0
            self._skip = int.from_bytes(view[pos + 4:pos + 8], "little")
            if self._skip:
                self._state = _SKIP
            else:
                self._frames += 1
            return 8
        if magic != MAGIC:
            raise CompressionError(f"corrupt zstd data: bad frame magic {magic:#x}")
        if end - pos < 5:
            return 0
        descriptor = view[pos + 4]
        single_segment = descriptor >> 5 & 1
        fcs_size = (single_segment, 2, 4, 8)[descriptor >> 6]
        unit = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + fcs_size
        if end - pos < unit:
            return 0
        if single_segment:  # the window is the content size
            fcs = int.from_bytes(view[pos + unit - fcs_size:pos + unit], "little")
            header = frame_header(max(fcs + 256 if fcs_size == 2 else fcs, 1))
        else:
            header = MAGIC_BYTES + bytes((0, view[pos + 5]))
        if parts is not None:
            parts.append(header)
        self._checksum = bool(descriptor >> 2 & 1)
        self._block_limit = min(_window_size(header[5]), MAX_BLOCK)
        self._state = _BLOCK
        return unit

    def _decode(self, units: memoryview, out: list[bytes]) -> None:
        try:
            chunk = self._library.decompress(units)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"corrupt zstd data: {exc}") from exc
        self.produced += len(chunk)
        if self.max_output is not None and self.produced > self.max_output:
            raise SizeMismatch(f"zstd output exceeds the limit of {self.max_output} bytes")
        if chunk:
            out.append(chunk)

    def flush(self) -> bytes:
        if self._state != _FRAME or self._buffer or not self._frames:
            raise CompressionError("zstd stream is truncated")
        return b""


class ZstdRelay:
    """A verified NAR transfer turned into a zstd stream for a client (Nix decodes it).

    A source that sends zstd from NAR byte 0 is decoded by :meth:`decoder`, whose units are
    passed on as they are (see the module docstring); NAR bytes from any other source go as
    raw blocks, in the frame the last source left open or in a new one.  :meth:`forward` takes
    each verified chunk, in order, and returns what the client may now have: nothing beyond the
    NAR bytes verified so far (the transfer holds its last chunk back until the NarHash checks,
    so the client cannot finish the NAR before that).  :meth:`finish` ends the last frame.
    """

    def __init__(self) -> None:
        self._passed: deque[Passed] = deque()
        self._position = 0  # NAR bytes verified
        self._sent = 0  # NAR bytes the client can decode from what it was given
        self._held: list[tuple[int, bytes]] = []  # verified chunks (start, bytes) not yet sent
        self._block_limit = 0  # of the frame open in the client's stream (0: none)

    def decoder(self, max_output: int | None) -> ZstdDecoder:
        """The decoder for a source sending zstd from NAR byte 0 (its blocks get passed on)."""
        self._passed.clear()  # anything left was decoded but never verified: not sent
        return ZstdDecoder(max_output, self._passed)

    def forward(self, chunk: bytes) -> list[bytes | memoryview]:
        start = self._position
        self._position += len(chunk)
        out: list[bytes | memoryview] = []
        passed = self._passed
        # The decoder appends as it goes (a worker thread, ahead of verification): only take
        # what the verified position covers.
        while passed and passed[0].nar_end <= self._position:
            item = passed.popleft()
            if item.data:
                out.append(item.data)
            self._sent = max(self._sent, item.nar_end)
            self._block_limit = item.open_block_limit
        if self._sent >= self._position:
            self._held.clear()
            return out
        self._held.append((start, chunk))
        if passed:
            return out  # a passed unit still to come carries these bytes
        # Not passed on (a source that is not zstd, or that started past byte 0, or that went
        # on after the zstd one failed): raw blocks, in the frame left open or a new one.
        if not self._block_limit:
            out.append(frame_header(MAX_BLOCK))
            self._block_limit = MAX_BLOCK
        for held_start, held in self._held:
            if held_start + len(held) > self._sent:
                out.extend(raw_blocks(memoryview(held)[max(0, self._sent - held_start):], self._block_limit))
        self._held.clear()
        self._sent = self._position
        return out

    def finish(self) -> bytes:
        """The end of the stream, once the whole NAR went through :meth:`forward`."""
        if self._block_limit:
            self._block_limit = 0
            return END_BLOCK
        return b""
