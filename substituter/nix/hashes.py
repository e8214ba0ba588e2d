"""Hashes as Nix writes them (`sha256:<nix32>`, hex, base64, SRI): md5, sha1, sha256, sha512."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from ..errors import Base32Error, HashError
from . import base32

__all__ = ["ALGORITHMS", "Hash", "HashSink", "compress_hash"]

# Digest size in bytes of every algorithm Nix knows.
ALGORITHMS: dict[str, int] = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def _check_algorithm(algorithm: str) -> int:
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        known = ", ".join(ALGORITHMS)
        raise HashError(f"unknown hash algorithm {algorithm!r} (known: {known})") from None


def _base64_length(nbytes: int) -> int:
    return 4 * ((nbytes + 2) // 3)


def _decode_base64(text: str, nbytes: int, original: str) -> bytes:
    try:
        digest = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise HashError(f"invalid base64 in hash {original!r}: {exc}") from exc
    if len(digest) != nbytes:
        raise HashError(f"hash {original!r} decodes to {len(digest)} bytes, expected {nbytes}")
    return digest


def _decode_digest(algorithm: str, text: str, original: str, *, sri: bool) -> bytes:
    """Decode the digest part; the encoding is told apart by its length, as Nix does."""
    nbytes = _check_algorithm(algorithm)
    if sri:
        return _decode_base64(text, nbytes, original)
    if len(text) == 2 * nbytes:
        try:
            return bytes.fromhex(text)
        except ValueError as exc:
            raise HashError(f"invalid hexadecimal in hash {original!r}") from exc
    if len(text) == base32.encoded_length(nbytes):
        try:
            return base32.decode(text)
        except Base32Error as exc:
            raise HashError(f"invalid nix32 in hash {original!r}: {exc}") from exc
    if len(text) == _base64_length(nbytes):
        return _decode_base64(text, nbytes, original)
    raise HashError(
        f"hash {original!r} has a digest of {len(text)} characters, which is no encoding "
        f"of a {algorithm} hash"
    )


@dataclass(frozen=True)
class Hash:
    """A digest and its algorithm. ``str()`` gives Nix's narinfo form ``sha256:<nix32>``."""

    algorithm: str
    digest: bytes

    def __post_init__(self) -> None:
        nbytes = _check_algorithm(self.algorithm)
        if len(self.digest) != nbytes:
            raise HashError(f"a {self.algorithm} digest has {nbytes} bytes, got {len(self.digest)}")

    @classmethod
    def parse(cls, text: str, default_algorithm: str | None = None) -> Hash:
        """Parse any form Nix writes.

        ``algo:<nix32|hex|base64>`` and SRI ``algo-<base64>`` always; a bare digest only
        when ``default_algorithm`` says which algorithm it is.
        """
        if ":" in text:
            algorithm, _, digest_text = text.partition(":")
            return cls(algorithm, _decode_digest(algorithm, digest_text, text, sri=False))
        algorithm, dash, digest_text = text.partition("-")
        if dash and algorithm in ALGORITHMS:
            return cls(algorithm, _decode_digest(algorithm, digest_text, text, sri=True))
        if default_algorithm is None:
            raise HashError(
                f"hash {text!r} names no algorithm (expected 'sha256:…' or SRI 'sha256-…')"
            )
        return cls(default_algorithm, _decode_digest(default_algorithm, text, text, sri=False))

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = "sha256") -> Hash:
        """The hash of a (small) byte string."""
        _check_algorithm(algorithm)
        return cls(algorithm, hashlib.new(algorithm, data).digest())

    def nix32(self) -> str:
        return base32.encode(self.digest)

    def hex(self) -> str:
        return self.digest.hex()

    def base64(self) -> str:
        return base64.b64encode(self.digest).decode("ascii")

    def sri(self) -> str:
        return f"{self.algorithm}-{self.base64()}"

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.nix32()}"


def compress_hash(digest: bytes, size: int) -> bytes:
    """Fold ``digest`` into ``size`` bytes by XOR, as Nix does for store path hash parts."""
    if size <= 0:
        raise ValueError(f"compressed size must be positive, got {size}")
    out = bytearray(size)
    for index, byte in enumerate(digest):
        out[index % size] ^= byte
    return bytes(out)


class HashSink:
    """Hashes a stream incrementally and counts its bytes (for NarHash/NarSize checks)."""

    def __init__(self, algorithm: str = "sha256") -> None:
        _check_algorithm(algorithm)
        self.algorithm = algorithm
        self._hasher = hashlib.new(algorithm)
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hasher.update(data)
        self.size += len(data)

    def finish(self) -> Hash:
        """The hash of everything fed so far (the sink stays usable)."""
        return Hash(self.algorithm, self._hasher.digest())
