"""`substituter fetch` next to `nix copy --from file://` for the same closure.

    .venv/bin/python bench/fetch_bench.py [--paths 200] [--compression zstd] [--runs 3]
        [--no-chroot] [--no-daemon] [--keep DIR] [--against CHECKOUT]

A closure of --paths small paths (`builtins.toFile` texts with real references, as in
daemon_bench.py) is signed and published with `nix copy --to file://DIR?compression=…`. Then, each
into a fresh store, median of --runs:

  chroot:  `substituter fetch --store DIR` (local-mirror fetcher on the cache directory)
           against `nix copy --from file://DIR --to DIR`
  daemon:  the same into a fresh private nix-daemon (untrusted client, the cache's key trusted):
           `substituter fetch --store unix://SOCK` against `nix copy --to unix://SOCK`

With --against CHECKOUT (another checkout of this project, e.g. a `git worktree` of an older
commit), that checkout's `substituter fetch` runs in the same rounds too, the order of the two
alternating from round to round: an A/B comparison on a shared, noisy machine.

Every run gets a fresh state dir (empty NAR cache), XDG_CACHE_HOME and store; the result is
checked with `nix-store --check-validity`.  The checkout's modules are byte-compiled first, as an
installed package is: with PYTHONDONTWRITEBYTECODE set (as in some shells), every run would
otherwise compile them from source again (~0.1 s).  Not a test: it prints figures, it does not
pass or fail.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from daemon_bench import REPO, Fixtures, NixRunner, Published, remove_tree, settle

from tests.nixdaemon import private_daemon


class Timing(NamedTuple):
    wall: float  # seconds
    cpu: float  # user + system seconds of the command and every child it waited for


#: Copies the published closure into a store spec.
Copier = Callable[[NixRunner, Published, str], Timing]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(args: list[str], env: dict[str, str], cwd: Path | None = None) -> Timing:
    settle()
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} … failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return Timing(seconds, _children_cpu() - cpu)


def fetch_config(nix: NixRunner, pub: Published) -> Path:
    """A fresh config: new state dir (so an empty NAR cache), the cache as a local mirror."""
    home = nix.fresh_dir("fetch")
    home.mkdir()
    config = home / "config.json"
    config.write_text(json.dumps({
        "trusted-public-keys": [pub.public_key],
        "state-dir": str(home / "state"),
        "log-level": "warning",
        "fetchers": [{"type": "local-mirror", "name": "mirror", "path": str(pub.cache)}],
    }))
    return config


def ours_in(checkout: Path) -> Copier:
    """`substituter fetch` of ``checkout``: run from there, `python -m` imports its modules."""
    def copier(nix: NixRunner, pub: Published, store: str) -> Timing:
        config = fetch_config(nix, pub)
        args = [sys.executable, "-m", "substituter", "fetch", "--config", str(config), "--store", store, pub.top]
        timing = timed(args, nix.fresh_env(), cwd=checkout)
        remove_tree(config.parent)
        return timing
    return copier


ours = ours_in(REPO)


def check_checkout(checkout: Path) -> None:
    """``checkout``'s own modules are the ones its runs import (not this checkout's)."""
    code = "import substituter, fetchers.local_mirror as m; print(substituter.__file__); print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True,
                         check=True).stdout.split()
    if not all(Path(f).resolve().is_relative_to(checkout.resolve()) for f in out):
        raise SystemExit(f"--against {checkout}: its runs would import {out}, not its own modules")


def nix_copy(nix: NixRunner, pub: Published, store: str) -> Timing:
    args = ["nix", "copy", "--from", f"file://{pub.cache}", "--to", store,
            "--option", "trusted-public-keys", pub.public_key, pub.top]
    return timed(args, nix.fresh_env())


def into_chroot(nix: NixRunner, pub: Published, copier: Copier) -> Timing:
    store = nix.fresh_dir("store")
    timing = copier(nix, pub, str(store))
    nix.run("nix-store", "--store", str(store), "--check-validity", *pub.paths)
    remove_tree(store)
    return timing


def into_daemon(nix: NixRunner, pub: Published, copier: Copier) -> Timing:
    root = nix.fresh_dir("nix-daemon")
    with private_daemon(root, trusted=False, trusted_public_keys=[pub.public_key]) as daemon:
        timing = copier(nix, pub, daemon.store_url)
        nix.run("nix-store", "--store", daemon.store_url, "--check-validity", *pub.paths)
    remove_tree(root)
    return timing


#: The modules a `substituter fetch` with a local mirror imports before any work.
FETCH_MODULES = ("substituter.cli", "substituter.fetch", "substituter.store.daemon_client",
                 "substituter.runtime", "substituter.trust", "fetchers.local_mirror")


def startup_seconds(nix: NixRunner) -> tuple[float, float, float]:
    """What a `substituter fetch` costs before any work: the bare interpreter, `fetch --help`,
    and the interpreter with every module a fetch imports (best of 5 each)."""
    def best(args: list[str]) -> float:
        return min(timed([sys.executable, *args], nix.env).wall for _ in range(5))

    # os._exit: without the interpreter's teardown, as a fetch ends.
    return (best(["-c", "import os; os._exit(0)"]), best(["-m", "substituter", "fetch", "--help"]),
            best(["-c", f"import os, {', '.join(FETCH_MODULES)}; os._exit(0)"]))


def print_row(label: str, ours_runs: list[Timing], nix_runs: list[Timing]) -> None:
    a, b = statistics.median(t.wall for t in ours_runs), statistics.median(t.wall for t in nix_runs)
    ca, cb = statistics.median(t.cpu for t in ours_runs), statistics.median(t.cpu for t in nix_runs)
    print(f"{label:<26} {a:>7.2f} {b:>7.2f} {a / b:>6.2f}  {ca:>8.2f} {cb:>8.2f}   "
          f"{' '.join(f'{t.wall:.2f}' for t in ours_runs)} / {' '.join(f'{t.wall:.2f}' for t in nix_runs)}")


def byte_compile(checkout: Path = REPO) -> None:
    """Write the bytecode an installed package would have (compileall writes it even when
    PYTHONDONTWRITEBYTECODE is set; Python still reads it)."""
    dirs = [str(checkout / name) for name in ("substituter", "fetchers", "plugins") if (checkout / name).is_dir()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", type=int, default=200)
    parser.add_argument("--compression", choices=["zstd", "xz", "none"], default="zstd")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-chroot", action="store_true", help="skip the chroot-store part")
    parser.add_argument("--no-daemon", action="store_true", help="skip the nix-daemon part")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument("--against", type=Path, metavar="CHECKOUT",
                        help="also run this other checkout's fetch, interleaved (A/B)")
    opts = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` blocks

    byte_compile()
    other: Copier | None = None
    if opts.against is not None:
        check_checkout(opts.against)
        byte_compile(opts.against)
        other = ours_in(opts.against)
    work = opts.keep or Path(tempfile.mkdtemp(prefix="fetch-bench-"))
    work.mkdir(exist_ok=True)
    nix = NixRunner(work)
    fx = Fixtures(nix, work)
    try:
        top, _ = fx.text_closure(opts.paths)
        pub = fx.publish(f"closure-{opts.paths}", top, opts.compression)
        assert len(pub.paths) == opts.paths, f"closure has {len(pub.paths)} paths"
        bare, help_, modules = startup_seconds(nix)
        print(f"{len(pub.paths)}-path closure, file:// cache compression={opts.compression} "
              f"({REPO.name} checkout)\nstart-up: bare interpreter {bare:.3f} s, `fetch --help` {help_:.3f} s, "
              f"interpreter + a fetch's imports {modules:.3f} s\n")
        print(f"{'into':<26} {'ours s':>7} {'nix s':>7} {'ratio':>6}  {'ours cpu':>8} {'nix cpu':>8}"
              "   ours runs / nix runs")
        targets = [("chroot store (DIR)", into_chroot, not opts.no_chroot),
                   ("private nix-daemon (unix)", into_daemon, not opts.no_daemon)]
        for label, into, enabled in targets:
            if not enabled:
                continue
            ours_runs: list[Timing] = []
            nix_runs: list[Timing] = []
            other_runs: list[Timing] = []
            for i in range(opts.runs):
                nix_runs.append(into(nix, pub, nix_copy))
                if other is None:
                    ours_runs.append(into(nix, pub, ours))
                elif i % 2 == 0:  # each first in every other round
                    ours_runs.append(into(nix, pub, ours))
                    other_runs.append(into(nix, pub, other))
                else:
                    other_runs.append(into(nix, pub, other))
                    ours_runs.append(into(nix, pub, ours))
            print_row(label, ours_runs, nix_runs)
            if other is not None:
                print_row(f"  --against {opts.against.name}"[:26], other_runs, nix_runs)
        print("ratio = substituter fetch time / nix copy time (target <= 1.2); cpu = user + system "
              "seconds of the command and its children (for unix://, not the shared daemon's); "
              "medians")
    finally:
        fx.delete_built()
        if opts.keep is None:
            remove_tree(work)


if __name__ == "__main__":
    main()
