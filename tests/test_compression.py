"""Compression codecs: round trips, real Nix-made cache files, corrupt input and bombs."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from substituter.errors import CompressionError, SizeMismatch
from substituter.nix.compression import SUPPORTED, compressor, decompressor, normalize
from substituter.nix.nar import NarParser

from .conftest import Nix

TEXT = b"".join(b"line %d\n" % i for i in range(50_000))
SAMPLE = os.urandom(200_000) + TEXT


def encode(name: str, data: bytes, level: int | None = None) -> bytes:
    enc = compressor(name, 5 if name == "br" and level is None else level)  # br 11 is slow
    return b"".join(enc.compress(data[i : i + 65536]) for i in range(0, len(data), 65536)) + (enc.flush())


def decode(name: str, blob: bytes, chunk: int = 4096, max_output: int | None = None) -> bytes:
    dec = decompressor(name, max_output)
    parts = [dec.decode(blob[i : i + chunk]) for i in range(0, len(blob), chunk)]
    return b"".join(parts) + dec.flush()


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("chunk", [1, 4096, 1 << 30])
def test_round_trip(name: str, chunk: int) -> None:
    data = SAMPLE if chunk > 1 else TEXT[:3000]
    blob = encode(name, data)
    assert decode(name, blob, chunk) == data
    if name != "none":
        assert len(blob) < len(data)


@pytest.mark.parametrize("name", ["xz", "zstd", "bzip2"])
def test_concatenated_streams_decode_as_one(name: str) -> None:
    blob = encode(name, b"first ") + encode(name, b"second")
    assert decode(name, blob, 3) == b"first second"


def test_normalize() -> None:
    assert normalize(None) == "bzip2"
    assert normalize("") == "bzip2"
    assert normalize("zstd") == "zstd"
    with pytest.raises(CompressionError, match="'lz4'; supported: none, xz, zstd, bzip2, br"):
        normalize("lz4")
    with pytest.raises(CompressionError, match="supported"):
        decompressor("gzip")
    with pytest.raises(CompressionError, match="supported"):
        compressor("XZ")


@pytest.mark.parametrize("name", ["xz", "zstd", "bzip2", "br"])
def test_corrupt_input_is_a_compression_error(name: str) -> None:
    blob = bytearray(encode(name, TEXT))  # compressed blocks throughout, no stored ones
    for i in range(len(blob) // 3, len(blob) // 3 + 64):
        blob[i] ^= 0x55
    with pytest.raises(CompressionError, match=name):
        decode(name, bytes(blob))


@pytest.mark.parametrize("name", ["xz", "zstd", "bzip2", "br"])
def test_truncated_input_is_a_compression_error(name: str) -> None:
    blob = encode(name, SAMPLE)
    with pytest.raises(CompressionError, match=f"{name} stream is truncated"):
        decode(name, blob[:-5])


@pytest.mark.parametrize("name", ["xz", "zstd", "bzip2", "br"])
def test_garbage_is_a_compression_error(name: str) -> None:
    with pytest.raises(CompressionError):
        decode(name, b"this is not compressed data at all, not even a little" * 10)


def test_zstd_frames_with_checksum_and_skippable_frames() -> None:
    import zstandard

    frame = zstandard.ZstdCompressor(write_checksum=True).compress(SAMPLE)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    assert decode("zstd", skippable + frame + frame, 1000) == SAMPLE * 2


@pytest.mark.parametrize("name", SUPPORTED)
def test_output_over_max_output_is_a_size_mismatch(name: str) -> None:
    blob = encode(name, SAMPLE)
    assert decode(name, blob, max_output=len(SAMPLE)) == SAMPLE
    with pytest.raises(SizeMismatch, match="exceeds the limit"):
        decode(name, blob, max_output=len(SAMPLE) - 1)


def zeros_compressed(name: str, total: int) -> Iterator[bytes]:
    """``total`` zero bytes, compressed streaming (never held in memory)."""
    enc = compressor(name, 1 if name != "br" else 5)
    block = bytes(1 << 20)
    for _ in range(total // len(block)):
        out = enc.compress(block)
        if out:
            yield out
    yield enc.flush()


@pytest.mark.parametrize(
    ("name", "total"), [("zstd", 1 << 30), ("xz", 64 << 20), ("bzip2", 64 << 20), ("br", 64 << 20)]
)
def test_bomb_stops_at_max_output_without_big_allocations(name: str, total: int) -> None:
    bomb = b"".join(zeros_compressed(name, total))
    assert len(bomb) < total // 100
    limit = 4 << 20
    dec = decompressor(name, max_output=limit)
    tracemalloc.start()
    try:
        with pytest.raises(SizeMismatch, match=f"{name} output exceeds the limit of {limit}"):
            dec.decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit + (8 << 20)


# -- real Nix: files made by `nix copy --to file://…?compression=X` ------------------------


def narinfo_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


@pytest.fixture
def data_path(nix: Nix) -> str:
    """A fresh store path with a few MiB of random and text data."""
    stamp = os.urandom(8).hex()
    script = (
        "mkdir -p $out/d; head -c 3000000 /dev/urandom > $out/random; "
        "seq 1 300000 > $out/d/text; ln -s d/text $out/link"
    )
    expr = (
        f'derivation {{ name = "compression-data"; system = builtins.currentSystem; '
        f'builder = "/bin/sh"; args = [ "-c" "{script}" ]; PATH = "/usr/bin:/bin"; '
        f'stamp = "{stamp}"; }}'
    )
    return nix.build(expr)[0]


@pytest.mark.nix
@pytest.mark.parametrize("name", ["xz", "zstd", "bzip2", "br", "none"])
def test_nix_made_files_decode_to_the_signed_nar(nix: Nix, tmp_path: Path, data_path: str, name: str) -> None:
    cache = tmp_path / "cache"
    nix.run("nix", "copy", "--to", f"file://{cache}?compression={name}", data_path)
    hash_part = Path(data_path).name.split("-")[0]
    info = narinfo_fields((cache / f"{hash_part}.narinfo").read_text())
    assert normalize(info.get("Compression")) == name
    blob = (cache / info["URL"]).read_bytes()
    nar_size = int(info["NarSize"])
    nar = decode(name, blob, 65536, max_output=nar_size)
    parser = NarParser()
    parser.feed(nar)
    result = parser.finish()
    assert result.nar_size == nar_size
    expected_hex = nix.text("nix-hash", "--type", "sha256", "--to-base16", info["NarHash"].split(":")[1])
    assert hashlib.sha256(nar).hexdigest() == expected_hex == result.nar_hash.hex()
