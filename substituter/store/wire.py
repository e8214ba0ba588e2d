"""Nix's wire encoding, shared by the worker protocol and the export format.

Integers and booleans are unsigned 64-bit little-endian. A string is its length, its
bytes, then zero padding up to a multiple of 8. Lists and sets are a count followed by
the items (sets are sent sorted so the bytes are deterministic). A *frame* carries a slice
of a NAR inside the worker protocol: a length and the bytes, without padding; a zero
length ends the framed stream.

Encoding is pure (bytes in, bytes out); decoding reads from an ``asyncio.StreamReader``
and raises :class:`~substituter.errors.ProtocolError` naming what was wrong.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable

from substituter.errors import ProtocolError

__all__ = [
    "FRAME_END",
    "MAX_LIST_LENGTH",
    "MAX_STRING_LENGTH",
    "WireReader",
    "boolean",
    "byte_string",
    "frame",
    "string",
    "string_list",
    "string_set",
    "u64",
]

# Bounds checked before allocating: nothing the daemon legitimately sends comes close.
MAX_STRING_LENGTH = 64 * 1024 * 1024
MAX_LIST_LENGTH = 1024 * 1024

_U64 = struct.Struct("<Q")
_ZEROS = bytes(8)


def u64(value: int) -> bytes:
    """Encode a non-negative integer as u64 little-endian."""
    return _U64.pack(value)


def boolean(value: bool) -> bytes:
    return _U64.pack(1 if value else 0)


def _padding(length: int) -> int:
    return (8 - length % 8) % 8


def byte_string(data: bytes) -> bytes:
    """Encode raw bytes as a Nix string: length, bytes, zero padding."""
    return _U64.pack(len(data)) + data + _ZEROS[: _padding(len(data))]


def string(text: str) -> bytes:
    return byte_string(text.encode())


def string_list(items: Iterable[str]) -> bytes:
    """Encode strings in the given order (a Nix list)."""
    encoded = [string(item) for item in items]
    return _U64.pack(len(encoded)) + b"".join(encoded)


def string_set(items: Iterable[str]) -> bytes:
    """Encode strings sorted and deduplicated (a Nix set, e.g. of store paths)."""
    return string_list(sorted(set(items)))


FRAME_END = u64(0)


def frame(chunk: bytes | memoryview) -> bytes:
    """One frame of a framed stream. Never call with empty data: that is the end marker."""
    if not chunk:
        raise ValueError("an empty frame would end the framed stream")
    return _U64.pack(len(chunk)) + bytes(chunk)


class WireReader:
    """Decodes Nix wire values from a stream; ``peer`` names the other side in errors."""

    def __init__(self, stream: asyncio.StreamReader, peer: str) -> None:
        self._stream = stream
        self._peer = peer

    async def _exactly(self, n: int, what: str) -> bytes:
        try:
            return await self._stream.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(
                f"{self._peer} closed the connection while sending {what}"
                f" (got {len(exc.partial)} of {n} bytes)"
            ) from exc
        except OSError as exc:
            raise ProtocolError(f"reading {what} from {self._peer} failed: {exc}") from exc

    async def u64(self, what: str = "an integer") -> int:
        (value,) = _U64.unpack(await self._exactly(8, what))
        return int(value)

    async def boolean(self, what: str = "a boolean") -> bool:
        value = await self.u64(what)
        if value > 1:
            raise ProtocolError(f"{self._peer} sent {value} where a boolean ({what}) belongs")
        return value == 1

    async def byte_string(self, what: str = "a string") -> bytes:
        length = await self.u64(what)
        if length > MAX_STRING_LENGTH:
            raise ProtocolError(
                f"{self._peer} announced {what} of {length} bytes (limit {MAX_STRING_LENGTH})"
            )
        pad = _padding(length)
        data = await self._exactly(length + pad, what)
        if pad and data[length:] != _ZEROS[:pad]:
            raise ProtocolError(f"{self._peer} sent non-zero padding after {what}")
        return data[:length]

    async def string(self, what: str = "a string") -> str:
        # Messages may carry arbitrary bytes (file names); never fail on them.
        return (await self.byte_string(what)).decode(errors="replace")

    async def string_list(self, what: str = "a list of strings") -> list[str]:
        count = await self.u64(what)
        if count > MAX_LIST_LENGTH:
            raise ProtocolError(
                f"{self._peer} announced {what} of {count} items (limit {MAX_LIST_LENGTH})"
            )
        return [await self.string(what) for _ in range(count)]
