"""ERIS codec throughput: encode and decode 64 MiB (or --mib) at 1 KiB and 32 KiB blocks.

Content generation is timed with the encoder (ChaCha20 keystream, a few percent).
Decoding goes through the async, verifying `decode` with an in-memory block store, so the
number is the codec's own cost (hashing, ChaCha20, tree walk, task scheduling), not I/O.
Run: .venv/bin/python bench/eris_bench.py [--mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fetchers.eris import ReadCapability, decode, encode_to

CHUNK = 1 << 20


def content(size: int) -> Iterator[bytes]:
    """Distinct pseudo-random bytes (a ChaCha20 keystream), so no two blocks coincide."""
    keystream = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None).encryptor()
    zeros = bytes(CHUNK)
    for offset in range(0, size, CHUNK):
        yield keystream.update(zeros[: min(CHUNK, size - offset)])


def bench_encode(size: int, block_size: int) -> tuple[float, ReadCapability, dict[bytes, bytes]]:
    blocks: dict[bytes, bytes] = {}
    start = time.perf_counter()
    cap = encode_to(content(size), blocks.__setitem__, block_size)
    return time.perf_counter() - start, cap, blocks


async def bench_decode(cap: ReadCapability, blocks: dict[bytes, bytes], size: int) -> float:
    async def get_block(ref: bytes) -> bytes | None:
        return blocks.get(ref)

    start = time.perf_counter()
    total = 0
    async for piece in decode(cap, get_block, max_size=size):
        total += len(piece)
    elapsed = time.perf_counter() - start
    assert total == size, f"decoded {total} bytes, expected {size}"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="content size in MiB (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="best of this many runs (default 3)")
    args = parser.parse_args()
    size = args.mib * 2**20
    print(f"ERIS codec, {args.mib} MiB of content, one core, best of {args.runs} runs")
    for block_size in (1024, 32768):
        encode_s, decode_s = float("inf"), float("inf")
        for _ in range(args.runs):  # the best run is the one least disturbed by the machine
            seconds, cap, blocks = bench_encode(size, block_size)
            encode_s = min(encode_s, seconds)
            decode_s = min(decode_s, asyncio.run(bench_decode(cap, blocks, size)))
        print(
            f"  {block_size // 1024:>2} KiB blocks (level {cap.level}):"
            f"  encode {size / encode_s / 1e6:7.1f} MB/s"
            f"  decode {size / decode_s / 1e6:7.1f} MB/s"
        )
        del blocks


if __name__ == "__main__":
    main()
