"""ImportStore against real ``nix-store --store DIR --import`` into a chroot store."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from substituter.errors import HashMismatch, SizeMismatch, StoreError
from substituter.store.base import Store, nar_hash_digest
from substituter.store.daemon_client import DaemonStore
from substituter.store.import_backend import ImportStore
from tests.conftest import Nix
from tests.nixdaemon import DumpedPath, dump_closure, stream_file

pytestmark = [pytest.mark.nix]


@pytest.fixture
def closure(nix: Nix, tmp_path: Path, nix_keys: tuple[Path, Path, str]) -> list[DumpedPath]:
    top, _ = nix.closure("import-test", n_deps=2)
    return dump_closure(nix, top, tmp_path / "nars", key_file=nix_keys[0])


@pytest.fixture
def store(nix: Nix, tmp_path: Path) -> ImportStore:
    return ImportStore(tmp_path / "chroot", env=nix.env)


def valid_in(nix: Nix, root: str, paths: list[str]) -> set[str]:
    """What ``nix-store --check-validity`` itself says, independent of ImportStore."""
    out = nix.text("nix-store", "--store", root, "--check-validity", "--print-invalid", *paths)
    return set(paths) - set(out.split())


async def failing_after(path: Path, fraction: float) -> AsyncIterator[bytes]:
    data = path.read_bytes()
    cut = int(len(data) * fraction)
    for start in range(0, cut, 64):
        yield data[start : min(start + 64, cut)]
    raise RuntimeError("source failed mid-stream")


def test_both_backends_satisfy_the_store_protocol() -> None:
    assert issubclass(ImportStore, Store)
    assert issubclass(DaemonStore, Store)


async def test_imports_a_closure(nix: Nix, store: ImportStore, closure: list[DumpedPath]) -> None:
    paths = [d.info.store_path for d in closure]
    assert await store.query_valid_paths(paths) == set()
    for dumped in closure:
        await store.add_to_store_nar(dumped.info, stream_file(dumped.nar))
    assert await store.query_valid_paths(paths) == set(paths)
    assert valid_in(nix, store.root, paths) == set(paths)
    nix.run("nix-store", "--store", store.root, "--verify-path", *paths)
    for dumped in closure:
        assert nix.run("nix-store", "--store", store.root, "--dump", dumped.info.store_path) == (
            dumped.nar.read_bytes()
        )
        got = await store.query_path_info(dumped.info.store_path)
        assert got is not None
        assert nar_hash_digest(got.nar_hash) == nar_hash_digest(dumped.info.nar_hash)
        assert got.nar_size == dumped.info.nar_size
        assert got.references == dumped.info.references
        assert got.deriver == dumped.info.deriver
        assert dumped.info.sigs and not got.sigs  # the export format carries no signatures
    # importing again is harmless
    await store.add_to_store_nar(closure[0].info, stream_file(closure[0].nar))


async def test_add_multiple_in_one_process(
    nix: Nix, store: ImportStore, closure: list[DumpedPath]
) -> None:
    await store.add_multiple_to_store([(d.info, stream_file(d.nar)) for d in closure])
    paths = [d.info.store_path for d in closure]
    assert valid_in(nix, store.root, paths) == set(paths)


async def test_wrong_nar_hash_is_refused(
    nix: Nix, store: ImportStore, closure: list[DumpedPath]
) -> None:
    first = closure[0]
    wrong = replace(first.info, nar_hash="sha256:" + hashlib.sha256(b"other").hexdigest())
    with pytest.raises(HashMismatch, match="NarHash says"):
        await store.add_to_store_nar(wrong, stream_file(first.nar))
    wrong_size = replace(first.info, nar_size=first.info.nar_size + 8)
    with pytest.raises(SizeMismatch):
        await store.add_to_store_nar(wrong_size, stream_file(first.nar))
    assert valid_in(nix, store.root, [first.info.store_path]) == set()


@pytest.mark.parametrize("fraction", [0.5, 1.0])
async def test_producer_failure_leaves_no_partial_path(
    nix: Nix, store: ImportStore, closure: list[DumpedPath], fraction: float
) -> None:
    first = closure[0]
    with pytest.raises(RuntimeError, match="mid-stream"):
        await store.add_to_store_nar(first.info, failing_after(first.nar, fraction))
    assert valid_in(nix, store.root, [first.info.store_path]) == set()
    assert not (Path(store.root) / first.info.store_path.lstrip("/")).exists()
    await store.add_to_store_nar(first.info, stream_file(first.nar))
    assert valid_in(nix, store.root, [first.info.store_path]) == {first.info.store_path}


async def test_cancellation_kills_the_import(
    nix: Nix, store: ImportStore, closure: list[DumpedPath]
) -> None:
    first = closure[0]
    started = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        data = first.nar.read_bytes()
        yield data[:100]
        yield data[100:200]
        started.set()
        await asyncio.Event().wait()
        yield data[200:]

    task = asyncio.create_task(store.add_to_store_nar(first.info, stalls()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert valid_in(nix, store.root, [first.info.store_path]) == set()


async def test_missing_reference_is_a_store_error(
    nix: Nix, store: ImportStore, closure: list[DumpedPath]
) -> None:
    top = closure[-1]  # its references were never imported
    with pytest.raises(StoreError) as refused:
        await store.add_to_store_nar(top.info, stream_file(top.nar))
    message = str(refused.value)
    assert "\x1b" not in message
    assert "is not valid" in message
    assert any(reference in message for reference in top.info.references)
    assert valid_in(nix, store.root, [top.info.store_path]) == set()


async def test_repair_is_refused_and_queries_of_absent_paths(
    store: ImportStore, closure: list[DumpedPath]
) -> None:
    first = closure[0]
    with pytest.raises(StoreError, match="cannot repair"):
        await store.add_to_store_nar(first.info, stream_file(first.nar), repair=True)
    assert await store.query_path_info(first.info.store_path) is None
    assert not await store.is_valid_path(first.info.store_path)
    assert await store.query_valid_paths([]) == set()
