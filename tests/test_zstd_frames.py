"""zstd taken apart at its units: exact decoding, and a source's blocks passed on to a client."""

from __future__ import annotations

import random

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from substituter.errors import CompressionError, SizeMismatch
from substituter.nix.zstd_frames import MAX_BLOCK, ZstdDecoder, ZstdRelay, window_descriptor


def sample(seed: int, size: int = 1 << 20) -> bytes:
    rng = random.Random(seed)
    parts: list[bytes] = []
    while sum(map(len, parts)) < size:
        parts.append(rng.randbytes(rng.randint(1, 40000)))
        parts.append(b"line %d of text " % rng.randint(0, 99) * rng.randint(1, 4000))
        parts.append(bytes(rng.randint(1, 60000)))
    return b"".join(parts)[:size]


DATA = sample(1)


def streamed(data: bytes, frames: int = 1, **kw: object) -> bytes:
    """``data`` compressed in ``frames`` frames, each written streaming (no content size)."""
    out = b""
    for f in range(frames):
        part = data[f * len(data) // frames:(f + 1) * len(data) // frames]
        obj = zstandard.ZstdCompressor(**kw).compressobj()  # type: ignore[arg-type]
        out += b"".join(obj.compress(part[i:i + 65536]) for i in range(0, len(part), 65536)) + obj.flush()
    return out


SKIPPABLE = (0x184D2A5E).to_bytes(4, "little") + (6).to_bytes(4, "little") + b"ignore"
VARIANTS = {
    "streaming, as Nix writes": streamed(DATA, level=3),
    "checksums, 3 frames": streamed(DATA, 3, level=1, write_checksum=True),
    "one shot (single segment, content size)": zstandard.ZstdCompressor(level=1).compress(DATA),
    "skippable frames around": SKIPPABLE + streamed(DATA, 2, level=1) + SKIPPABLE,
    "small window": streamed(
        DATA, compression_params=zstandard.ZstdCompressionParameters.from_level(1, window_log=10)
    ),
}


def pieces(blob: bytes, rng: random.Random, most: int = 70000) -> list[bytes]:
    out, i = [], 0
    while i < len(blob):
        n = rng.randint(1, most)
        out.append(blob[i:i + n])
        i += n
    return out


def library_decode(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(blob)


@pytest.mark.parametrize("name", VARIANTS)
def test_decodes_in_any_pieces(name: str) -> None:
    rng = random.Random(name)
    decoder = ZstdDecoder(len(DATA))
    out = b"".join(decoder.decode(p) for p in pieces(VARIANTS[name], rng))
    assert decoder.flush() == b""
    assert out == DATA


@pytest.mark.parametrize("name", VARIANTS)
def test_output_is_exact_after_every_call(name: str) -> None:
    """After each call, the output is the whole content of the input taken so far (the rest
    waits for its unit to complete): nothing lags inside the library, which is what a relay
    relies on to know which NAR bytes its client can decode."""
    blob = VARIANTS[name]
    decoder = ZstdDecoder()
    fed = total = 0
    for p in pieces(blob, random.Random(name), 20000):
        total += len(decoder.decode(p))
        fed += len(p)
        taken = fed - len(decoder._buffer)
        assert total == len(library_decode(blob[:taken]))


def relay_through(blob: bytes, cut: int, rng: random.Random, resplit: bool = False) -> bytes:
    """What a client gets when the zstd source dies after ``cut`` bytes and the rest of the NAR
    comes from a source that is not passed on (raw blocks).  ``resplit``: the decoder runs all
    the way ahead and the verified chunks are cut anywhere, not where its calls ended."""
    relay = ZstdRelay()
    decoder = relay.decoder(len(DATA))
    client: list[bytes | memoryview] = []
    decoded = [decoder.decode(p) for p in pieces(blob[:cut], rng)]
    if resplit:
        decoded = pieces(b"".join(decoded), rng, 50000)
    position = 0
    for chunk in decoded:
        if chunk:
            client += relay.forward(chunk)
            position += len(chunk)
    for i in range(position, len(DATA), 300000):
        client += relay.forward(DATA[i:min(i + 300000, len(DATA))])
    client.append(relay.finish())
    return b"".join(bytes(c) for c in client)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("where", [0.0, 0.001, 0.37, 0.5, 0.999, 1.0])
def test_relayed_stream_decodes_to_the_nar_wherever_the_source_stops(name: str, where: float) -> None:
    blob = VARIANTS[name]
    client = relay_through(blob, int(len(blob) * where), random.Random(name))
    assert library_decode(client) == DATA
    if where == 1.0:
        # Nothing failed: the source's blocks went through as they were (only headers rewritten,
        # skippable frames and checksums dropped).
        assert len(client) <= len(blob)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(VARIANTS["checksums, 3 frames"])), seed=st.integers(0, 9))
def test_relay_failover_at_any_byte(cut: int, seed: int) -> None:
    blob = VARIANTS["checksums, 3 frames"]
    assert library_decode(relay_through(blob, cut, random.Random(seed))) == DATA
    assert library_decode(relay_through(blob, cut, random.Random(seed), resplit=True)) == DATA


def test_nothing_is_forwarded_beyond_the_verified_position() -> None:
    blob = VARIANTS["streaming, as Nix writes"]
    relay = ZstdRelay()
    decoder = relay.decoder(None)
    decoded = decoder.decode(blob)  # decoded far ahead, as the decode worker runs ahead
    assert len(decoded) == len(DATA)
    # Verified only up to half: what the client has decodes to at most that.
    half = relay.forward(decoded[: len(decoded) // 2])
    got = zstandard.ZstdDecompressor().decompressobj().decompress(b"".join(bytes(c) for c in half))
    assert len(got) <= len(DATA) // 2
    rest = relay.forward(decoded[len(decoded) // 2:]) + [relay.finish()]
    assert library_decode(b"".join(bytes(c) for c in half + rest)) == DATA


def test_a_source_that_is_not_zstd_becomes_raw_blocks() -> None:
    relay = ZstdRelay()
    client = relay.forward(DATA[:1000]) + relay.forward(DATA[1000:]) + [relay.finish()]
    blob = b"".join(bytes(c) for c in client)
    assert library_decode(blob) == DATA
    assert len(blob) < len(DATA) + len(DATA) // MAX_BLOCK * 3 + 64


def test_empty_nar_stream() -> None:
    relay = ZstdRelay()
    assert relay.finish() == b""


@pytest.mark.parametrize(
    ("blob", "error"),
    [
        (b"not zstd at all", "bad frame magic"),
        (VARIANTS["streaming, as Nix writes"][:-5], "truncated"),
        (b"", "truncated"),
        # a block header of the reserved type 3
        (zstandard.ZstdCompressor().compress(b"x")[:6] + bytes((0b110, 0, 0)), "bad block header"),
    ],
)
def test_corrupt_or_truncated(blob: bytes, error: str) -> None:
    decoder = ZstdDecoder()
    with pytest.raises(CompressionError, match=error):
        decoder.decode(blob)
        decoder.flush()


def test_checksum_mismatch_is_caught() -> None:
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(DATA))
    blob[-1] ^= 1
    with pytest.raises(CompressionError, match="corrupt zstd data"):
        ZstdDecoder().decode(bytes(blob))


def test_output_limit() -> None:
    with pytest.raises(SizeMismatch, match="exceeds the limit of 1000"):
        ZstdDecoder(1000).decode(VARIANTS["streaming, as Nix writes"])


def test_window_descriptor_is_the_smallest_that_fits() -> None:
    assert window_descriptor(1) == 0  # 1 KiB, the smallest window
    assert window_descriptor(1024) == 0
    assert window_descriptor(1025) == 1  # 1 KiB + 1/8
    assert window_descriptor(128 * 1024) == 7 << 3
    assert window_descriptor((1 << 27) + 1) == (17 << 3) | 1
