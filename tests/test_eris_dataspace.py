"""ERIS blocks over a dataspace: providers answer interest, consumers check every answer.

In process, the dataspace, each provider and the consumer are separate actors; over a relay, a
real syndicate-server sits between a provider in its own OS process and the consumer here.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from syndicate import actor, turn
from syndicate import patterns as P
from syndicate.dataspace import during

from fetchers.eris.blockstore import DirectoryBlockStore, FallbackBlockStore, decode_from
from fetchers.eris.codec import ReadCapability, block_urn, encode
from fetchers.eris.dataspace_store import DataspaceBlockStore, chunk_interest, serve_blocks
from fetchers.eris.fetcher import ErisFetcher, ErisOptions
from fetchers.eris.index import save_entries
from substituter.dataspace.barrier import barrier
from substituter.dataspace.connect import connect
from substituter.dataspace.dataspace import Dataspace
from substituter.errors import ConfigError, HashMismatch, NotAvailable
from substituter.plugin import DataspaceLink, FetcherContext, Offer
from substituter.protocol import ErisChunk
from tests.conftest import Nix
from tests.helpers import make_nar
from tests.syndicate_server import ClientProcess, SyndicateServer, syndicate_server  # noqa: F401
from tests.test_eris_fetcher import published

ROOT = Path(__file__).resolve().parent.parent
#: Short: most tests wait this long only for blocks nobody has (never asserted on as a time).
MISSING_TIMEOUT = 0.3
#: Long enough that a provider that has the block always answers first.
PRESENT_TIMEOUT = 20.0


class Actors:
    """Actors on the test's own loop; every actor started here is stopped by ``stop``."""

    def __init__(self) -> None:
        self.system = actor.System(loop=asyncio.get_running_loop())
        self.roots: list[Any] = []

    def start(self, boot: Callable[[], Any], name: str) -> Any:
        """Run ``boot`` in a fresh actor; its root facet."""

        def wrapped() -> None:
            turn.prevent_inert_check()
            self.roots.append(turn.active_facet())
            boot()

        actor.Actor(wrapped, system=self.system, name=name)
        return self.roots[-1]

    def run(self, facet: Any, action: Callable[[], None]) -> None:
        turn.external(facet, action)

    async def stop(self) -> None:
        for root in self.roots:
            turn.external(root, lambda: turn.stop_actor())
        for _ in range(10):
            await asyncio.sleep(0)


class Space:
    """An embedded dataspace in its own actor, and a consumer actor linked to it."""

    def __init__(self, actors: Actors) -> None:
        self.actors = actors
        self.ds: Any = None

        def boot_dataspace() -> None:
            self.ds = turn.ref(Dataspace())

        actors.start(boot_dataspace, "dataspace")
        self.link = DataspaceLink(self.ds, actors.start(lambda: None, "consumer"))

    def provider(self, store: Any, name: str = "provider") -> Any:
        """A block provider actor serving ``store``; its root facet."""
        return self.actors.start(lambda: serve_blocks(self.ds, store), name)

    def rogue(self, ref: bytes, content: bytes) -> Any:
        """An actor that asserts ``content`` as block ``ref`` whether or not anyone asks."""
        return self.actors.start(
            lambda: turn.publish(self.ds, ErisChunk(len(content), ref, content)), "rogue")

    def store(self, timeout: float = PRESENT_TIMEOUT) -> DataspaceBlockStore:
        return DataspaceBlockStore(self.link, timeout=timeout)


@pytest.fixture
async def actors() -> AsyncIterator[Actors]:
    group = Actors()
    try:
        yield group
    finally:
        await group.stop()


@pytest.fixture
async def space(actors: Actors) -> Space:
    return Space(actors)


def encoded(tmp_path: Path, content: bytes, block_size: int = 1024) -> tuple[ReadCapability, DirectoryBlockStore, list[bytes]]:
    """``content`` encoded into a fresh block directory: (capability, store, block refs)."""
    cap, blocks = encode(content, block_size)
    store = DirectoryBlockStore(tmp_path / f"blocks-{os.urandom(4).hex()}")
    for ref, block in blocks.items():
        store.put_sync(ref, block)
    return cap, store, sorted(blocks)


async def decoded(cap: ReadCapability, store: Any, size: int) -> bytes:
    return b"".join([piece async for piece in decode_from(cap, store, max_size=size)])


def tampered(block: bytes) -> bytes:
    return bytes([block[0] ^ 1]) + block[1:]


async def interest_count(space: Space, ref: bytes) -> int:
    """How many consumers currently observe block ``ref`` (read through a fresh observer)."""
    seen: list[Any] = []
    done = asyncio.get_running_loop().create_future()

    def look() -> None:
        facet = turn.active_facet()

        @during(space.ds, P.rec("Observe", chunk_interest(ref), P.CAPTURE))
        def on_observer(observer: Any) -> Any:
            seen.append(observer)
            return lambda: seen.remove(observer)

        def answer() -> None:
            done.set_result(len(seen))
            turn.stop(facet)

        # Once the barrier is back, the dataspace has told our observer every current match.
        barrier(space.ds, answer)

    space.actors.run(space.link.facet, lambda: turn.facet(look))
    return int(await done)


# --- in one process, separate actors ------------------------------------------------------


async def test_blocks_flow_from_a_provider_actor_and_interest_is_retracted(tmp_path: Path, space: Space) -> None:
    content = os.urandom(50_000)
    cap, local, _ = encoded(tmp_path, content)
    space.provider(local)
    store = space.store()
    assert await store.get(cap.root_ref) == local.get_sync(cap.root_ref)
    assert await decoded(cap, store, len(content)) == content
    # No interest lingers once get has returned.
    assert await interest_count(space, cap.root_ref) == 0


async def test_a_missing_block_times_out_as_not_available(tmp_path: Path, space: Space) -> None:
    content = os.urandom(5000)
    cap, local, refs = encoded(tmp_path, content)
    missing = next(ref for ref in refs if ref != cap.root_ref)
    local.path_of(missing).unlink()
    space.provider(local)
    store = space.store(timeout=MISSING_TIMEOUT)
    assert await store.get(missing) is None
    with pytest.raises(NotAvailable, match=f"{block_urn(missing)} is not in the dataspace"):
        await decoded(cap, store, len(content))
    assert await interest_count(space, missing) == 0


async def test_a_tampered_block_is_rejected(tmp_path: Path, space: Space) -> None:
    content = os.urandom(3000)
    cap, local, _ = encoded(tmp_path, content)
    root = local.get_sync(cap.root_ref)
    assert root is not None
    space.rogue(cap.root_ref, tampered(root))
    with pytest.raises(HashMismatch, match="damaged"):
        await space.store(timeout=MISSING_TIMEOUT).get(cap.root_ref)


async def test_a_bad_provider_does_not_hide_a_good_one(tmp_path: Path, space: Space) -> None:
    content = os.urandom(40_000)
    cap, local, refs = encoded(tmp_path, content)
    # Every block is asserted damaged by one actor; a second actor serves the real ones.
    for ref in refs:
        block = local.get_sync(ref)
        assert block is not None
        space.rogue(ref, tampered(block))
    space.provider(local, "honest")
    assert await decoded(cap, space.store(), len(content)) == content


async def test_a_provider_does_not_spread_a_damaged_local_block(
    tmp_path: Path, space: Space, caplog: pytest.LogCaptureFixture
) -> None:
    content = os.urandom(3000)
    cap, local, refs = encoded(tmp_path, content)
    path = local.path_of(cap.root_ref)
    path.write_bytes(tampered(path.read_bytes()))
    space.provider(local)
    assert await space.store(timeout=MISSING_TIMEOUT).get(cap.root_ref) is None
    assert f"not serving block {block_urn(cap.root_ref)}" in caplog.text
    # The provider is still up and serves its intact blocks.
    intact = next(ref for ref in refs if ref != cap.root_ref)
    assert await space.store().get(intact) == local.get_sync(intact)


async def test_two_providers_hold_different_halves(tmp_path: Path, space: Space) -> None:
    content = os.urandom(60_000)
    cap, blocks = encode(content, 1024)
    halves = [DirectoryBlockStore(tmp_path / "a"), DirectoryBlockStore(tmp_path / "b")]
    for i, (ref, block) in enumerate(sorted(blocks.items())):
        halves[i % 2].put_sync(ref, block)
    for i, half in enumerate(halves):
        space.provider(half, f"provider-{i}")
    assert await decoded(cap, space.store(), len(content)) == content


async def test_the_dataspace_stands_in_for_a_local_store_missing_blocks(tmp_path: Path, space: Space) -> None:
    content = os.urandom(30_000)
    cap, full, refs = encoded(tmp_path, content)
    partial = DirectoryBlockStore(tmp_path / "partial")
    for ref in refs[::2]:
        block = full.get_sync(ref)
        assert block is not None
        partial.put_sync(ref, block)
    space.provider(full)
    store = FallbackBlockStore([partial, space.store()])
    assert await decoded(cap, store, len(content)) == content


# --- the eris fetcher with `blocks = ["dataspace:"]` -------------------------------------


async def test_fetcher_reads_blocks_from_its_hosts_dataspace(tmp_path: Path, space: Space) -> None:
    nar = make_nar(tmp_path, 80_000, "over-the-dataspace")
    hash_part = "4" * 32
    blocks = tmp_path / "published"
    entry = await published(tmp_path, nar, hash_part, blocks)
    index = tmp_path / "index.jsonl"
    save_entries(index, [entry])
    space.provider(DirectoryBlockStore(blocks))
    fetcher = ErisFetcher("eris", ErisOptions(index=str(index), blocks=["dataspace:"]),
                          FetcherContext(dataspace=space.link))
    await fetcher.start()
    try:
        offer = await fetcher.locate(hash_part)
        assert isinstance(offer, Offer)
        assert b"".join([piece async for piece in fetcher.open(offer)]) == nar
    finally:
        await fetcher.stop()


async def test_fetcher_without_a_dataspace_refuses_dataspace_blocks(tmp_path: Path) -> None:
    index = tmp_path / "index.jsonl"
    save_entries(index, [])
    fetcher = ErisFetcher("eris", ErisOptions(index=str(index), blocks=["dataspace:"]))
    with pytest.raises(ConfigError, match="needs the host's dataspace"):
        await fetcher.start()
    await fetcher.stop()


# --- over a real syndicate-server, the provider in its own process ------------------------

PROVIDER_SCRIPT = r"""
import asyncio, sys
from pathlib import Path
from syndicate import actor
from substituter.dataspace.barrier import barrier
from substituter.dataspace.connect import connect
from fetchers.eris.blockstore import DirectoryBlockStore
from fetchers.eris.dataspace_store import serve_blocks

addr, cap, blocks = sys.argv[1:]

def boot():
    @connect(addr, cap, retry_delay=0.1, on_refused=lambda reason: print("refused", reason, flush=True))
    def on_dataspace(ds):
        serve_blocks(ds, DirectoryBlockStore(Path(blocks)))
        print("connected", flush=True)

actor.System(loop=asyncio.new_event_loop()).run(boot, configure_logging=False)
"""


async def start_provider(addr: str, cap: str, blocks: Path) -> ClientProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROVIDER_SCRIPT, addr, cap, str(blocks),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env, cwd=ROOT,
    )
    client = ClientProcess(process)
    await client.wait_for("connected")
    return client


async def connected_link(actors: Actors, addr: str, cap: str) -> DataspaceLink:
    link = DataspaceLink()
    ready = asyncio.get_running_loop().create_future()

    def boot() -> None:
        @connect(addr, cap, retry_delay=0.1)
        def on_dataspace(ds: Any) -> None:
            link.ref, link.facet = ds, turn.active_facet()
            if not ready.done():
                ready.set_result(None)

    actors.start(boot, "consumer")
    await asyncio.wait_for(ready, 20)
    return link


@pytest.mark.syndicate_server
@pytest.mark.nix
async def test_a_real_nar_through_syndicate_server_from_another_process(
    nix: Nix, syndicate_server: SyndicateServer, actors: Actors, tmp_path: Path,  # noqa: F811
) -> None:
    (path,) = nix.build(
        'derivation { name = "eris-ds"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' args = [ "-c" "mkdir -p $out/d; head -c 150000 /dev/urandom > $out/d/blob;'
        ' echo hello > $out/hello; ln -s hello $out/link" ]; PATH = "/usr/bin:/bin";'
        f' stamp = "{os.urandom(8).hex()}"; }}'
    )
    nar = nix.run("nix-store", "--dump", path)
    cap, local, _ = encoded(tmp_path, nar)
    provider = await start_provider(syndicate_server.unix_addr, syndicate_server.cap, local.root)
    try:
        link = await connected_link(actors, syndicate_server.tcp_addr, syndicate_server.cap)
        got = await decoded(cap, DataspaceBlockStore(link, timeout=PRESENT_TIMEOUT), len(nar))
        assert hashlib.sha256(got).digest() == hashlib.sha256(nar).digest()
        assert got == nar
        # A block the provider lacks is not there, over the relay too.
        absent = hashlib.blake2b(b"absent", digest_size=32).digest()
        assert await DataspaceBlockStore(link, timeout=MISSING_TIMEOUT).get(absent) is None
    finally:
        await provider.kill()
