"""Fleet mode: daemons and out-of-process fetchers meet in a real syndicate-server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .cache_server import build_cache
from .conftest import Nix
from .daemon_proc import DaemonProcess
from .syndicate_server import SyndicateServer

pytestmark = [pytest.mark.nix, pytest.mark.syndicate_server, pytest.mark.slow]


def start_fetcher(server: SyndicateServer, url: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "substituter", "fetcher", "binary-cache", "--dataspace", server.unix_addr,
             "--cap", server.cap, "--name", "fleet-cache", "--option", f"url={url}"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )


def wait_for_narinfo(url: str, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    response = httpx.get(url, timeout=10)
    while response.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        response = httpx.get(url, timeout=10)
    return response


def test_daemon_and_remote_fetcher_through_syndicate_server(
    nix: Nix, nix_keys, tmp_path: Path, serve_cache, syndicate_server: SyndicateServer
) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "zstd")
    upstream = serve_cache(cache.root)
    config = {
        "trusted-public-keys": [cache.public_key],
        "fetchers": [],
        "locate-timeout": 3,
        "dataspace": {"connect": syndicate_server.unix_addr, "cap": syndicate_server.cap},
    }
    fetcher = start_fetcher(syndicate_server, upstream.url, nix.env, tmp_path / "fetcher.log")
    try:
        with DaemonProcess(tmp_path, config, nix.env) as daemon:
            hash_part = Path(cache.top).name[:32]
            assert wait_for_narinfo(f"{daemon.url}/{hash_part}.narinfo").status_code == 200, daemon.log()
            store = tmp_path / "client"
            result = subprocess.run(
                ["nix", "copy", "--from", daemon.url, "--to", str(store), "--option", "trusted-public-keys",
                 cache.public_key, cache.top], env=nix.env, capture_output=True, check=False)
            assert result.returncode == 0, result.stderr.decode() + daemon.log()
            nix.run("nix-store", "--store", str(store), "--check-validity", *cache.paths)

            # The server restarts: daemon and fetcher reconnect and assert everything again.
            syndicate_server.restart()
            dep = next(p for p in cache.paths if p != cache.top)
            response = wait_for_narinfo(f"{daemon.url}/{Path(dep).name[:32]}.narinfo", timeout=30)
            assert response.status_code == 200, daemon.log() + (tmp_path / "fetcher.log").read_text()
    finally:
        fetcher.terminate()
        fetcher.wait(timeout=10)


def test_daemon_with_a_wrong_capability_refuses_to_start(nix: Nix, tmp_path: Path,
                                                        syndicate_server: SyndicateServer) -> None:
    forged = syndicate_server.cap.replace('sig: #x"', 'sig: #x"00', 1)[:-3] + '">'
    config = {"fetchers": [], "dataspace": {"connect": syndicate_server.unix_addr, "cap": forged}}
    daemon = DaemonProcess(tmp_path, config, nix.env)
    with pytest.raises(AssertionError, match="refused"):
        daemon.start(timeout=15)
