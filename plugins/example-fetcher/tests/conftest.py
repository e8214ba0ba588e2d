"""Fixtures: store paths built and signed by real Nix, and a loopback Bazel-style cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cas_server import CasServer
from substituter.nix.narinfo import NarInfo

from substituter_bazel_cas import index_key

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Private settings: no sandbox or build users (tests may run unprivileged), no substituters.
NIX_CONFIG = """\
experimental-features = nix-command
sandbox = false
build-users-group =
substituters =
"""


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("nix") is None:
        return
    for tool in ("nix-build", "nix-store", "nix"):
        if shutil.which(tool) is None:
            message = f"{tool} not found on PATH"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)


def run(env: dict[str, str], *args: str) -> bytes:
    proc = subprocess.run(list(args), env=env, capture_output=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stderr.decode(errors='replace')}")
    return proc.stdout


@dataclass(frozen=True)
class Published:
    """A closure built by Nix, its signed narinfos (``index_dir``) and NARs (``nars``)."""

    top: str
    paths: list[str]
    index_dir: Path
    public_key: str
    nars: dict[str, bytes]  # store path -> `nix-store --dump` output

    def narinfo(self, path: str) -> NarInfo:
        return NarInfo.parse((self.index_dir / f"{hash_part(path)}.narinfo").read_bytes())


def hash_part(path: str) -> str:
    return Path(path).name[:32]


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    tmp = tmp_path_factory.mktemp("nix")
    env = dict(os.environ, NIX_CONFIG=NIX_CONFIG, XDG_CACHE_HOME=str(tmp / "xdg-cache"))
    env.pop("NIX_REMOTE", None)
    stamp = time.time_ns()
    expr = tmp / "closure.nix"
    expr.write_text(
        f"""
        let dep = derivation {{
          name = "bazel-cas-dep"; system = builtins.currentSystem; builder = "/bin/sh";
          args = [ "-c" "mkdir -p $out/bin; echo {stamp} > $out/data; ln -s data $out/link;
                         printf '#!/bin/sh' > $out/bin/x; chmod +x $out/bin/x" ];
          PATH = "/usr/bin:/bin";
        }};
        in derivation {{
          name = "bazel-cas-top"; system = builtins.currentSystem; builder = "/bin/sh";
          args = [ "-c" "echo ${{dep}} {stamp} > $out" ];
          PATH = "/usr/bin:/bin";
        }}
        """
    )
    top = run(env, "nix-build", str(expr), "--no-out-link").decode().strip()
    paths = run(env, "nix-store", "-qR", top).decode().split()
    sk, pk = tmp / "sk", tmp / "pk"
    key_name = f"bazel-cas-test-{stamp}"
    run(env, "nix-store", "--generate-binary-cache-key", key_name, str(sk), str(pk))
    index_dir = tmp / "index"
    # Real Nix writes and signs the narinfos; the NAR files it writes beside them are not used.
    run(env, "nix", "copy", "--to", f"file://{index_dir}?compression=none&secret-key={sk}", *paths)
    nars = {path: run(env, "nix-store", "--dump", path) for path in paths}
    return Published(top, paths, index_dir, pk.read_text().strip(), nars)


@asynccontextmanager
async def serving(server: CasServer) -> AsyncIterator[CasServer]:
    """Serve ``server`` on an ephemeral loopback port (its ``url`` is set) until exit."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def cas() -> AsyncIterator[CasServer]:
    """An empty cache server."""
    async with serving(CasServer()) as server:
        yield server


@pytest.fixture
def filled_cas(cas: CasServer, published: Published) -> CasServer:
    """The cache holding every published path: NARs in the CAS, narinfos in the action cache."""
    for path in published.paths:
        cas.put_blob(published.nars[path])
        cas.ac[index_key(hash_part(path))] = published.narinfo(path).to_bytes()
    return cas
