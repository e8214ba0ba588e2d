from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from substituter.errors import Base32Error, FormatError
from substituter.nix import base32
from tests.conftest import Nix


@given(st.binary(max_size=100))
def test_round_trip(data: bytes) -> None:
    text = base32.encode(data)
    assert len(text) == base32.encoded_length(len(data))
    assert set(text) <= set(base32.ALPHABET)
    assert base32.decode(text) == data


@pytest.mark.parametrize(
    ("nbytes", "nchars"), [(0, 0), (1, 2), (16, 26), (20, 32), (32, 52), (64, 103)]
)
def test_encoded_length(nbytes: int, nchars: int) -> None:
    assert base32.encoded_length(nbytes) == nchars
    assert base32.decoded_length(nchars) == nbytes


def test_known_vector() -> None:
    # sha256("a"), as `nix hash to-base32 sha256:<hex>` prints it (Nix 2.8).
    digest = bytes.fromhex("ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb")
    assert base32.encode(digest) == "1fs8xspqaxw0p5r4wz0lz3pqd9sdvhirmcriqbxcmg8vr89835ya"


@pytest.mark.nix
@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256", "sha512"])
def test_matches_real_nix(nix: Nix, algorithm: str) -> None:
    digests = [hashlib.new(algorithm, bytes([i]) * i).digest() for i in range(8)]
    digests.append(b"\xff" * len(digests[0]))
    digests.append(b"\x00" * len(digests[0]))
    printed = nix.text(
        "nix", "hash", "to-base32", "--type", algorithm, *(d.hex() for d in digests)
    ).split()
    assert printed == [base32.encode(d) for d in digests]
    assert [base32.decode(text) for text in printed] == digests


@pytest.mark.nix
def test_nix_hash_to_base32_agrees(nix: Nix) -> None:
    digest = hashlib.sha1(b"substituter").digest()
    printed = nix.text("nix-hash", "--type", "sha1", "--to-base32", digest.hex())
    assert printed == base32.encode(digest)


def test_rejects_bad_character() -> None:
    text = "1fs8xspqaxw0p5r4wz0lz3pqd9sdvhirmcriqbxcmg8vr89835ye"  # 'e' is not in the alphabet
    with pytest.raises(Base32Error, match=r"invalid nix32 character 'e' at position 51"):
        base32.decode(text)


@pytest.mark.parametrize("length", [1, 3, 6, 51, 54])
def test_rejects_impossible_length(length: int) -> None:
    with pytest.raises(Base32Error, match=f"{length} characters is not the length"):
        base32.decode("0" * length)


def test_rejects_bits_beyond_size() -> None:
    # 52 characters hold 260 bits; a sha256 is 256, so the first digit must be < 16.
    valid = "0" + "1" * 51
    assert len(base32.decode(valid)) == 32
    with pytest.raises(Base32Error, match="bits set beyond its 32-byte size"):
        base32.decode("g" + "1" * 51)


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        base32.decode("!!")
    assert issubclass(Base32Error, FormatError)
