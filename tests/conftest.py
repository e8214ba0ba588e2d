"""Shared fixtures: real Nix in a private environment, and tool requirements.

Outside CI a missing tool skips the tests that need it (with the reason); with CI=true a
missing tool is a failure, because the README's test command installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Shared fixtures live in their own modules: `serve_cache`, `nix_daemon_factory`,
# `syndicate_server`.
pytest_plugins = ["tests.cache_server", "tests.nixdaemon", "tests.syndicate_server"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
os.environ["PATH"] = f"{Path.home() / '.cargo' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"

TOOLS_BY_MARKER = {
    "nix": ["nix-store", "nix"],
    "daemon": ["nix-daemon"],
    "syndicate_server": ["syndicate-server"],
}


def require_tool(name: str) -> str:
    """Return the tool's path; skip (or fail in CI) when it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (the README's `make test` installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, tools in TOOLS_BY_MARKER.items():
        if item.get_closest_marker(marker) is not None:
            for tool in tools:
                require_tool(tool)


NIX_SETTINGS = "\n".join(
    [
        "experimental-features = nix-command",
        "sandbox = false",
        "build-users-group =",
        "substituters =",
        "narinfo-cache-negative-ttl = 0",
        "narinfo-cache-positive-ttl = 0",
    ]
)


@pytest.fixture
def nix_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running real Nix commands without touching shared caches."""
    env = dict(os.environ)
    env["NIX_CONFIG"] = NIX_SETTINGS
    cache = tmp_path / "xdg-cache"
    cache.mkdir(exist_ok=True)
    env["XDG_CACHE_HOME"] = str(cache)
    env.pop("NIX_REMOTE", None)
    return env


class Nix:
    """Runs real Nix commands in a private environment; raises with stderr on failure."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.tmp = tmp

    def run(self, *args: str, input: bytes | None = None) -> bytes:
        proc = subprocess.run(
            list(args), env=self.env, input=input, capture_output=True, check=False
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')}"
            )
        return proc.stdout

    def text(self, *args: str) -> str:
        return self.run(*args).decode().strip()

    def build(self, expr: str) -> list[str]:
        """Build a Nix expression (string) and return its output paths."""
        f = self.tmp / f"expr-{time.monotonic_ns()}.nix"
        f.write_text(expr)
        return self.text("nix-build", str(f), "--no-out-link").split()

    def closure(self, name: str = "closure", n_deps: int = 2) -> tuple[str, list[str]]:
        """Build a fresh closure (top path with `n_deps` real references); return (top, all paths)."""
        stamp = time.time_ns()
        lines = []
        for i in range(n_deps):
            lines.append(
                f'd{i} = derivation {{ name = "{name}-dep{i}"; system = builtins.currentSystem; '
                f'builder = "/bin/sh"; args = [ "-c" "mkdir -p $out/sub; echo dep{i} {stamp} > $out/f; '
                f'printf x > $out/sub/exe; chmod +x $out/sub/exe; ln -s f $out/link" ]; '
                f'PATH = "/usr/bin:/bin"; stamp = "{stamp}"; }};'
            )
        refs = " ".join(f"${{d{i}}}" for i in range(n_deps))
        expr = (
            "let " + "\n".join(lines) + "\nin derivation { "
            f'name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; '
            f'args = [ "-c" "mkdir -p $out; echo {refs} > $out/refs; echo {stamp} > $out/stamp" ]; '
            f'PATH = "/usr/bin:/bin"; stamp = "{stamp}"; }}'
        )
        top = self.build(expr)[0]
        paths = self.text("nix-store", "-qR", top).split()
        return top, paths


@pytest.fixture
def nix(nix_env: dict[str, str], tmp_path: Path) -> Nix:
    require_tool("nix-store")
    return Nix(nix_env, tmp_path)


@pytest.fixture
def nix_keys(nix: Nix, tmp_path: Path) -> tuple[Path, Path, str]:
    """A fresh Nix signing key pair: (secret key file, public key file, public key string)."""
    sk, pk = tmp_path / "sk", tmp_path / "pk"
    nix.run("nix-store", "--generate-binary-cache-key", f"test-{time.time_ns()}", str(sk), str(pk))
    return sk, pk, pk.read_text().strip()


@pytest.fixture
def fetchers() -> Iterator[list[Any]]:
    """Collects out-of-process fetchers a test starts (anything with ``stop()``), so each is
    stopped when the test ends."""
    started: list[Any] = []
    yield started
    for f in started:
        f.stop()
