"""`fetch` in process: what it tells the dataspace about the paths it imported."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest
import syndicate.patterns as P
from syndicate import actor, turn
from syndicate.dataspace import during

from substituter.config import parse_config
from substituter.fetch import fetch_closure, open_store
from substituter.metrics import Metrics
from substituter.protocol import Realised, record_pattern
from substituter.runtime import Runtime
from substituter.trust import TrustPolicy

from .cache_server import BuiltCache, build_cache
from .conftest import Nix

pytestmark = [pytest.mark.nix]

HANG_GUARD_SECONDS = 60.0  # only stops a broken test from hanging; never asserts on time


def test_every_imported_path_is_asserted_realised_once_the_store_has_it(
    nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "mirror", "zstd", n_deps=3)
    store = tmp_path / "chroot"
    config = parse_config({
        "trusted-public-keys": [cache.public_key], "state-dir": str(tmp_path / "state"),
        "fetchers": [{"type": "local-mirror", "path": str(cache.root)}],
    })
    runtime = Runtime(config, trust=TrustPolicy(config.trusted_public_keys), spool_limit=2**63,
                      durable_cache=False, remote_openers=False, metrics=Metrics(enabled=False))
    realised: list[tuple[str, str]] = []
    valid_when_told: list[bool] = []
    outcome: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    system = actor.System(loop=loop)

    async def main(_facet: Any) -> None:
        opened = await open_store(str(store), config.store_dir)
        try:
            await runtime.start()
            outcome["plan"], outcome["failures"] = await fetch_closure(
                runtime, opened, [BuiltCache.hash_part(cache.top)])
            for _ in range(20):  # let the assertions reach the observer
                await asyncio.sleep(0)
        finally:
            await opened.close()
            await runtime.stop()
        system.exit_signal.put_nowait(())

    def boot() -> None:
        runtime.boot()

        @during(runtime.ds, record_pattern(Realised, storePath=P.CAPTURE, store=P.CAPTURE))
        def _told(path: str, where: str) -> None:
            realised.append((path, where))
            # Told only once the store has the path (checked from outside, as anyone could).
            check = subprocess.run(["nix-store", "--store", str(store), "--check-validity", path],
                                   env=nix.env, capture_output=True, check=False)
            valid_when_told.append(check.returncode == 0)

        turn.linked_task()(main)

    loop.call_later(HANG_GUARD_SECONDS, lambda: system.exit_signal.put_nowait(()))
    system.run(boot, name="fetch-test", configure_logging=False)
    assert outcome.get("failures") == {}, outcome
    assert sorted(path for path, _ in realised) == sorted(cache.paths)
    assert {where for _, where in realised} == {str(store.resolve())}
    assert valid_when_told and all(valid_when_told)
