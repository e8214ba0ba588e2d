"""A private nix-daemon for tests: its own store root, socket, state and NIX_CONF_DIR.

Use the context manager directly::

    with private_daemon(tmp_path / "d", trusted=False, trusted_public_keys=[pk]) as daemon:
        store = await DaemonStore.connect(daemon.store_url)

or the factory fixture (import it into your test module: ``from tests.nixdaemon import
nix_daemon_factory``), which stops every daemon it started at the end of the test::

    def test_x(nix_daemon_factory):
        daemon = nix_daemon_factory(trusted=True)

The test process runs as root; ``trusted=True`` writes ``trusted-users = root``, ``False``
writes ``trusted-users = nobody`` (root then connects as an ordinary allowed user).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from substituter.store.base import PathInfo
from tests.conftest import Nix, require_tool

__all__ = [
    "DumpedPath",
    "PrivateDaemon",
    "dump_closure",
    "nix_daemon_factory",
    "private_daemon",
    "stream_file",
]

STARTUP_TIMEOUT = 30.0


@dataclass
class PrivateDaemon:
    """A running private daemon. Paths land under ``store_root``/nix/store."""

    root: Path
    store_root: Path
    socket_path: Path
    conf_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def store_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def real_store_dir(self) -> Path:
        return self.store_root / "nix" / "store"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment in which Nix commands talk to this daemon (``--store daemon``)."""
        env = dict(os.environ if base is None else base)
        env["NIX_DAEMON_SOCKET_PATH"] = str(self.socket_path)
        env["NIX_REMOTE"] = self.store_url
        return env


def _daemon_conf(trusted: bool, trusted_public_keys: Sequence[str], extra: str) -> str:
    lines = [
        "experimental-features = nix-command",
        "sandbox = false",
        "build-users-group =",
        "substituters =",
        f"trusted-users = {'root' if trusted else 'nobody'}",
        "allowed-users = *",
        "require-sigs = true",
        f"trusted-public-keys = {' '.join(trusted_public_keys)}",
    ]
    return "\n".join(lines) + "\n" + extra


def _wait_until_serving(daemon: PrivateDaemon, env: dict[str, str]) -> None:
    # A complete client session (not just a connect) so that the fresh store's database
    # is created before tests connect; two first sessions at once can see "database busy".
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"nix-daemon exited at start:\n{daemon.log()}")
        if daemon.socket_path.exists():
            ping = subprocess.run(
                ["nix", "store", "ping", "--store", daemon.store_url],
                env=env,
                capture_output=True,
                check=False,
            )
            if ping.returncode == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nix-daemon did not serve within {STARTUP_TIMEOUT}s:\n{daemon.log()}")


def _stop(daemon: PrivateDaemon) -> None:
    if daemon.alive():
        # The daemon forks one child per connection into its own process group.
        os.killpg(daemon.process.pid, signal.SIGTERM)
        try:
            daemon.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.process.pid, signal.SIGKILL)
            daemon.process.wait()


@contextmanager
def private_daemon(
    root: Path,
    *,
    trusted: bool,
    trusted_public_keys: Sequence[str] = (),
    extra_conf: str = "",
    nix_daemon: str = "nix-daemon",
) -> Iterator[PrivateDaemon]:
    """Start a nix-daemon on ``root``/sock with store ``root``/store; stop it on exit."""
    root.mkdir(parents=True, exist_ok=True)
    conf_dir = root / "conf"
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / "nix.conf").write_text(_daemon_conf(trusted, trusted_public_keys, extra_conf))
    store_root = root / "store"
    socket_path = root / "sock"
    log_path = root / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update(
        NIX_CONF_DIR=str(conf_dir),
        NIX_USER_CONF_FILES=str(conf_dir / "no-user.conf"),
        NIX_DAEMON_SOCKET_PATH=str(socket_path),
        XDG_CACHE_HOME=str(root / "xdg-cache"),
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [nix_daemon, "--store", str(store_root)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    daemon = PrivateDaemon(root, store_root, socket_path, conf_dir, log_path, process)
    try:
        _wait_until_serving(daemon, env)
        yield daemon
    finally:
        _stop(daemon)


@pytest.fixture
def nix_daemon_factory(tmp_path: Path) -> Iterator[Callable[..., PrivateDaemon]]:
    """Start private daemons (keyword arguments as for ``private_daemon``); all are stopped
    when the test ends."""
    require_tool("nix-daemon")
    with ExitStack() as running:
        count = 0

        def start(**kwargs: Any) -> PrivateDaemon:
            nonlocal count
            count += 1
            return running.enter_context(private_daemon(tmp_path / f"daemon-{count}", **kwargs))

        yield start


@dataclass(frozen=True)
class DumpedPath:
    """A path of a built closure: its metadata as Nix reports it, and its NAR on disk."""

    info: PathInfo
    nar: Path


def dump_closure(
    nix: Nix, top: str, directory: Path, *, key_file: Path | None = None
) -> list[DumpedPath]:
    """Dump the closure of ``top`` with ``nix-store --dump``, dependencies first.

    With ``key_file`` the paths are signed first (``nix store sign``), so the infos carry
    the signatures ``nix path-info --json`` reports.
    """
    if key_file is not None:
        nix.run("nix", "store", "sign", "--key-file", str(key_file), "-r", top)
    entries = {e["path"]: e for e in json.loads(nix.run("nix", "path-info", "--json", "-r", top))}
    ordered: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        for reference in entries[path].get("references", []):
            if reference != path:
                visit(reference)
        ordered.append(path)

    for path in sorted(entries):
        visit(path)
    directory.mkdir(parents=True, exist_ok=True)
    dumped = []
    for path in ordered:
        entry = entries[path]
        nar = directory / (Path(path).name + ".nar")
        nar.write_bytes(nix.run("nix-store", "--dump", path))
        info = PathInfo(
            store_path=path,
            nar_hash=entry["narHash"],
            nar_size=entry["narSize"],
            references=frozenset(entry.get("references", [])),
            deriver=entry.get("deriver"),
            sigs=frozenset(entry.get("signatures", [])),
            ca=entry.get("ca"),
        )
        dumped.append(DumpedPath(info, nar))
    return dumped


async def stream_file(path: Path, chunk_size: int = 4096) -> AsyncIterator[bytes]:
    """A file as an async stream of chunks (small ones, so NARs span many frames)."""
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk
