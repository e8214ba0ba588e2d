"""Nix's base32 ("nix32"): the encoding of store path hash parts and narinfo hashes.

It is not RFC 4648: the alphabet omits e, o, u and t, and the text is the little-endian
bit string of the bytes written most significant digit first.
"""

from __future__ import annotations

import base64
import re

from ..errors import Base32Error

__all__ = ["ALPHABET", "decode", "decoded_length", "encode", "encoded_length"]

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_DIGIT_VALUE = {char: value for value, char in enumerate(ALPHABET)}
_TO_BASE32 = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")
_FROM_RFC4648 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", ALPHABET)
_VALID = re.compile(f"[{ALPHABET}]*")


def encoded_length(nbytes: int) -> int:
    """Number of nix32 characters that encode ``nbytes`` bytes (ceil(8n / 5))."""
    if nbytes < 0:
        raise ValueError(f"byte count must not be negative, got {nbytes}")
    return (8 * nbytes + 4) // 5


def decoded_length(nchars: int) -> int:
    """Bytes encoded by ``nchars`` characters; Base32Error if no byte count has that length."""
    nbytes = nchars * 5 // 8
    if encoded_length(nbytes) != nchars:
        raise Base32Error(f"{nchars} characters is not the length of any nix32 encoding")
    return nbytes


def encode(data: bytes) -> str:
    """Encode bytes as nix32 text."""
    # The bytes are one little-endian integer, written in 5-bit digits, most significant first:
    # RFC 4648 base32 of that integer (big-endian, padded to whole 40-bit groups) gives the same
    # digits in another alphabet, with some leading zero digits to drop.
    ndigits = encoded_length(len(data))
    if not ndigits:
        return ""
    value = int.from_bytes(data, "little")
    digits = base64.b32encode(value.to_bytes((ndigits + 7) // 8 * 5, "big")).decode("ascii")
    return digits[len(digits) - ndigits:].translate(_FROM_RFC4648)


def decode(text: str) -> bytes:
    """Decode nix32 text strictly: known alphabet, a valid length, no bits beyond the size."""
    nbytes = decoded_length(len(text))
    if not _VALID.fullmatch(text):
        position, char = next((i, c) for i, c in enumerate(text) if c not in _DIGIT_VALUE)
        raise Base32Error(f"invalid nix32 character {char!r} at position {position} in {text!r}")
    # Same digits as Python's base 32 (0-9a-v), most significant first: int() does the rest.
    value = int(text.translate(_TO_BASE32), 32) if text else 0
    if value >> (8 * nbytes):
        raise Base32Error(f"nix32 text {text!r} has bits set beyond its {nbytes}-byte size")
    return value.to_bytes(nbytes, "little")
