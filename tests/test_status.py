"""`substituter status`: one-shot and --watch views of a running daemon's dataspace.

A real daemon (two in-process binary caches, one of them corrupt) and a real out-of-process
fetcher; real Nix copies through the daemon so that a transfer really fails over.
"""

from __future__ import annotations

import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .cache_server import BuiltCache, build_cache
from .conftest import Nix
from .daemon_proc import DaemonProcess
from .test_daemon_e2e import assert_intact, binary_cache, copy_from
from .test_remote_fetcher import (
    PATIENCE,
    FetcherProcess,
    daemon_config,
    dataspace_args,
    fetcher_lines,
    hash_part,
    status_text,
    wait_for_fetcher,
)

pytestmark = [pytest.mark.nix, pytest.mark.slow]


def section(text: str, title: str) -> list[str]:
    """The indented lines under ``title (N):`` in a status display."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{title} ("))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        body.append(line.strip())
    return body


@pytest.fixture
def cache(nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path) -> BuiltCache:
    # Uncompressed, so a flipped byte reaches the NAR hash rather than breaking a decoder.
    return build_cache(nix, nix_keys, tmp_path / "cache", "none")


def test_one_shot_status_shows_supply_demand_and_failures(
    nix: Nix, cache: BuiltCache, tmp_path: Path, serve_cache, fetchers: list[FetcherProcess]
) -> None:
    evil_root = tmp_path / "evil"
    shutil.copytree(cache.root, evil_root)
    evil = serve_cache(evil_root)
    evil.corrupt(200)
    good = serve_cache(cache.root)
    config = daemon_config(cache.public_key, fetchers=[binary_cache(evil.url, "evil", 10),
                                                       binary_cache(good.url, "good", 50)])
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        remote = FetcherProcess(daemon, "binary-cache", "remote-http", 70, {"url": good.url})
        fetchers.append(remote.start())
        wait_for_fetcher(daemon, nix.env, remote)

        # Without --dataspace/--cap, status finds the daemon's socket and capability via its config.
        found = subprocess.run(
            [sys.executable, "-m", "substituter", "status", "--config", str(daemon.config_file)],
            env=nix.env, capture_output=True, text=True, timeout=PATIENCE,
        )
        assert found.returncode == 0, found.stderr
        lines = fetcher_lines(found.stdout)
        assert set(lines) == {"evil", "good", "remote-http"}
        host = socket.gethostname()
        for name, priority in (("evil", 10), ("good", 50), ("remote-http", 70)):
            assert lines[name].split() == [name, "binary-cache", "priority", str(priority), "on", host]
        assert section(found.stdout, "wants") == [] and section(found.stdout, "recent failures") == []

        top = hash_part(cache.top)
        assert httpx.get(f"{daemon.url}/{top}.narinfo", timeout=PATIENCE).status_code == 200
        wanted = status_text(daemon, nix.env)  # the want lingers for the NAR request that follows
        assert f"{top} query  3 offer(s), 0 unavailable" in section(wanted, "wants")

        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, store, cache.paths)

        after = status_text(daemon, nix.env)
        failures = section(after, "recent failures")
        assert failures, after
        assert all(" evil (bad source): " in line and "hash mismatch" in line for line in failures), failures
        assert {line.split()[0] for line in failures} <= {hash_part(p) for p in cache.paths}
        assert section(after, "transfers") == []  # nothing in flight once Nix is done


class LineReader:
    """Collects a process's stdout lines in a thread, so waiting on them can be bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: [self.lines.put(line) for line in stdout], daemon=True).start()

    def until(self, predicate: Callable[[str], bool], what: str) -> str:
        """Read until one complete display (they end with a blank line) satisfies ``predicate``."""
        deadline = time.monotonic() + PATIENCE
        display: list[str] = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.strip():
                display.append(line)
                continue
            text, display = "".join(display), []
            if predicate(text):
                return text
        raise AssertionError(f"--watch never showed {what}; output so far:\n{''.join(self.seen)}")


def test_watch_prints_updates_until_interrupted(
    nix: Nix, cache: BuiltCache, tmp_path: Path, serve_cache, fetchers: list[FetcherProcess]
) -> None:
    good = serve_cache(cache.root)
    config = daemon_config(cache.public_key, fetchers=[binary_cache(good.url, "good", 50)])
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        errors = tmp_path / "watch.stderr"
        with errors.open("w") as stderr, subprocess.Popen(
            [sys.executable, "-m", "substituter", "status", *dataspace_args(daemon), "--watch"],
            env=nix.env, stdout=subprocess.PIPE, stderr=stderr, text=True,
        ) as watch:
            try:
                reader = LineReader(watch)
                first = reader.until(lambda text: "fetchers (" in text, "a first display")
                assert set(fetcher_lines(first)) == {"good"}

                late = FetcherProcess(daemon, "binary-cache", "late", 20, {"url": good.url})
                fetchers.append(late.start())
                joined = reader.until(lambda text: "late" in fetcher_lines(text), "the late fetcher")
                assert fetcher_lines(joined)["late"].split()[:4] == ["late", "binary-cache", "priority", "20"]

                top = hash_part(cache.top)
                assert httpx.get(f"{daemon.url}/{top}.narinfo", timeout=PATIENCE).status_code == 200
                reader.until(lambda text: f"{top} query  2 offer(s)" in text, "the want and both offers")

                late.kill9()
                reader.until(lambda text: "late" not in fetcher_lines(text), "the killed fetcher leave")
            finally:
                watch.send_signal(signal.SIGTERM)
                code = watch.wait(timeout=PATIENCE)
        assert code == 0, errors.read_text()


def test_status_refuses_bad_capabilities_with_exit_2(nix: Nix, tmp_path: Path, serve_cache,
                                                     cache: BuiltCache) -> None:
    with DaemonProcess(tmp_path, daemon_config(cache.public_key), nix.env) as daemon:
        sock = f"unix:{daemon.state / 'dataspace.sock'}"
        forged = '<ref {oid: "substituter" sig: #x"00112233445566778899aabbccddeeff"}>'
        for cap, message in ((forged, "refused the capability"), ("garbage", "capability must look like"),
                             (f"@{tmp_path / 'missing.cap'}", "cannot read the capability file")):
            result = subprocess.run(
                [sys.executable, "-m", "substituter", "status", "--dataspace", sock, "--cap", cap],
                env=nix.env, capture_output=True, text=True, timeout=PATIENCE,
            )
            assert result.returncode == 2, f"{cap}: {result.stdout}{result.stderr}"
            assert message in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
        # And the real capability still works.
        assert "fetchers (0):" in status_text(daemon, nix.env)


def test_status_without_a_daemon_says_so(nix: Nix, tmp_path: Path) -> None:
    config = tmp_path / "nodaemon.json"
    config.write_text(f'{{"state-dir": "{tmp_path / "state"}", "fetchers": []}}')
    result = subprocess.run(
        [sys.executable, "-m", "substituter", "status", "--config", str(config)],
        env=nix.env, capture_output=True, text=True, timeout=PATIENCE,
    )
    assert result.returncode == 2
    assert "is the daemon running?" in result.stderr, result.stderr


def test_status_gives_up_on_an_unreachable_dataspace(nix: Nix, tmp_path: Path) -> None:
    cap = '<ref {oid: "substituter" sig: #x"00112233445566778899aabbccddeeff"}>'
    result = subprocess.run(
        [sys.executable, "-m", "substituter", "status", "--dataspace", f"unix:{tmp_path / 'gone.sock'}",
         "--cap", cap],
        env=nix.env, capture_output=True, text=True, timeout=PATIENCE,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no answer from" in result.stderr, result.stderr

