"""ERIS codec throughput: encode and decode 64 MiB (or --mib) at 1 KiB and 32 KiB blocks.

Content generation is timed with the encoder (ChaCha20 keystream, a few percent).
Decoding goes through the async, verifying `decode` with an in-memory block store, so the
number is the codec's own cost (hashing, ChaCha20, tree walk, task scheduling), not I/O.
Then end to end: one NAR (--e2e-mib) substituted by the ERIS fetcher (blocks over N2R from
`eris serve`) and by the binary-cache fetcher (the raw NAR from a static HTTP server), each
through the core's verified transfer; printed as a ratio on the same data, same run. The ERIS
fetcher runs twice: with its HttpBlockStore (aiohttp, keep-alive) and, for comparison, with the
httpx block client it used before (`HttpxBlockStore` below, one streamed httpx request a block).
Last, block exchange over the embedded dataspace: a provider actor serving a block directory, a
DataspaceBlockStore decoding (--ds-mib); in one process, so it is the exchange's own cost.
Run: .venv/bin/python bench/eris_bench.py [--mib 64] [--e2e-mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from syndicate import actor, turn

from fetchers.binary_cache import BinaryCacheFetcher, BinaryCacheOptions
from fetchers.eris import ReadCapability, decode, encode_to
from fetchers.eris.blockstore import MAX_BLOCK, BlockStore, DirectoryBlockStore, decode_from, n2r_path
from fetchers.eris.cli import publish_nar
from fetchers.eris.dataspace_store import DataspaceBlockStore, serve_blocks
from fetchers.eris.fetcher import ErisFetcher, ErisOptions
from fetchers.eris.index import save_entries
from substituter.dataspace.dataspace import Dataspace
from substituter.nix.hashes import Hash
from substituter.nix.nar import dump
from substituter.nix.narinfo import NarInfo
from substituter.nix.signing import SecretKey, sign_narinfo
from substituter.plugin import DataspaceLink, Fetcher, Offer
from substituter.transfer import Source, verified_nar

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


# --- end to end: ERIS fetcher vs binary-cache fetcher -----------------------------------------

HASH_PART = "1" * 32


class HttpxBlockStore:
    """The N2R client as it was before HttpBlockStore moved to aiohttp (GET only, no retries)."""

    def __init__(self, url: str, timeout: float, max_connections: int) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections))

    def describe(self) -> str:
        return self.url + " (httpx)"

    async def get(self, ref: bytes) -> bytes | None:
        block = bytearray()
        async with self._client.stream("GET", self.url + n2r_path(ref)) as response:
            response.raise_for_status()
            async for chunk in response.aiter_raw():
                block += chunk
                assert len(block) <= MAX_BLOCK
        return bytes(block)

    async def put(self, ref: bytes, block: bytes) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        await self._client.aclose()


class HttpxErisFetcher(ErisFetcher):
    """The ERIS fetcher with the httpx block client: the "before" of the block-fetch figures."""

    def _open_block_stores(self) -> BlockStore:
        (url,) = self.options.blocks
        return HttpxBlockStore(url, self.options.timeout, self.options.concurrency)


def make_cache(root: Path, size: int) -> NarInfo:
    """A one-path binary cache (raw NAR) under ``root``; returns its signed narinfo."""
    tree = root / "tree"
    tree.mkdir(parents=True)
    with (tree / "data").open("wb") as file:
        for piece in content(size):
            file.write(piece)
    cache = root / "cache"
    (cache / "nar").mkdir(parents=True)
    nar_file = cache / "nar" / f"{HASH_PART}.nar"
    sha, nar_size = hashlib.sha256(), 0
    with nar_file.open("wb") as out:
        for chunk in dump(tree):
            out.write(chunk)
            sha.update(chunk)
            nar_size += len(chunk)
    info = NarInfo(store_path=f"/nix/store/{HASH_PART}-bench", url=f"nar/{HASH_PART}.nar",
                   nar_hash=Hash("sha256", sha.digest()), nar_size=nar_size, compression="none")
    info = sign_narinfo(info, SecretKey.generate("bench-1"))
    (cache / f"{HASH_PART}.narinfo").write_text(info.to_text())
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    return info


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(args: list[str], port: int) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server subprocess listening on loopback ``port``; wait until it accepts."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{args[:4]} did not start listening")


async def substitute(fetcher: Fetcher, info: NarInfo) -> float:
    """Seconds to locate and stream the verified NAR (the work the daemon does per path)."""
    begin = time.perf_counter()
    offer = await fetcher.locate(HASH_PART)
    assert isinstance(offer, Offer), offer
    total = 0
    async for chunk in verified_nar(info, [Source(fetcher.name, offer, fetcher.open)]):
        total += len(chunk)
    assert total == info.nar_size
    return time.perf_counter() - begin


async def bench_e2e(root: Path, info: NarInfo, eris_url: str, cache_url: str, runs: int) -> list[float]:
    """Best seconds for: binary-cache, ERIS (aiohttp block client), ERIS (httpx block client)."""
    eris_options = ErisOptions(index=str(root / "index.jsonl"), blocks=[eris_url])
    fetchers: list[Fetcher] = [
        BinaryCacheFetcher("binary-cache", BinaryCacheOptions(url=cache_url, http2=False)),
        ErisFetcher("eris", eris_options),
        HttpxErisFetcher("eris-httpx", eris_options),
    ]
    best = [float("inf")] * len(fetchers)
    for fetcher in fetchers:
        await fetcher.start()
    try:
        for _ in range(runs):  # interleaved, so a busy moment of the machine hits all alike
            for i, fetcher in enumerate(fetchers):
                best[i] = min(best[i], await substitute(fetcher, info))
    finally:
        for fetcher in fetchers:
            await fetcher.stop()
    return best


def end_to_end(mib: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = make_cache(root, mib * 2**20)
        entry = asyncio.run(publish_nar(info, root / "cache" / info.url, DirectoryBlockStore(root / "blocks")))
        save_entries(root / "index.jsonl", [entry])
        port = free_port()
        eris, eris_url = start([sys.executable, "-m", "fetchers.eris.cli", "serve", str(root / "blocks"),
                                "--read-only", "--listen", f"127.0.0.1:{port}"], port)
        port = free_port()
        static, cache_url = start([sys.executable, "-m", "http.server", "-b", "127.0.0.1",
                                   "-d", str(root / "cache"), str(port)], port)
        try:
            cache_s, eris_s, httpx_s = asyncio.run(bench_e2e(root, info, eris_url, cache_url, runs))
        finally:
            eris.terminate()
            static.terminate()
            eris.wait()
            static.wait()
    size = info.nar_size
    print(f"End to end, one {mib} MiB NAR over loopback, verified transfer, best of {runs} runs")
    for label, seconds in [
        ("binary-cache fetcher", cache_s),
        ("ERIS fetcher, 32 KiB blocks over N2R (aiohttp)", eris_s),
        ("same, httpx block client (before)", httpx_s),
    ]:
        print(f"  {label:<48} {seconds:6.2f} s ({size / seconds / 1e6:7.1f} MB/s)"
              f"  {seconds / cache_s:5.2f}x binary-cache")


# --- block exchange over the embedded dataspace -------------------------------------------


async def bench_dataspace(root: Path, cap: ReadCapability, size: int, runs: int) -> float:
    """Best seconds to decode ``cap`` from a provider actor through an embedded dataspace."""
    system = actor.System(loop=asyncio.get_running_loop())
    link = DataspaceLink()
    roots: list[object] = []

    def boot_space() -> None:
        turn.prevent_inert_check()
        roots.append(turn.active_facet())
        link.ref = turn.ref(Dataspace())

    def boot_provider() -> None:
        roots.append(turn.active_facet())
        serve_blocks(link.ref, DirectoryBlockStore(root / "blocks"))

    def boot_consumer() -> None:
        turn.prevent_inert_check()
        roots.append(turn.active_facet())
        link.facet = turn.active_facet()

    for boot in (boot_space, boot_provider, boot_consumer):
        actor.Actor(boot, system=system)
    store = DataspaceBlockStore(link, timeout=30)
    best = float("inf")
    try:
        for _ in range(runs):
            begin = time.perf_counter()
            total = 0
            async for piece in decode_from(cap, store, max_size=size):
                total += len(piece)
            best = min(best, time.perf_counter() - begin)
            assert total == size
    finally:
        for facet in roots:
            turn.external(facet, lambda: turn.stop_actor())
        await asyncio.sleep(0.01)
    return best


def over_dataspace(mib: int, runs: int) -> None:
    size = mib * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = DirectoryBlockStore(root / "blocks")
        cap = encode_to(content(size), store.put_sync, 32768)
        seconds = asyncio.run(bench_dataspace(root, cap, size, runs))
    print(f"Block exchange over the embedded dataspace, {mib} MiB, 32 KiB blocks, best of {runs} runs")
    print(f"  provider actor -> DataspaceBlockStore decode: {seconds:6.2f} s"
          f" ({size / seconds / 1e6:7.1f} MB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="content size in MiB (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--e2e-mib", type=int, default=64, help="NAR size for the end-to-end ratio")
    parser.add_argument("--ds-mib", type=int, default=32, help="content size over the dataspace")
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
    end_to_end(args.e2e_mib, args.runs)
    over_dataspace(args.ds_mib, args.runs)


if __name__ == "__main__":
    main()
