"""`substituter fetch` against real Nix: a private nix-daemon and a chroot store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .cache_server import build_cache
from .conftest import Nix

pytestmark = [pytest.mark.nix]


def write_config(tmp: Path, public_key: str, fetchers: list[dict]) -> Path:
    config = tmp / "fetch.json"
    config.write_text(json.dumps({"trusted-public-keys": [public_key], "state-dir": str(tmp / "state"),
                                  "fetchers": fetchers}))
    return config


def run_fetch(nix: Nix, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "substituter", "fetch", "--config", str(config), *args],
                          env=nix.env, capture_output=True, text=True, check=False, timeout=120)


def assert_intact(nix: Nix, store: Path, paths: list[str]) -> None:
    nix.run("nix-store", "--store", str(store), "--check-validity", *paths)
    nix.run("nix-store", "--store", str(store), "--verify-path", *paths)
    for path in paths:
        assert nix.run("nix-store", "--dump", path) == nix.run("nix-store", "--store", str(store), "--dump", path)


@pytest.mark.daemon
def test_fetch_closure_into_untrusted_daemon(nix: Nix, nix_keys, tmp_path: Path, serve_cache,
                                             nix_daemon_factory) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "xz", n_deps=3)
    server = serve_cache(cache.root)
    daemon = nix_daemon_factory(trusted=False, trusted_public_keys=[cache.public_key])
    config = write_config(tmp_path, cache.public_key, [{"type": "binary-cache", "url": server.url}])
    result = run_fetch(nix, config, "--store", daemon.store_url, cache.top)
    assert result.returncode == 0, result.stderr + daemon.log()
    assert_intact(nix, daemon.store_root, cache.paths)
    # Signatures travelled with the import.
    info = json.loads(nix.run("nix", "path-info", "--json", "--store", str(daemon.store_root), cache.top))
    assert any(s.startswith(cache.public_key.split(":")[0]) for s in info[0]["signatures"])
    # A second run finds everything present.
    again = run_fetch(nix, config, "--store", daemon.store_url, cache.top)
    assert again.returncode == 0 and "0 path(s) imported" in again.stderr


def test_fetch_into_chroot_store_by_hash_part(nix: Nix, nix_keys, tmp_path: Path) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "mirror", "zstd")
    config = write_config(tmp_path, cache.public_key, [{"type": "local-mirror", "path": str(cache.root)}])
    store = tmp_path / "chroot"
    result = run_fetch(nix, config, "--store", str(store), Path(cache.top).name[:32])
    assert result.returncode == 0, result.stderr
    assert_intact(nix, store, cache.paths)


def test_missing_path_exits_1_naming_it(nix: Nix, nix_keys, tmp_path: Path) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "mirror", "none")
    config = write_config(tmp_path, cache.public_key, [{"type": "local-mirror", "path": str(cache.root)}])
    missing = "0" * 32
    result = run_fetch(nix, config, "--store", str(tmp_path / "chroot"), f"/nix/store/{missing}-nothing")
    assert result.returncode == 1
    assert missing in result.stderr and "not found" in result.stderr


def test_usage_errors_exit_2(nix: Nix, nix_keys, tmp_path: Path) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "mirror", "none")
    config = write_config(tmp_path, cache.public_key, [{"type": "local-mirror", "path": str(cache.root)}])
    assert run_fetch(nix, config, "not-a-path").returncode == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fetchers": [{"type": "local-mirror", "pathh": "/x"}]}))
    result = run_fetch(nix, bad, "0" * 32)
    assert result.returncode == 2 and "pathh" in result.stderr


def test_unsigned_paths_need_no_require_sigs(nix: Nix, nix_keys, tmp_path: Path) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "mirror", "none")
    for narinfo in cache.root.glob("*.narinfo"):
        narinfo.write_text("".join(line + "\n" for line in narinfo.read_text().splitlines() if not line.startswith("Sig:")))
    config = write_config(tmp_path, cache.public_key, [{"type": "local-mirror", "path": str(cache.root)}])
    store = tmp_path / "chroot"
    refused = run_fetch(nix, config, "--store", str(store), cache.top)
    assert refused.returncode == 1 and "unsigned" in refused.stderr
    accepted = run_fetch(nix, config, "--store", str(store), "--no-require-sigs", cache.top)
    assert accepted.returncode == 0, accepted.stderr
    assert_intact(nix, store, cache.paths)


def test_corrupt_preferred_source_is_replaced(nix: Nix, nix_keys, tmp_path: Path) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "good", "none")
    evil = tmp_path / "evil"
    shutil.copytree(cache.root, evil)
    for nar in (evil / "nar").iterdir():
        data = bytearray(nar.read_bytes())
        data[len(data) // 2] ^= 0x01
        nar.write_bytes(bytes(data))
    config = write_config(tmp_path, cache.public_key, [
        {"type": "local-mirror", "name": "evil", "path": str(evil), "priority": 10},
        {"type": "local-mirror", "name": "good", "path": str(cache.root), "priority": 50},
    ])
    store = tmp_path / "chroot"
    result = run_fetch(nix, config, "--store", str(store), cache.top)
    assert result.returncode == 0, result.stderr
    assert_intact(nix, store, cache.paths)


@pytest.mark.daemon
def test_sigint_mid_fetch_leaves_nothing_half_registered(nix: Nix, nix_keys, tmp_path: Path, serve_cache,
                                                        nix_daemon_factory) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "none", n_deps=3)
    server = serve_cache(cache.root)
    release = server.stall(after=100, times=1000)
    daemon = nix_daemon_factory(trusted=True)
    config = write_config(tmp_path, cache.public_key, [{"type": "binary-cache", "url": server.url}])
    proc = subprocess.Popen([sys.executable, "-m", "substituter", "fetch", "--config", str(config),
                             "--store", daemon.store_url, cache.top],
                            env=nix.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not server.paths_requested("GET") or not any(
            p.startswith("nar/") for p in server.paths_requested("GET")):
        time.sleep(0.05)
        if time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    release.set()
    assert proc.returncode == 130, err
    for path in cache.paths:
        check = subprocess.run(["nix-store", "--store", str(daemon.store_root), "--check-validity", path],
                               env=nix.env, capture_output=True)
        assert check.returncode != 0, f"{path} is registered after an interrupted fetch"
        assert not (daemon.real_store_dir / Path(path).name).exists()
    assert os.path.exists(daemon.socket_path)


def test_fetch_attached_to_a_running_daemon(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    from .daemon_proc import DaemonProcess

    cache = build_cache(nix, nix_keys, tmp_path / "cache", "zstd")
    server = serve_cache(cache.root)
    daemon_config = {"trusted-public-keys": [cache.public_key],
                     "fetchers": [{"type": "binary-cache", "name": "daemons-cache", "url": server.url}]}
    with DaemonProcess(tmp_path, daemon_config, nix.env) as daemon:
        # Only trust comes from this side's config; the fetchers are the daemon's.
        config = write_config(tmp_path, cache.public_key, [])
        store = tmp_path / "chroot"
        result = run_fetch(nix, config, "--store", str(store),
                           "--dataspace", f'<unix "{daemon.state / "dataspace.sock"}">',
                           "--cap", f"@{daemon.state / 'dataspace.cap'}", cache.top)
        assert result.returncode == 0, result.stderr + daemon.log()
        assert_intact(nix, store, cache.paths)
        # The demand went through the daemon's dataspace: its fetcher located every path.
        narinfos = [p for p in server.paths_requested("GET") if p.endswith(".narinfo")]
        assert len(narinfos) >= len(cache.paths)


def test_references_the_store_already_has_need_no_source(nix: Nix, nix_keys, tmp_path: Path) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "mirror", "none")
    store = tmp_path / "chroot"
    deps = [p for p in cache.paths if p != cache.top]
    nix.run("nix", "copy", "--no-check-sigs", "--to", str(store), *deps)  # e.g. built locally
    for dep in deps:
        cache.narinfo_file(dep).unlink()  # no source has them
    config = write_config(tmp_path, cache.public_key, [{"type": "local-mirror", "path": str(cache.root)}])
    result = run_fetch(nix, config, "--store", str(store), cache.top)
    assert result.returncode == 0, result.stderr
    assert f"{len(deps)} already present" in result.stderr
    assert_intact(nix, store, cache.paths)
