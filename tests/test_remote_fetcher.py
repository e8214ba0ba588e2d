"""Out-of-process fetchers: `substituter fetcher KIND` attached to a running daemon's dataspace.

Everything here is real: a `substituter daemon` process, fetcher processes started with the CLI,
HTTP caches on loopback built with real Nix, and `nix copy --from` the daemon.  The dataspace is
observed the way an operator would, with `substituter status`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .cache_server import BuiltCache, build_cache
from .conftest import Nix
from .daemon_proc import DaemonProcess
from .test_daemon_e2e import assert_intact, binary_cache, copy_from

pytestmark = [pytest.mark.nix, pytest.mark.slow]

#: Upper bound for waiting on something that must happen; a hang guard, never a speed assertion.
PATIENCE = 30.0


# --- helpers shared with test_status.py ------------------------------------------------------------


def dataspace_args(daemon: DaemonProcess) -> list[str]:
    """`--dataspace` and `--cap` naming the daemon's embedded dataspace."""
    return ["--dataspace", f"unix:{daemon.state / 'dataspace.sock'}",
            "--cap", f"@{daemon.state / 'dataspace.cap'}"]


class FetcherProcess:
    """A `substituter fetcher KIND …` process attached to a daemon's dataspace; output to a log."""

    def __init__(self, daemon: DaemonProcess, kind: str, name: str, priority: int,
                 options: dict[str, str], *, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_file = daemon.tmp / f"fetcher-{name}.log"
        args = [sys.executable, "-m", "substituter", "fetcher", kind, *dataspace_args(daemon),
                "--name", name, "--priority", str(priority)]
        for key, value in options.items():
            args += ["--option", f"{key}={value}"]
        self.args = args + (extra or [])
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FetcherProcess:
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=PATIENCE)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def status(daemon: DaemonProcess, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """One-shot `substituter status` against the daemon's dataspace."""
    return subprocess.run(
        [sys.executable, "-m", "substituter", "status", *dataspace_args(daemon), *args],
        env=env, capture_output=True, text=True, timeout=PATIENCE, check=False,
    )


def status_text(daemon: DaemonProcess, env: dict[str, str]) -> str:
    result = status(daemon, env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for_status(daemon: DaemonProcess, env: dict[str, str], predicate: Callable[[str], bool],
                    what: str) -> str:
    """Poll `substituter status` until ``predicate`` holds for its output."""
    deadline = time.monotonic() + PATIENCE
    text = ""
    while time.monotonic() < deadline:
        text = status_text(daemon, env)
        if predicate(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"status never showed {what}; last:\n{text}\ndaemon log:\n{daemon.log()}")


def fetcher_lines(text: str) -> dict[str, str]:
    """The fetcher lines of a status display, by fetcher name."""
    section = text.split("fetchers (", 1)[1].split("wants (", 1)[0]
    lines = [line.strip() for line in section.splitlines()[1:] if line.strip()]
    return {line.split()[0]: line for line in lines}


def wait_for_fetcher(daemon: DaemonProcess, env: dict[str, str], fetcher: FetcherProcess) -> str:
    def attached(text: str) -> bool:
        if fetcher.proc is not None and fetcher.proc.poll() is not None:
            raise AssertionError(f"fetcher {fetcher.name} exited with {fetcher.proc.returncode}:\n"
                                 f"{fetcher.log()}")
        return fetcher.name in fetcher_lines(text)

    return wait_for_status(daemon, env, attached, f"fetcher {fetcher.name}")


def daemon_config(public_key: str, *, fetchers: list[dict[str, Any]] | None = None,
                  locate_timeout: float = 10.0) -> dict[str, Any]:
    return {"trusted-public-keys": [public_key], "fetchers": fetchers or [],
            "locate-timeout": locate_timeout}


def metric_samples(daemon: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the daemon's /metrics, keyed by (name, sorted labels)."""
    text = httpx.get(f"{daemon.url}/metrics", timeout=PATIENCE).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def hash_part(store_path: str) -> str:
    return Path(store_path).name[:32]


# --- tests ------------------------------------------------------------------------------------------


@pytest.fixture
def cache(nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path) -> BuiltCache:
    return build_cache(nix, nix_keys, tmp_path / "cache", "xz")


def test_nix_copies_through_an_out_of_process_fetcher(
    nix: Nix, cache: BuiltCache, tmp_path: Path, serve_cache, fetchers: list[FetcherProcess]
) -> None:
    server = serve_cache(cache.root)
    with DaemonProcess(tmp_path, daemon_config(cache.public_key), nix.env) as daemon:
        remote = FetcherProcess(daemon, "binary-cache", "remote-http", 30, {"url": server.url})
        fetchers.append(remote.start())
        wait_for_fetcher(daemon, nix.env, remote)

        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log() + remote.log()
        assert_intact(nix, store, cache.paths)
        # The fetcher process only located; the daemon opened the NARs itself (HttpOpener).
        nar_requests = [p for p in server.paths_requested() if p.startswith("nar/")]
        assert len(nar_requests) == len(cache.paths)
        assert {p for p in server.paths_requested() if p.endswith(".narinfo")} == {
            f"{hash_part(p)}.narinfo" for p in cache.paths
        }


def test_metrics_count_offers_and_bytes_per_remote_fetcher(
    nix: Nix, cache: BuiltCache, tmp_path: Path, serve_cache, fetchers: list[FetcherProcess]
) -> None:
    server = serve_cache(cache.root)
    with DaemonProcess(tmp_path, daemon_config(cache.public_key), nix.env) as daemon:
        remote = FetcherProcess(daemon, "binary-cache", "remote-http", 30, {"url": server.url})
        fetchers.append(remote.start())
        wait_for_fetcher(daemon, nix.env, remote)
        result = copy_from(nix, daemon.url, tmp_path / "client-store", cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()

        samples = metric_samples(daemon)
        offers = samples[("substituter_offers_total", (("answer", "trusted"), ("fetcher", "remote-http")))]
        assert offers == len(cache.paths)
        received = samples[("substituter_fetcher_bytes_total", (("fetcher", "remote-http"),))]
        nar_sizes = sum(int(nix.text("nix-store", "-q", "--size", p)) for p in cache.paths)
        assert received == nar_sizes
        # What Nix received (compressed or not, as the daemon chose), so only "some" is certain.
        assert samples[("substituter_nar_bytes_served_total", ())] > 0
        assert samples[("substituter_narinfo_requests_total", (("result", "hit"),))] >= len(cache.paths)


def test_a_standing_want_is_answered_when_a_fetcher_attaches(
    nix: Nix, cache: BuiltCache, tmp_path: Path, serve_cache, fetchers: list[FetcherProcess]
) -> None:
    # An in-process fetcher whose cache never finishes a narinfo keeps the want standing.
    stuck = serve_cache(cache.root)
    release = stuck.stall(after=0, match="*.narinfo", times=100)
    good = serve_cache(cache.root)
    slow = {**binary_cache(stuck.url, "stuck", 50), "stall-timeout": 120, "locate-timeout": 120}
    config = daemon_config(cache.public_key, fetchers=[slow], locate_timeout=120)
    wanted = hash_part(cache.top)
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        answer: dict[str, httpx.Response] = {}
        request = threading.Thread(target=lambda: answer.setdefault(
            "narinfo", httpx.get(f"{daemon.url}/{wanted}.narinfo", timeout=120)))
        request.start()
        try:
            before = wait_for_status(daemon, nix.env, lambda text: wanted in text, "the standing want")
            assert "0 offer(s), 0 unavailable" in before
            assert set(fetcher_lines(before)) == {"stuck"}
            assert "narinfo" not in answer

            remote = FetcherProcess(daemon, "binary-cache", "late", 10, {"url": good.url})
            fetchers.append(remote.start())
            request.join(PATIENCE)
            assert not request.is_alive(), "the narinfo request was not answered after the fetcher attached"
        finally:
            release.set()
            request.join(PATIENCE)
        response = answer["narinfo"]
        assert response.status_code == 200, response.text + daemon.log()
        assert f"StorePath: {cache.top}\n" in response.text
        assert f"{wanted}.narinfo" in good.paths_requested()


def test_killed_fetcher_leaves_nothing_behind_and_misses_stay_fast(
    nix: Nix, cache: BuiltCache, tmp_path: Path, serve_cache, fetchers: list[FetcherProcess]
) -> None:
    server = serve_cache(cache.root)
    locate_timeout = 10.0
    # A live in-process fetcher that has nothing: with no fetcher at all the broker waits out the
    # deadline on purpose (one may be attaching), which is not what this test is about.
    (tmp_path / "empty").mkdir()
    empty = {"type": "local-mirror", "name": "empty", "path": str(tmp_path / "empty"),
             "check-cache-info": False}
    config = daemon_config(cache.public_key, fetchers=[empty], locate_timeout=locate_timeout)
    # Nothing fetched ahead of Nix: the NAR must be asked of the dead fetcher (a fast 404).
    config["nar-cache"] = {"prefetch": 0}
    top, dep = cache.top, next(p for p in cache.paths if p != cache.top)
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        doomed = FetcherProcess(daemon, "binary-cache", "doomed", 20, {"url": server.url})
        fetchers.append(doomed.start())
        wait_for_fetcher(daemon, nix.env, doomed)
        served = httpx.get(f"{daemon.url}/{hash_part(top)}.narinfo", timeout=PATIENCE)
        assert served.status_code == 200, served.text
        nar_url = next(line[5:] for line in served.text.splitlines() if line.startswith("URL: "))
        offered = status_text(daemon, nix.env)
        assert f"{hash_part(top)} query  1 offer(s)" in offered

        doomed.kill9()
        gone = wait_for_status(daemon, nix.env, lambda text: "doomed" not in fetcher_lines(text),
                               "the killed fetcher retracted")
        assert set(fetcher_lines(gone)) == {"empty"}
        assert "1 offer(s)" not in gone  # its offers went with it

        for wanted in (hash_part(top), hash_part(dep)):  # a lingering demand, and a fresh one
            started = time.monotonic()
            miss = httpx.get(f"{daemon.url}/{wanted}.narinfo", timeout=PATIENCE)
            elapsed = time.monotonic() - started
            assert miss.status_code == 404, miss.text
            assert "empty: not in" in miss.text and "doomed" not in miss.text
            # A behavioural bound: nobody waits out the locate deadline for a dead fetcher.
            assert elapsed < 3.0 < locate_timeout, f"{wanted}: 404 took {elapsed:.1f} s"
        assert httpx.get(f"{daemon.url}/{nar_url}", timeout=PATIENCE).status_code == 404


@pytest.mark.parametrize("cap", [
    '<ref {oid: "substituter" sig: #x"00112233445566778899aabbccddeeff"}>',  # forged signature
    '<ref {oid: "someone-else" sig: #x"00112233445566778899aabbccddeeff"}>',  # unknown object
])
def test_fetcher_with_a_forged_capability_exits_2_and_asserts_nothing(
    nix: Nix, cache: BuiltCache, tmp_path: Path, serve_cache, cap: str
) -> None:
    server = serve_cache(cache.root)
    with DaemonProcess(tmp_path, daemon_config(cache.public_key), nix.env) as daemon:
        args = [sys.executable, "-m", "substituter", "fetcher", "binary-cache",
                "--dataspace", f"unix:{daemon.state / 'dataspace.sock'}", "--cap", cap,
                "--name", "intruder", "--option", f"url={server.url}"]
        result = subprocess.run(args, env=nix.env, capture_output=True, text=True, timeout=PATIENCE)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "refused" in result.stderr and "capability" in result.stderr, result.stderr
        view = status_text(daemon, nix.env)
        assert "fetchers (0):" in view and "intruder" not in view
        miss = httpx.get(f"{daemon.url}/{hash_part(cache.top)}.narinfo", timeout=PATIENCE)
        assert miss.status_code == 404


def test_capability_that_does_not_parse_is_a_usage_error(nix: Nix, tmp_path: Path, serve_cache) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "substituter", "fetcher", "binary-cache", "--dataspace",
         f"unix:{tmp_path / 'nowhere.sock'}", "--cap", "not a capability", "--option",
         "url=http://127.0.0.1:9"],
        env=nix.env, capture_output=True, text=True, timeout=PATIENCE,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "capability" in result.stderr, result.stderr


def test_remote_offers_of_local_files_are_not_served(
    nix: Nix, cache: BuiltCache, tmp_path: Path, fetchers: list[FetcherProcess]
) -> None:
    with DaemonProcess(tmp_path, daemon_config(cache.public_key), nix.env) as daemon:
        mirror = FetcherProcess(daemon, "local-mirror", "remote-files", 10, {"path": str(cache.root)})
        fetchers.append(mirror.start())
        wait_for_fetcher(daemon, nix.env, mirror)

        # The daemon must not read local files a peer names; such an offer is no offer at all.
        narinfo = httpx.get(f"{daemon.url}/{hash_part(cache.top)}.narinfo", timeout=PATIENCE)
        assert narinfo.status_code == 404, narinfo.text
        assert "file" in narinfo.text and "remote-files" in narinfo.text

        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode != 0
        assert not any((store / "nix" / "store" / Path(p).name).exists() for p in cache.paths)
        assert "remote-files" in daemon.log() and "file://" in daemon.log()


def test_without_fetchers_the_deadline_answers_once_and_a_late_fetcher_still_serves(
    nix: Nix, cache: BuiltCache, tmp_path: Path, serve_cache, fetchers: list[FetcherProcess]
) -> None:
    server = serve_cache(cache.root)
    locate_timeout = 5.0
    top = hash_part(cache.top)
    with DaemonProcess(tmp_path, daemon_config(cache.public_key, locate_timeout=locate_timeout),
                       nix.env) as daemon:
        # No fetcher yet: the broker waits out the deadline (one may be attaching), then says so.
        first = httpx.get(f"{daemon.url}/{top}.narinfo", timeout=PATIENCE)
        assert first.status_code == 404, first.text
        # That answer stands for the lingering demand; asking again does not wait again.
        started = time.monotonic()
        again = httpx.get(f"{daemon.url}/{top}.narinfo", timeout=PATIENCE)
        elapsed = time.monotonic() - started
        assert again.status_code == 404, again.text
        assert elapsed < 3.0 < locate_timeout, f"the repeated miss waited {elapsed:.1f} s"

        late = FetcherProcess(daemon, "binary-cache", "late", 30, {"url": server.url})
        fetchers.append(late.start())
        wait_for_fetcher(daemon, nix.env, late)
        found = httpx.get(f"{daemon.url}/{top}.narinfo", timeout=PATIENCE)
        assert found.status_code == 200, found.text + daemon.log()
        assert f"StorePath: {cache.top}\n" in found.text


def test_fetcher_reattaches_after_the_daemon_restarts(
    nix: Nix, cache: BuiltCache, tmp_path: Path, serve_cache, fetchers: list[FetcherProcess]
) -> None:
    server = serve_cache(cache.root)
    daemon = DaemonProcess(tmp_path, daemon_config(cache.public_key), nix.env)
    with daemon:
        remote = FetcherProcess(daemon, "binary-cache", "steady", 30, {"url": server.url})
        fetchers.append(remote.start())
        wait_for_fetcher(daemon, nix.env, remote)
    # Same state dir: same key, so the capability the fetcher holds is still good.
    with daemon:
        wait_for_fetcher(daemon, nix.env, remote)
        assert remote.proc is not None and remote.proc.poll() is None
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log() + remote.log()
        assert_intact(nix, store, cache.paths)
