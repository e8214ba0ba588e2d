"""The substitution protocol: its Preserves schema (``substitution.prs``) and Python classes.

``from substituter.protocol import Want, Intent, Available, ...``; see :mod:`.types`. The
``.prs`` translator lives in :mod:`.schemac`. Nothing here knows Nix formats.
"""

from __future__ import annotations

from substituter.protocol.types import (
    RECORDS,
    SCHEMA_PATH,
    Available,
    ErisChunk,
    Failed,
    Fetcher,
    Intent,
    NarInfo,
    Realised,
    Transfer,
    Unavailable,
    Want,
    decode_any,
    record_pattern,
)

__all__ = [
    "Want",
    "Intent",
    "Fetcher",
    "Available",
    "NarInfo",
    "Unavailable",
    "Transfer",
    "Failed",
    "Realised",
    "ErisChunk",
    "RECORDS",
    "SCHEMA_PATH",
    "decode_any",
    "record_pattern",
]
