"""Small builders shared by unit tests: NARs made by our dumper, signed narinfos, function sources."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from substituter.nix.compression import compressor
from substituter.nix.hashes import Hash
from substituter.nix.nar import dump
from substituter.nix.narinfo import NarInfo
from substituter.nix.signing import SecretKey, sign_narinfo
from substituter.plugin import Offer

KEY = SecretKey.generate("test-key-1")
OTHER_KEY = SecretKey.generate("other-key-1")


def make_nar(tmp: Path, size: int = 300_000, name: str = "tree") -> bytes:
    root = tmp / name
    (root / "sub").mkdir(parents=True)
    (root / "data").write_bytes(os.urandom(size))
    (root / "sub" / "text").write_text("hello\n" * 100)
    (root / "link").symlink_to("data")
    return b"".join(dump(root))


def make_info(nar: bytes, hash_part: str = "0" * 32, name: str = "tree", key: SecretKey | None = KEY,
              references: list[str] | None = None) -> NarInfo:
    info = NarInfo(
        store_path=f"/nix/store/{hash_part}-{name}",
        url=f"nar/{hash_part}.nar",
        nar_hash=Hash.of_bytes(nar),
        nar_size=len(nar),
        compression="none",
        references=references or [],
    )
    return sign_narinfo(info, key) if key is not None else info


def compress(data: bytes, name: str) -> bytes:
    c = compressor(name)
    return c.compress(data) + c.flush()


def serve_bytes(data: bytes, *, chunk: int = 65536, fail_after: int | None = None,
                ranged: bool = True):
    """An opener over in-memory bytes; optionally raising a transient error after N bytes."""
    from substituter.errors import TransientFetchError

    async def open_(offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        pos = offset if ranged else 0
        sent = 0
        while pos < len(data):
            piece = data[pos:pos + chunk]
            if fail_after is not None and sent + len(piece) > fail_after:
                if fail_after - sent > 0:
                    yield piece[:fail_after - sent]
                raise TransientFetchError("connection reset (test)")
            yield piece
            sent += len(piece)
            pos += len(piece)

    return open_
