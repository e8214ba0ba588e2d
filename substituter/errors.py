"""Every exception substituter raises, in one tree.

    SubstituterError
    ├── FormatError (also ValueError)     malformed input in a Nix format
    │   ├── Base32Error                   nix-base32 text that does not decode strictly
    │   ├── HashError                     a hash string in none of the forms Nix writes
    │   ├── StorePathError                a store path or base name that breaks Nix's rules
    │   ├── NarInfoError                  a narinfo that does not parse (names the line)
    │   ├── NarError                      a NAR stream that breaks the grammar (names the rule)
    │   ├── KeyFormatError                a signing or public key that does not parse
    │   └── CompressionError              a compressed stream that does not decode
    ├── VerificationError                 bytes or metadata that do not match what was signed
    │   ├── HashMismatch                  NarHash / FileHash differs
    │   ├── SizeMismatch                  NarSize differs, or output exceeds the signed size
    │   └── UntrustedError                no valid signature from a trusted key
    ├── ConfigError                       bad configuration (names the key and how to fix it)
    ├── PluginError                       a fetcher plugin cannot be loaded or misbehaves
    ├── FetchError                        a source failed to deliver
    │   ├── NotAvailable                  the source does not have it (permanent for this source)
    │   └── TransientFetchError           worth retrying (5xx, reset, stall)
    ├── ProtocolError                     a peer spoke a protocol wrongly (dataspace, worker protocol)
    │   └── SchemaError                   a .prs protocol schema that does not translate (names the line)
    └── StoreError                        a Nix store refused or failed an operation

Callers catch at the level they need; every error says what was wrong in its message.
Foreign exceptions are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "SubstituterError",
    "FormatError",
    "Base32Error",
    "HashError",
    "StorePathError",
    "NarInfoError",
    "NarError",
    "KeyFormatError",
    "CompressionError",
    "VerificationError",
    "HashMismatch",
    "SizeMismatch",
    "UntrustedError",
    "ConfigError",
    "PluginError",
    "FetchError",
    "NotAvailable",
    "TransientFetchError",
    "ProtocolError",
    "SchemaError",
    "StoreError",
]


class SubstituterError(Exception):
    """Base of every error raised by substituter."""


class FormatError(SubstituterError, ValueError):
    """Input in a Nix format is malformed."""


class Base32Error(FormatError):
    pass


class HashError(FormatError):
    pass


class StorePathError(FormatError):
    pass


class NarInfoError(FormatError):
    """A narinfo does not parse. ``line`` is the 1-based line number, when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


class NarError(FormatError):
    """A NAR breaks the grammar. ``offset`` is the byte offset where it was detected."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(f"{message} (at byte {offset})" if offset is not None else message)


class KeyFormatError(FormatError):
    pass


class CompressionError(FormatError):
    pass


class VerificationError(SubstituterError):
    """Bytes or metadata do not match what was signed."""


class HashMismatch(VerificationError):
    pass


class SizeMismatch(VerificationError):
    pass


class UntrustedError(VerificationError):
    pass


class ConfigError(SubstituterError):
    pass


class PluginError(SubstituterError):
    pass


class FetchError(SubstituterError):
    pass


class NotAvailable(FetchError):
    pass


class TransientFetchError(FetchError):
    pass


class ProtocolError(SubstituterError):
    pass


class SchemaError(ProtocolError):
    """Preserves Schema source (.prs) that cannot be translated; names the line and definition."""


class StoreError(SubstituterError):
    pass
