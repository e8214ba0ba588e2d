from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from substituter.errors import HashError
from substituter.nix import base32
from substituter.nix.hashes import ALGORITHMS, Hash, HashSink, compress_hash
from tests.conftest import Nix

SHA256_A = bytes.fromhex("ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb")


def every_form(algorithm: str, digest: bytes) -> list[str]:
    b64 = base64.b64encode(digest).decode()
    return [
        f"{algorithm}:{base32.encode(digest)}",
        f"{algorithm}:{digest.hex()}",
        f"{algorithm}:{b64}",
        f"{algorithm}-{b64}",
    ]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_parse_every_prefixed_form(algorithm: str) -> None:
    digest = hashlib.new(algorithm, b"substituter").digest()
    for text in every_form(algorithm, digest):
        assert Hash.parse(text) == Hash(algorithm, digest), text


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_parse_bare_forms_with_default(algorithm: str) -> None:
    digest = hashlib.new(algorithm, b"bare").digest()
    for text in (base32.encode(digest), digest.hex(), base64.b64encode(digest).decode()):
        assert Hash.parse(text, default_algorithm=algorithm) == Hash(algorithm, digest)


def test_renderings() -> None:
    h = Hash("sha256", SHA256_A)
    assert str(h) == "sha256:1fs8xspqaxw0p5r4wz0lz3pqd9sdvhirmcriqbxcmg8vr89835ya"
    assert h.nix32() == "1fs8xspqaxw0p5r4wz0lz3pqd9sdvhirmcriqbxcmg8vr89835ya"
    assert h.hex() == SHA256_A.hex()
    assert h.base64() == "ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs="
    assert h.sri() == "sha256-ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs="


@given(st.sampled_from(list(ALGORITHMS)), st.data())
def test_render_parse_round_trip(algorithm: str, data: st.DataObject) -> None:
    digest = data.draw(st.binary(min_size=ALGORITHMS[algorithm], max_size=ALGORITHMS[algorithm]))
    h = Hash(algorithm, digest)
    for text in (str(h), h.sri(), f"{algorithm}:{h.hex()}", f"{algorithm}:{h.base64()}"):
        assert Hash.parse(text) == h


@pytest.mark.nix
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_cross_check_with_real_nix(nix: Nix, algorithm: str) -> None:
    digest = hashlib.new(algorithm, b"cross-check").digest()
    for text in every_form(algorithm, digest):
        sri = nix.text("nix", "hash", "to-sri", text)
        hex_form = nix.text("nix", "hash", "to-base16", text)
        nix32 = nix.text("nix", "hash", "to-base32", text)
        b64 = nix.text("nix", "hash", "to-base64", text)
        h = Hash.parse(text)
        assert h.sri() == sri
        assert h.hex() == hex_form
        assert h.nix32() == nix32
        assert h.base64() == b64
        assert Hash.parse(sri) == Hash.parse(f"{algorithm}:{nix32}") == h


@pytest.mark.parametrize(
    ("text", "default", "message"),
    [
        ("sha256:" + "0" * 63, None, "63 characters, which is no encoding of a sha256"),
        ("sha3:" + "0" * 64, None, "unknown hash algorithm 'sha3'"),
        ("sha256:" + "z" * 64, None, "invalid hexadecimal"),
        ("sha256:" + "e" * 52, None, "invalid nix32"),
        ("sha256:" + "!" * 44, None, "invalid base64"),
        ("sha256-" + "0" * 64, None, "invalid base64|decodes to"),
        ("1fs8xspqaxw0p5r4wz0lz3pqd9sdvhirmcriqbxcmg8vr89835ya", None, "names no algorithm"),
        ("abc", "sha256", "3 characters"),
        ("", None, "names no algorithm"),
    ],
)
def test_parse_rejects(text: str, default: str | None, message: str) -> None:
    with pytest.raises(HashError, match=message):
        Hash.parse(text, default_algorithm=default)


def test_wrong_digest_size_rejected() -> None:
    with pytest.raises(HashError, match="a sha256 digest has 32 bytes, got 20"):
        Hash("sha256", b"\0" * 20)


def test_compress_hash() -> None:
    digest = bytes(range(32))
    folded = compress_hash(digest, 20)
    assert len(folded) == 20
    assert folded[0] == 0 ^ 20 and folded[11] == 11 ^ 31 and folded[12] == 12
    assert compress_hash(digest, 32) == digest


def test_hash_sink_streams() -> None:
    sink = HashSink()
    chunks = [b"a" * 1000, b"", b"bc" * 7]
    for chunk in chunks:
        sink.update(chunk)
    assert sink.size == 1014
    assert sink.finish() == Hash("sha256", hashlib.sha256(b"".join(chunks)).digest())
    assert HashSink("sha512").finish() == Hash.of_bytes(b"", "sha512")
