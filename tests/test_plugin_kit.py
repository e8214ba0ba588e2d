"""The plugin author kit works as plugins/README.md says: install the example, and it is there.

A fresh venv gets the example distribution (plugins/example-fetcher) installed by pip, offline.
Its other dependencies (substituter itself, httpx, pytest, ...) come from the venv running these
tests, made visible with a ``.pth`` file rather than reinstalled: fast, offline and the same code.
Then, from that venv: ``substituter plugins`` lists the plugin, its own tests pass, and a real
``substituter daemon`` with a ``bazel-cas`` fetcher table serves a closure to ``nix copy``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from substituter.errors import ConfigError
from substituter.plugin import Fetcher, Offer, Unavailable, parse_options

from .cache_server import CacheServer, build_cache
from .conftest import Nix
from .helpers import make_info, make_nar

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "example-fetcher"
DISTRIBUTION = "substituter-example-fetcher"
HASH = "0" * 32

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: The example's build backend, which pip must find in the test venv to build offline.
BUILD_BACKEND = "setuptools"
BUILD_BACKEND_MINIMUM = (77,)


@dataclass(frozen=True)
class PluginVenv:
    root: Path
    python: Path
    source: Path  # the copy of the example that was installed (and whose tests are run)

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.python), *args], env=env, cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=timeout, check=False)


def require_offline_build_backend() -> None:
    """The example is built with --no-build-isolation: its backend must be installed here."""
    try:
        version = importlib.metadata.version(BUILD_BACKEND)
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    numbers = tuple(int(part) for part in version.split(".")[:1] if part.isdigit())
    if numbers < BUILD_BACKEND_MINIMUM:
        message = (
            f"building the example plugin offline needs {BUILD_BACKEND}>=77 in this venv "
            f"(found {version}); it belongs in the project's test extra"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _pip_env() -> dict[str, str]:
    # No index, no version check, no cache: pip must not reach for the network or ~/.cache.
    return dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1",
                PIP_NO_CACHE_DIR="1", PIP_NO_INPUT="1")


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> PluginVenv:
    """A new venv with the example plugin installed into it (not editable) by pip."""
    require_offline_build_backend()
    tmp = tmp_path_factory.mktemp("plugin-kit")
    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    # addsitedir (not a bare path line) so the project's editable-install hooks run there too.
    (Path(purelib) / "_substituter_deps.pth").write_text(f"import site; site.addsitedir({ours!r})\n")

    # Install from a copy: building in place would leave build/ and *.egg-info in the repo.
    source = tmp / "example-fetcher"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "__pycache__", ".pytest_cache", "build", "*.egg-info"))
    venv = PluginVenv(root, python, source)
    installed = venv.run("-m", "pip", "install", "--no-deps", "--no-build-isolation", str(source),
                         env=_pip_env())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def test_example_is_not_installed_in_the_project_venv() -> None:
    # The control for the tests below: only the fresh venv's install makes bazel-cas appear.
    listing = subprocess.run([sys.executable, "-m", "substituter", "plugins"],
                             capture_output=True, text=True, check=True).stdout
    assert "binary-cache" in listing
    assert "bazel-cas" not in listing


@pytest.mark.slow
def test_plugins_lists_the_installed_example(plugin_venv: PluginVenv) -> None:
    result = plugin_venv.run("-m", "substituter", "plugins")
    assert result.returncode == 0, result.stderr
    listing = result.stdout
    header = next((line for line in listing.splitlines() if line.startswith("bazel-cas")), None)
    assert header is not None, listing
    assert DISTRIBUTION in header and "substituter_bazel_cas:BazelCasFetcher" in header
    section = listing[listing.index(header):].split("\n\n")[0]
    for option in ("url=<str>", "index-url=", "index-dir=", "timeout=<float>", "check-blob=<bool>"):
        assert f"--option {option}" in section, section
    assert "default (required)" in section and "default 30.0" in section
    assert "opens: http, https" in section
    # The built-ins come from the core distribution, listed beside the plugin.
    assert any(line.startswith("binary-cache") and "(substituter " in line
               for line in listing.splitlines())


@pytest.mark.slow
def test_plugin_is_imported_from_the_install_not_the_source(plugin_venv: PluginVenv) -> None:
    result = plugin_venv.run("-c", "import substituter_bazel_cas as m; print(m.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(plugin_venv.root)


@pytest.mark.slow
@pytest.mark.nix
def test_the_examples_own_tests_pass_in_that_venv(plugin_venv: PluginVenv, nix_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    # Run from outside the source tree, so the tests import the installed plugin.
    result = plugin_venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(plugin_venv.source / "tests"), env=nix_env, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert " passed" in output and "skipped" not in output and "failed" not in output


# --- the example serving real Nix through a real daemon ----------------------------------------


def bazel_cache_from(nix: Nix, paths: list[str], narinfo_dir: Path, dest: Path) -> None:
    """Lay out a Bazel HTTP cache on disk: cas/<sha256 of NAR>, ac/<sha256 of hash part>."""
    (dest / "cas").mkdir(parents=True)
    (dest / "ac").mkdir()
    for path in paths:
        nar = nix.run("nix-store", "--dump", path)
        (dest / "cas" / hashlib.sha256(nar).hexdigest()).write_bytes(nar)
        hash_part = Path(path).name[:32]
        key = hashlib.sha256(hash_part.encode()).hexdigest()
        shutil.copyfile(narinfo_dir / f"{hash_part}.narinfo", dest / "ac" / key)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def venv_daemon(plugin_venv: PluginVenv, tmp_path: Path) -> Iterator[
        tuple[Path, Path, list[subprocess.Popen[bytes]]]]:
    """Start ``substituter daemon`` from the plugin venv; stops whatever was started."""
    started: list[subprocess.Popen[bytes]] = []
    yield plugin_venv.python, tmp_path / "daemon.log", started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_daemon(python: Path, log: Path, started: list[subprocess.Popen[bytes]],
                 config: dict[str, object], env: dict[str, str], tmp: Path) -> str:
    port = free_port()
    config = {"listen": f"127.0.0.1:{port}", "state-dir": str(tmp / "daemon-state"), **config}
    config_file = tmp / "daemon.json"
    config_file.write_text(json.dumps(config))
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(python), "-m", "substituter", "daemon", "--config", str(config_file)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    started.append(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/nix-cache-info", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"daemon did not start:\n{log.read_text()}")


@pytest.mark.slow
@pytest.mark.nix
def test_daemon_from_that_venv_serves_nix_through_bazel_cas(
    plugin_venv: PluginVenv, venv_daemon: tuple[Path, Path, list[subprocess.Popen[bytes]]],
    nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path,
) -> None:
    built = build_cache(nix, nix_keys, tmp_path / "file-cache", "none", name="bazel-kit")
    bazel_cache_from(nix, built.paths, built.root, tmp_path / "bazel")
    with CacheServer(tmp_path / "bazel") as cas:
        python, log, started = venv_daemon
        config = {"trusted-public-keys": [built.public_key],
                  "fetchers": [{"type": "bazel-cas", "name": "bazel", "url": cas.url, "timeout": 5}]}
        url = start_daemon(python, log, started, config, nix.env, tmp_path)
        store = tmp_path / "client-store"
        result = subprocess.run(
            ["nix", "copy", "--from", url, "--to", str(store), "--option", "trusted-public-keys",
             built.public_key, built.top], env=nix.env, capture_output=True, check=False)
        assert result.returncode == 0, result.stderr.decode() + log.read_text()
        nix.run("nix-store", "--store", str(store), "--check-validity", *built.paths)
        for path in built.paths:
            assert nix.run("nix-store", "--store", str(store), "--dump", path) == \
                nix.run("nix-store", "--dump", path)
        # The bytes came out of the CAS, through the plugin.
        blobs = [p for p in cas.paths_requested("GET") if p.startswith("cas/")]
        assert len(blobs) >= len(built.paths), cas.paths_requested("GET")


# --- the guide's own example -------------------------------------------------------------------


def guide_example_source() -> str:
    """The Python block under "A complete example" in plugins/README.md."""
    guide = (REPO / "plugins" / "README.md").read_text()
    section = guide.split("## A complete example", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_guides_complete_example_runs_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "guide_example.py"
    source.write_text(guide_example_source())
    spec = importlib.util.spec_from_file_location("guide_example", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "guide_example", module)  # dataclasses look it up there
    spec.loader.exec_module(module)
    fetcher_cls: Any = module.FlatDirFetcher
    assert issubclass(fetcher_cls, Fetcher) and fetcher_cls.kind == "flat-dir"

    nar = make_nar(tmp_path / "tree")
    info = make_info(nar, hash_part=HASH)
    cache = tmp_path / "flat"
    cache.mkdir()
    (cache / f"{HASH}.narinfo").write_bytes(info.to_bytes())
    (cache / f"{HASH}.nar").write_bytes(nar)

    options = parse_options(fetcher_cls.Options, {"path": str(cache)}, "guide")
    fetcher = fetcher_cls("flat", options)
    await fetcher.start()
    offer = await fetcher.locate(HASH)
    assert isinstance(offer, Offer) and offer.info == info
    assert b"".join([c async for c in fetcher.open(offer)]) == nar
    assert b"".join([c async for c in fetcher.open(offer, 1000)]) == nar[1000:]
    assert isinstance(await fetcher.locate("1" * 32), Unavailable)
    with pytest.raises(ConfigError, match="is not a directory"):
        await fetcher_cls("flat", parse_options(fetcher_cls.Options, {"path": "/nonexistent"},
                                                "guide")).start()
