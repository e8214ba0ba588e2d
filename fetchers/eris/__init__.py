"""ERIS: content split into encrypted, content-addressed blocks, named by a read capability.

`codec` is the pure encoder and strict decoder (ERIS v1.0.0, https://purl.org/eris).
"""

from __future__ import annotations

from fetchers.eris.codec import (
    BLOCK_SIZES,
    NULL_SECRET,
    BlockSink,
    CapabilityError,
    Encoder,
    ErisError,
    GetBlock,
    ReadCapability,
    block_urn,
    decode,
    decode_bytes,
    encode,
    encode_to,
    parse_block_urn,
)

__all__ = [
    "BLOCK_SIZES",
    "BlockSink",
    "GetBlock",
    "NULL_SECRET",
    "CapabilityError",
    "Encoder",
    "ErisError",
    "ReadCapability",
    "block_urn",
    "decode",
    "decode_bytes",
    "encode",
    "encode_to",
    "parse_block_urn",
]
