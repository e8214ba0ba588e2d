"""Nix's ed25519 signing keys and narinfo signatures.

Keys are written ``name:base64``: a secret key holds 64 bytes (seed followed by the public
key), a public key 32 bytes. A signature is ``name:base64(64 bytes)`` over the narinfo
fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import KeyFormatError
from .narinfo import NarInfo

__all__ = ["PublicKey", "SecretKey", "sign_narinfo", "verify_narinfo"]

_SEED_SIZE = 32
_PUBLIC_SIZE = 32
_SIGNATURE_SIZE = 64


def _split_key(text: str, what: str, size: int) -> tuple[str, bytes]:
    name, colon, encoded = text.strip().partition(":")
    if not colon or not name:
        raise KeyFormatError(f"{what} is not 'name:base64' (got {len(text)} characters)")
    try:
        material = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise KeyFormatError(f"{what} {name!r} is not valid base64: {exc}") from exc
    if len(material) != size:
        raise KeyFormatError(f"{what} {name!r} has {len(material)} bytes, expected {size}")
    return name, material


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key, as listed in ``trusted-public-keys``."""

    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, material = _split_key(text, "public key", _PUBLIC_SIZE)
        return cls(name, material)

    def verify(self, message: bytes, sig: str) -> bool:
        """Whether ``sig`` (``name:base64``) is this key's valid signature of ``message``."""
        name, colon, encoded = sig.partition(":")
        if not colon or name != self.name:
            return False
        try:
            signature = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            return False
        if len(signature) != _SIGNATURE_SIZE:
            return False
        key = self._verifier
        if key is None:
            return False
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    @cached_property
    def _verifier(self) -> Ed25519PublicKey | None:
        """The key object, built once per key (None: bytes that are no ed25519 point)."""
        try:
            return Ed25519PublicKey.from_public_bytes(self.key)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode('ascii')}"


@dataclass(frozen=True)
class SecretKey:
    """A signing key as ``nix-store --generate-binary-cache-key`` writes it."""

    name: str
    key: bytes  # seed (32 bytes) followed by the public key (32 bytes)

    def __repr__(self) -> str:
        return f"SecretKey(name={self.name!r})"  # never print the key material

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, material = _split_key(text, "secret key", _SEED_SIZE + _PUBLIC_SIZE)
        derived = _private(material).public_key().public_bytes_raw()
        if derived != material[_SEED_SIZE:]:
            raise KeyFormatError(f"secret key {name!r}: its public half does not match its seed")
        return cls(name, material)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SecretKey:
        try:
            with open(path, encoding="ascii") as file:
                text = file.read()
        except UnicodeDecodeError as exc:
            raise KeyFormatError(f"secret key file {os.fspath(path)!r} is not ASCII text") from exc
        return cls.parse(text)

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        private = Ed25519PrivateKey.generate()
        return cls(name, private.private_bytes_raw() + private.public_key().public_bytes_raw())

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, self.key[_SEED_SIZE:])

    def sign(self, message: bytes) -> str:
        signature = _private(self.key).sign(message)
        return f"{self.name}:{base64.b64encode(signature).decode('ascii')}"

    def to_text(self) -> str:
        """The ``name:base64`` form Nix reads (not ``__str__``: never printed by accident)."""
        return f"{self.name}:{base64.b64encode(self.key).decode('ascii')}"


def _private(material: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(material[:_SEED_SIZE])


def sign_narinfo(info: NarInfo, key: SecretKey) -> NarInfo:
    """A copy of ``info`` carrying ``key``'s signature (added once; others kept)."""
    signature = key.sign(info.fingerprint())
    if signature in info.sigs:
        return info.with_sigs(info.sigs)
    return info.with_sigs([*info.sigs, signature])


def verify_narinfo(info: NarInfo, keys: Iterable[PublicKey]) -> PublicKey | None:
    """The first of ``keys`` with a valid signature on ``info``, or None."""
    fingerprint = info.fingerprint()
    for key in keys:
        if any(key.verify(fingerprint, sig) for sig in info.sigs):
            return key
    return None
