"""The ERIS codec against the official v1.0.0 vectors, generated large vectors, and attacks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import random
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

import fetchers.eris
from fetchers.eris import (
    NULL_SECRET,
    CapabilityError,
    Encoder,
    ErisError,
    ReadCapability,
    block_urn,
    decode,
    decode_bytes,
    encode,
    encode_to,
    parse_block_urn,
)
from substituter import errors

# The vectors live beside the repository (../shared), never copied into it.
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "eris-test-vectors"


def unb32(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8))


def load_vectors(kind: str) -> list[dict[str, Any]]:
    paths = sorted(VECTORS.glob(f"eris-test-vector-{kind}-*.json"))
    return [json.loads(path.read_text()) for path in paths]


def vector_blocks(vector: dict[str, Any]) -> dict[bytes, bytes]:
    return {unb32(ref): unb32(block) for ref, block in vector["blocks"].items()}


POSITIVE = load_vectors("positive")
NEGATIVE = load_vectors("negative")


def test_all_official_vectors_are_present() -> None:
    assert [v["id"] for v in POSITIVE] == list(range(13))
    assert [v["id"] for v in NEGATIVE] == list(range(13, 25))


def getter(blocks: Mapping[bytes, bytes]) -> Any:
    async def get_block(ref: bytes) -> bytes | None:
        await asyncio.sleep(0)  # really suspend, so fetches overlap
        return blocks.get(ref)

    return get_block


async def decode_all(
    cap: ReadCapability,
    blocks: Mapping[bytes, bytes],
    max_size: int | None = None,
    concurrency: int = 16,
) -> bytes:
    pieces = [
        piece
        async for piece in decode(cap, getter(blocks), max_size=max_size, concurrency=concurrency)
    ]
    return b"".join(pieces)


# --- official positive vectors ------------------------------------------------------------


@pytest.mark.parametrize("vector", POSITIVE, ids=lambda v: f"{v['id']:02}-{v['name']}")
async def test_positive_vector(vector: dict[str, Any]) -> None:
    content = unb32(vector["content"])
    blocks = vector_blocks(vector)
    cap = ReadCapability.parse(vector["urn"])
    expected = vector["read-capability"]
    assert cap.block_size == expected["block-size"]
    assert cap.level == expected["level"]
    assert cap.root_ref == unb32(expected["root-reference"])
    assert cap.root_key == unb32(expected["root-key"])
    assert cap.urn() == vector["urn"]
    assert ReadCapability.parse(cap.to_bytes()) == cap

    assert decode_bytes(cap, blocks, max_size=len(content)) == content
    assert await decode_all(cap, blocks, max_size=len(content), concurrency=3) == content

    encoded_cap, encoded_blocks = encode(
        content, vector["block-size"], unb32(vector["convergence-secret"])
    )
    assert encoded_cap.urn() == vector["urn"]
    assert encoded_blocks == blocks


# --- official negative vectors: each rejected for the reason it describes -------------------

NEGATIVE_REASONS: dict[int, tuple[type[Exception], str]] = {
    13: (errors.NotAvailable, r"block H77AGSYK\w+ \(level 0\) is missing"),  # no blocks
    14: (errors.HashMismatch, r"does not match its reference"),  # single invalid block
    15: (errors.NotAvailable, r"is missing"),  # one of several blocks missing
    16: (errors.HashMismatch, r"does not match its reference"),  # one corrupted block
    17: (errors.HashMismatch, r"at level 1 does not hash to its key"),  # level increased
    18: (errors.HashMismatch, r"at level 1 does not hash to its key"),  # root key changed
    19: (ErisError, r"last leaf \w+ is not padded"),  # level-0 key changed: padding garbled
    20: (ErisError, r"wrong length 1024, expected 32768"),  # block size increased
    21: (ErisError, r"wrong length 32768, expected 1024"),  # block size decreased
    22: (ErisError, r"is not padded"),  # no padding
    23: (ErisError, r"is not padded"),  # invalid padding
    24: (ErisError, r"non-zero bytes after its 2 reference-key pairs"),  # junk in a node
}


@pytest.mark.parametrize("vector", NEGATIVE, ids=lambda v: f"{v['id']:02}-{v['name'].strip()}")
async def test_negative_vector(vector: dict[str, Any]) -> None:
    error, message = NEGATIVE_REASONS[vector["id"]]
    cap = ReadCapability.parse(vector["urn"])  # the capabilities themselves are well formed
    blocks = vector_blocks(vector)
    with pytest.raises(error, match=message):
        decode_bytes(cap, blocks)
    with pytest.raises(error, match=message):
        await decode_all(cap, blocks)


# --- generated large vectors (README table) -------------------------------------------------


def generated_content(name: str, size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """ChaCha20 keystream keyed by BLAKE2b-256(name), zero nonce, counter 0, streamed."""
    key = hashlib.blake2b(name.encode(), digest_size=32).digest()
    keystream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    zeros = bytes(chunk)
    while size:
        n = min(size, chunk)
        yield keystream.update(zeros[:n])
        size -= n


LARGE_100MIB = (
    "100MiB (block size 1KiB)",
    100 * 2**20,
    1024,
    "urn:eris:BIC6F5EKY2PMXS2VNOKPD3AJGKTQBD3EXSCSLZIENXAXBM7PCTH"
    "2TCMF5OKJWAN36N4DFO6JPFZBR3MS7ECOGDYDERIJJ4N5KAQSZS67YY",
)
LARGE_1GIB = (
    "1GiB (block size 32KiB)",
    2**30,
    32768,
    "urn:eris:B4BL4DKSEOPGMYS2CU2OFNYCH4BGQT774GXKGURLFO5FDXAQQPJ"
    "GJ35AZR3PEK6CVCV74FVTAXHRSWLUUNYYA46ZPOPDOV2M5NVLBETWVI",
)


async def test_large_vector_100mib_encodes_and_decodes_streaming() -> None:
    name, size, block_size, urn = LARGE_100MIB
    blocks: dict[bytes, bytes] = {}
    cap = encode_to(generated_content(name, size), blocks.__setitem__, block_size)
    assert cap.urn() == urn
    assert cap.level == 5  # 102401 leaves need five levels of 16-way nodes

    expected = hashlib.sha256()
    for chunk in generated_content(name, size):
        expected.update(chunk)
    decoded, length = hashlib.sha256(), 0
    async for piece in decode(cap, getter(blocks), max_size=size):
        decoded.update(piece)
        length += len(piece)
    assert length == size
    assert decoded.digest() == expected.digest()


@pytest.mark.slow
def test_large_vector_1gib_encodes_streaming() -> None:
    name, size, block_size, urn = LARGE_1GIB
    count = 0

    def count_block(ref: bytes, block: bytes) -> None:
        nonlocal count
        count += 1

    cap = encode_to(generated_content(name, size), count_block, block_size)
    assert cap.urn() == urn
    assert count == 32769 + 65 + 1  # leaves (with the padding leaf), level-1 nodes, root


# --- edge lengths, round trips ----------------------------------------------------------------


def expected_level(size: int, block_size: int) -> int:
    leaves, arity, level = size // block_size + 1, block_size // 64, 0
    while arity**level < leaves:
        level += 1
    return level


def edge_lengths(block_size: int) -> list[int]:
    arity = block_size // 64
    lengths = {0, 1, block_size - 1}
    for blocks in (1, 2, arity - 1, arity, arity + 1):
        base = blocks * block_size
        lengths |= {base - 1, base, base + 1}
    return sorted(lengths)


@pytest.mark.parametrize(
    ("block_size", "size"),
    [(bs, n) for bs in (1024, 32768) for n in edge_lengths(bs)],
)
async def test_edge_lengths_round_trip(block_size: int, size: int) -> None:
    content = random.Random(size).randbytes(size)
    cap, blocks = encode(content, block_size)
    assert cap.level == expected_level(size, block_size)
    assert decode_bytes(cap, blocks, max_size=size) == content
    assert await decode_all(cap, blocks, max_size=size, concurrency=4) == content


@settings(deadline=None, max_examples=60)
@given(
    content=st.binary(max_size=40_000),
    cuts=st.lists(st.integers(min_value=0, max_value=40_000), max_size=6),
    secret=st.binary(min_size=32, max_size=32),
)
def test_round_trip_any_content_any_chunking(
    content: bytes, cuts: list[int], secret: bytes
) -> None:
    whole_cap, whole_blocks = encode(content, 1024, secret)
    bounds = [0, *sorted(c for c in cuts if c <= len(content)), len(content)]
    pieces = [content[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    fed_blocks: dict[bytes, bytes] = {}
    encoder = Encoder(1024, fed_blocks.__setitem__, secret)
    for piece in pieces:
        encoder.feed(piece)
    assert encoder.finish() == whole_cap
    assert fed_blocks == whole_blocks
    assert decode_bytes(whole_cap, whole_blocks, max_size=len(content)) == content
    assert asyncio.run(decode_all(whole_cap, whole_blocks, concurrency=2)) == content


def test_encode_accepts_a_binary_file_and_chunks() -> None:
    content = random.Random(7).randbytes(5000)
    cap, blocks = encode(content, 1024)
    assert encode(io.BytesIO(content), 1024) == (cap, blocks)
    assert encode([content[:3], content[3:4000], b"", content[4000:]], 1024) == (cap, blocks)


def test_convergence_secret_changes_every_block() -> None:
    content = b"same content" * 200
    cap_null, blocks_null = encode(content, 1024)
    cap_other, blocks_other = encode(content, 1024, b"\x01" * 32)
    assert cap_null != cap_other
    assert not set(blocks_null) & set(blocks_other)
    assert decode_bytes(cap_other, blocks_other) == content


# --- tampering, missing blocks, malformed capabilities --------------------------------------


def multi_level() -> tuple[bytes, ReadCapability, dict[bytes, bytes]]:
    content = random.Random(1).randbytes(20 * 1024)  # 21 leaves: a level-2 tree
    cap, blocks = encode(content, 1024)
    assert cap.level == 2
    return content, cap, blocks


async def test_tampered_block_is_rejected_naming_it() -> None:
    content, cap, blocks = multi_level()
    ref = next(r for r in blocks if r != cap.root_ref)
    tampered = bytearray(blocks[ref])
    tampered[100] ^= 1
    blocks[ref] = bytes(tampered)
    name = base64.b32encode(ref).decode().rstrip("=")
    with pytest.raises(errors.HashMismatch, match=f"block {name} does not match its reference"):
        decode_bytes(cap, blocks)
    with pytest.raises(errors.HashMismatch, match=name):
        await decode_all(cap, blocks)


async def test_missing_block_is_rejected_naming_it() -> None:
    content, cap, blocks = multi_level()
    ref = list(blocks)[5]
    del blocks[ref]
    name = base64.b32encode(ref).decode().rstrip("=")
    with pytest.raises(errors.NotAvailable, match=f"block {name} .* is missing"):
        decode_bytes(cap, blocks)
    with pytest.raises(errors.NotAvailable, match=name):
        await decode_all(cap, blocks)


async def test_get_block_may_raise_not_available_itself() -> None:
    content, cap, blocks = multi_level()

    async def unavailable(ref: bytes) -> bytes:
        raise errors.NotAvailable("store is offline")

    with pytest.raises(errors.NotAvailable, match="store is offline"):
        async for _ in decode(cap, unavailable, max_size=None):
            pass


URN = POSITIVE[5]["urn"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (URN[:-1], r"105 base32 characters, expected 106"),
        (URN + "A", r"107 base32 characters, expected 106"),
        (URN.lower(), r"not upper-case unpadded base32"),
        (URN + "======", r"112 base32 characters"),
        (URN[:-1] + "N", r"trailing bits"),  # 'N' sets the unused low bits of the last char
        ("urn:erisx:" + URN[9:], r"does not start with 'urn:eris:'"),
        (URN.replace("urn:eris:", "URN:ERIS:"), r"does not start with"),
        ("urn:eris:" + "CA" + URN[11:], r"block-size code 0x10"),
        (unb32(URN[9:])[:65], r"65 bytes, expected 66"),
        (unb32(URN[9:]) + b"\0", r"67 bytes, expected 66"),
        (b"", r"0 bytes, expected 66"),
    ],
    ids=[
        "truncated-urn",
        "long-urn",
        "lower-case",
        "padded",
        "trailing-bits",
        "wrong-nid",
        "upper-case-prefix",
        "bad-block-size",
        "truncated-bytes",
        "long-bytes",
        "empty-bytes",
    ],
)
def test_malformed_capability_is_rejected(bad: str | bytes, message: str) -> None:
    with pytest.raises(CapabilityError, match=message):
        ReadCapability.parse(bad)


def test_capability_round_trips_and_validates_fields() -> None:
    cap = ReadCapability.parse(URN)
    assert str(cap) == URN
    assert ReadCapability.parse(cap.to_bytes()) == cap
    assert len(cap.to_bytes()) == 66 and cap.to_bytes()[:2] == b"\x0a\x02"
    with pytest.raises(CapabilityError, match="block size 4096"):
        ReadCapability(4096, 0, bytes(32), bytes(32))
    with pytest.raises(CapabilityError, match="root key has 31 bytes"):
        ReadCapability(1024, 0, bytes(32), bytes(31))
    with pytest.raises(CapabilityError, match="level 256"):
        ReadCapability(1024, 256, bytes(32), bytes(32))


def test_block_urn_round_trip() -> None:
    ref = hashlib.blake2b(b"x", digest_size=32).digest()
    urn = block_urn(ref)
    assert urn.startswith("urn:blake2b:") and len(urn) == len("urn:blake2b:") + 52
    assert parse_block_urn(urn) == ref
    with pytest.raises(CapabilityError, match="51 base32 characters"):
        parse_block_urn(urn[:-1])
    with pytest.raises(CapabilityError, match="does not start with"):
        parse_block_urn("urn:sha256:" + urn[12:])


# --- the size bound --------------------------------------------------------------------------


async def test_level_too_deep_for_max_size_is_refused_before_fetching() -> None:
    content, cap, blocks = multi_level()  # level 2 at 1 KiB: at least 16 KiB of content
    fetched: list[bytes] = []

    async def get_block(ref: bytes) -> bytes | None:
        fetched.append(ref)
        return blocks.get(ref)

    with pytest.raises(errors.SizeMismatch, match="level 2 .* at least 16384 bytes"):
        async for _ in decode(cap, get_block, max_size=16383):
            pass
    assert fetched == []
    with pytest.raises(errors.SizeMismatch):
        decode_bytes(cap, blocks, max_size=16383)


def test_impossibly_deep_capability_is_refused_even_without_max_size() -> None:
    deep = ReadCapability(1024, 16, bytes(32), bytes(32))  # at least 16**15 KiB: > 2**64
    with pytest.raises(ErisError, match="more than any content"):
        decode_bytes(deep, {})
    deepest = ReadCapability(1024, 14, bytes(32), bytes(32))  # 16**13 KiB = 2**62 bytes: fits
    with pytest.raises(errors.NotAvailable):
        decode_bytes(deepest, {})


async def test_content_beyond_max_size_is_refused_before_its_leaf_is_fetched() -> None:
    content = random.Random(2).randbytes(3000)  # leaves 0 and 1 full, leaf 2 partial
    cap, blocks = encode(content, 1024)
    got: list[bytes] = []
    fetched: list[bytes] = []

    async def get_block(ref: bytes) -> bytes | None:
        fetched.append(ref)
        return blocks.get(ref)

    with pytest.raises(errors.SizeMismatch, match="starts leaf 2, so the content has at least"):
        async for piece in decode(cap, get_block, max_size=2047):
            got.append(piece)
    assert got == [] and fetched == [cap.root_ref]


async def test_never_yields_more_than_max_size() -> None:
    content = random.Random(3).randbytes(3000)
    cap, blocks = encode(content, 1024)
    got = bytearray()
    with pytest.raises(errors.SizeMismatch, match="brings the content to 3000 bytes"):
        async for piece in decode(cap, getter(blocks), max_size=2999, concurrency=1):
            got += piece
    assert got == content[:2048]
    assert await decode_all(cap, blocks, max_size=3000) == content


# --- non-canonical trees, built by hand ------------------------------------------------------


def make_node(pairs: list[tuple[bytes, bytes]], level: int) -> tuple[bytes, bytes, bytes]:
    """An internal node at `level` over (ref, key) pairs: returns (ref, key, block)."""
    plain = b"".join(ref + key for ref, key in pairs).ljust(1024, b"\0")
    key = hashlib.blake2b(plain, digest_size=32).digest()
    nonce = b"\0" * 4 + bytes((level,)) + bytes(11)
    block = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(plain)
    return hashlib.blake2b(block, digest_size=32).digest(), key, block


def decode_node(cap: ReadCapability, blocks: Mapping[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """The (ref, key) pairs of a level-1 root, decrypted by hand."""
    nonce = b"\0" * 4 + bytes((cap.level,)) + bytes(11)
    cipher = Cipher(algorithms.ChaCha20(cap.root_key, nonce), mode=None)
    plain = cipher.encryptor().update(blocks[cap.root_ref])
    return [(plain[i : i + 32], plain[i + 32 : i + 64]) for i in range(0, 128, 64)]


async def test_root_with_a_single_child_is_rejected() -> None:
    cap, blocks = encode(b"hello", 1024)
    ref, key, block = make_node([(cap.root_ref, cap.root_key)], 1)
    blocks[ref] = block
    deeper = ReadCapability(1024, 1, ref, key)
    with pytest.raises(ErisError, match="holds a single reference"):
        decode_bytes(deeper, blocks)
    with pytest.raises(ErisError, match="holds a single reference"):
        await decode_all(deeper, blocks)


async def test_partly_full_node_before_the_last_is_rejected() -> None:
    # Three one-block contents encode as a full leaf plus a padding leaf: borrow the full ones.
    blocks: dict[bytes, bytes] = {}
    pairs: list[tuple[bytes, bytes]] = []
    for i in range(3):
        leaf_cap, leaf_blocks = encode(bytes([i]) * 1024, 1024)
        blocks.update(leaf_blocks)
        pairs.append(decode_node(leaf_cap, leaf_blocks)[0])
    # The walk fails at the left node, before the right edge's missing padding matters.
    left = make_node(pairs[:1], 1)  # only one of 16 children, yet not the last node
    right = make_node(pairs[1:], 1)
    for ref, _, block in (left, right):
        blocks[ref] = block
    root_ref, root_key, root_block = make_node([left[:2], right[:2]], 2)
    blocks[root_ref] = root_block
    cap = ReadCapability(1024, 2, root_ref, root_key)
    with pytest.raises(ErisError, match="holds 1 of 16 references but is not the last"):
        decode_bytes(cap, blocks)
    with pytest.raises(ErisError, match="holds 1 of 16 references but is not the last"):
        await decode_all(cap, blocks)


# --- concurrency and cancellation ------------------------------------------------------------


async def test_fetches_run_in_parallel_within_the_bound() -> None:
    content = random.Random(4).randbytes(300 * 1024)  # 301 leaves, level 3
    cap, blocks = encode(content, 1024)
    in_flight = peak = 0

    async def get_block(ref: bytes) -> bytes | None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(3):
            await asyncio.sleep(0)
        in_flight -= 1
        return blocks.get(ref)

    out = b"".join([p async for p in decode(cap, get_block, max_size=None, concurrency=8)])
    assert out == content
    assert 8 <= peak <= 8 + cap.level  # leaves, plus one internal node ahead per level


async def test_abandoning_the_stream_cancels_outstanding_fetches() -> None:
    content = random.Random(5).randbytes(100 * 1024)
    cap, blocks = encode(content, 1024)
    started = finished = 0
    never = asyncio.Event()

    async def get_block(ref: bytes) -> bytes | None:
        nonlocal started, finished
        started += 1
        try:
            if started > 4:  # root, two level-1 nodes, the first leaf: then stall
                await never.wait()  # a block store that stalls
            return blocks.get(ref)
        finally:
            finished += 1

    stream = decode(cap, get_block, max_size=None, concurrency=8)
    assert isinstance(stream, AsyncIterator)
    first = await anext(stream)
    assert first == content[:1024]
    await stream.aclose()
    for _ in range(3):
        await asyncio.sleep(0)
    assert started > 4 and finished == started


# --- API misuse and the public surface -----------------------------------------------------


def test_encoder_misuse_is_reported() -> None:
    with pytest.raises(ValueError, match="block size must be one of"):
        Encoder(4096, lambda ref, block: None)
    with pytest.raises(ValueError, match="convergence secret must be 32 bytes"):
        Encoder(1024, lambda ref, block: None, b"short")
    encoder = Encoder(1024, lambda ref, block: None)
    encoder.finish()
    with pytest.raises(ValueError, match="after finish"):
        encoder.feed(b"x")
    with pytest.raises(ValueError, match="twice"):
        encoder.finish()


async def test_decode_argument_checks() -> None:
    cap, blocks = encode(b"x", 1024)
    with pytest.raises(ValueError, match="concurrency"):
        await decode_all(cap, blocks, concurrency=0)
    with pytest.raises(ValueError, match="max_size"):
        decode_bytes(cap, blocks, max_size=-1)


def test_errors_fit_the_project_tree() -> None:
    assert issubclass(ErisError, errors.FormatError)
    assert issubclass(CapabilityError, ErisError)
    assert NULL_SECRET == bytes(32)


def test_public_names() -> None:
    assert sorted(fetchers.eris.__all__) == sorted(fetchers.eris.codec.__all__)
    for name in fetchers.eris.__all__:
        assert getattr(fetchers.eris, name) is getattr(fetchers.eris.codec, name)
