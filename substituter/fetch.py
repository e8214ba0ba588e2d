"""`substituter fetch`: get a closure, verified, from wherever it is, into a Nix store, now.

1. Resolve the closure from the narinfos' references, asking the broker for every path at once
   (all fetchers in parallel); skip what the store already has.
2. Download every missing NAR in parallel, verified against its signed NarHash/NarSize, into the
   local NAR cache (a corrupt source is replaced by the next one there).
3. Import in topological order, references first, streaming from the cache through the nix-daemon
   worker protocol (signatures and CA travel with each path): to a daemon's socket, or for a
   chroot DIR to our own `nix-daemon --stdio --store DIR` (one process for every query and the
   import).  A path is either fully imported and valid, or absent.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .errors import FetchError, FormatError, StoreError, SubstituterError
from .nix.store_path import StorePath, validate_hash_part
from .store.base import PathInfo, Store

if TYPE_CHECKING:  # imported where used: `run_fetch` starts a chroot's daemon before them
    from .broker import Resolution
    from .nix.narinfo import NarInfo
    from .store.daemon_client import StartedDaemon

__all__ = ["FetchPlan", "Progress", "fetch_closure", "open_store", "parse_targets", "start_store"]

log = logging.getLogger("substituter.fetch")

#: NARs up to this size go from the verified transfer straight into the import, in memory.
IN_MEMORY_NAR = 1024 * 1024


def parse_targets(args: Iterable[str], store_dir: str) -> list[str]:
    """Hash parts from ``/nix/store/…`` paths (sub-paths allowed), base names or bare hash parts."""
    hashes = []
    for arg in args:
        text = arg.rstrip("/")
        if text.startswith(store_dir + "/"):
            text = text[len(store_dir) + 1:].split("/", 1)[0]
        try:
            if len(text) == 32:
                hashes.append(validate_hash_part(text))
            else:
                hashes.append(StorePath.parse(text, store_dir).hash_part)
        except FormatError as exc:
            raise FormatError(f"{arg!r} is not a store path or hash part: {exc}") from exc
    return hashes


def _chroot_root(spec: str) -> Path | None:
    if spec.startswith(("/", "./", "../")) or spec.startswith("local?root="):
        return Path(spec.removeprefix("local?root=")).resolve()
    return None


def start_store(spec: str, env: dict[str, str] | None = None) -> StartedDaemon | None:
    """For a directory, start its ``nix-daemon --stdio`` now (pass it to :func:`open_store`)."""
    from .store.daemon_client import DaemonStore

    root = _chroot_root(spec)
    return None if root is None else DaemonStore.start(root, env=env)


async def open_store(spec: str, store_dir: str, env: dict[str, str] | None = None,
                     started: StartedDaemon | None = None) -> Store:
    """``daemon`` (the system nix-daemon), ``unix://SOCKET``, or a directory (a chroot store,
    written through our own ``nix-daemon --stdio --store DIR``, perhaps ``started`` already)."""
    from .store.daemon_client import DaemonStore

    if spec == "daemon" or spec.startswith("unix://"):
        return await DaemonStore.connect(None if spec == "daemon" else spec, store_dir=store_dir)
    root = _chroot_root(spec)
    if root is not None:
        return await DaemonStore.spawn(root, store_dir=store_dir, env=env, started=started)
    raise FormatError(f"--store {spec!r}: use daemon, unix://SOCKET or a directory")


def resolved_info(res: Resolution) -> NarInfo:
    """The narinfo of a path the plan holds (the plan keeps only resolved paths)."""
    assert res.info is not None
    return res.info


def to_path_info(info: NarInfo) -> PathInfo:
    return PathInfo(
        store_path=info.store_path,
        nar_hash=str(info.nar_hash),
        nar_size=info.nar_size,
        references=frozenset(info.reference_paths()),
        deriver=f"{info.store_dir}/{info.deriver}" if info.deriver else None,
        sigs=frozenset(info.sigs),
        ca=info.ca,
    )


@dataclass
class FetchPlan:
    """The closure to import: resolutions by hash part, and what went wrong."""

    resolutions: dict[str, Resolution] = field(default_factory=dict)
    present: dict[str, str] = field(default_factory=dict)  # hash part -> store path, already valid
    missing: dict[str, str] = field(default_factory=dict)  # hash part -> why

    def topological(self) -> list[Resolution]:
        """Paths to import, every path after its references."""
        order: list[Resolution] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(hash_part: str) -> None:
            if hash_part in done or hash_part not in self.resolutions:
                return
            if hash_part in visiting:
                raise FormatError(f"reference cycle through {hash_part}")
            visiting.add(hash_part)
            for ref in resolved_info(self.resolutions[hash_part]).references:
                ref_hash = ref[:32]
                if ref_hash != hash_part:
                    visit(ref_hash)
            visiting.discard(hash_part)
            done.add(hash_part)
            order.append(self.resolutions[hash_part])

        for hash_part in sorted(self.resolutions):
            visit(hash_part)
        return order


class Progress:
    """Paths and bytes: a one-line bar on a terminal, a plain log line per path otherwise."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self.tty = out.isatty()
        self.paths_total = 0
        self.paths_done = 0
        self.bytes_total = 0
        self.bytes_done = 0
        self._last = 0.0

    def add_bytes(self, n: int) -> None:
        self.bytes_done += n
        now = time.monotonic()
        if self.tty and now - self._last > 0.1:
            self._last = now
            self._bar()

    def path_done(self, store_path: str, what: str) -> None:
        self.paths_done += 1
        if self.tty:
            self._bar()
        else:
            print(f"{what} {store_path}", file=self.out, flush=True)

    def _bar(self) -> None:
        mib = self.bytes_done / 2**20
        total = self.bytes_total / 2**20
        print(f"\r[{self.paths_done}/{self.paths_total} paths, {mib:.1f}/{total:.1f} MiB]",
              end="", file=self.out, flush=True)

    def finish(self) -> None:
        if self.tty:
            print(file=self.out, flush=True)


async def resolve_closure(runtime: Any, store: Store, roots: list[str], store_dir: str) -> FetchPlan:
    """Ask for every path of the closure, level by level (each level all at once)."""
    plan = FetchPlan()
    seen: set[str] = set(roots)
    frontier = list(roots)
    checked: dict[str, str] = {}  # hash part -> the path whose validity the store was asked
    while frontier:
        results = await asyncio.gather(*(runtime.broker.resolve(h, "fetch") for h in frontier))
        found = {r.hash_part: r for r in results if r.info is not None}
        for r in results:
            if r.info is None:
                plan.missing[r.hash_part] = r.reason
        # Paths reached as references were checked below already (as ``store_dir/ref``); only
        # the roots, and a path whose narinfo names it differently, need asking here.
        unchecked = [r.info.store_path for h, r in found.items() if checked.get(h) != r.info.store_path]
        valid = await store.query_valid_paths(unchecked) if unchecked else set()
        wanted_refs: dict[str, str] = {}  # hash part -> full path, references not yet seen
        for hash_part, res in found.items():
            if res.info.store_path in valid:
                plan.present[hash_part] = res.info.store_path  # a valid path's closure is valid too
                continue
            plan.resolutions[hash_part] = res
            for ref in res.info.references:
                if ref[:32] not in seen:
                    seen.add(ref[:32])
                    wanted_refs[ref[:32]] = f"{store_dir}/{ref}"
        # References the store already has (e.g. built locally) need no source at all.
        present = await store.query_valid_paths(wanted_refs.values()) if wanted_refs else set()
        checked = wanted_refs
        plan.present.update((h, path) for h, path in wanted_refs.items() if path in present)
        frontier = [h for h, path in wanted_refs.items() if path not in present]
    return plan


async def fetch_closure(runtime: Any, store: Store, roots: list[str], *, jobs: int = 8,
                        progress: Progress | None = None) -> tuple[FetchPlan, dict[str, str]]:
    """Fetch and import; returns the plan and failures by store path (empty when all went in)."""
    from preserves import Record, Symbol
    from syndicate import turn

    from . import turns

    progress = progress or Progress()
    plan = await resolve_closure(runtime, store, roots, runtime.config.store_dir)
    order = plan.topological()
    progress.paths_total = len(order)
    progress.bytes_total = sum(resolved_info(r).nar_size for r in order)
    failures: dict[str, str] = {}
    if plan.missing:
        return plan, failures
    add_temp_root = getattr(store, "add_temp_root", None)
    if add_temp_root is not None:
        # What is already there must survive a garbage collection until its referrers are in.
        for path in plan.present.values():
            await add_temp_root(path)

    limit = asyncio.Semaphore(jobs)

    def realised(path: str) -> None:
        """Tell the dataspace (and whoever watches it) that the path is now in this store."""
        record = Record(Symbol("realised"), (path, store_label))  # preserve(Realised(…)), built directly
        turns.external(runtime.facet, lambda: turn.publish(runtime.ds, record))

    store_label = getattr(store, "root", None) or getattr(store, "socket_path", None) or "store"

    async def download(res: Resolution) -> bytes | None:
        """Small NARs: the verified bytes, kept in memory (no cache file written and read back);
        the download slot stays taken until the import took them, so at most ``jobs`` wait.
        Larger NARs (or ones already cached): spooled into the verified cache, read back below."""
        info = resolved_info(res)
        if info.nar_size <= IN_MEMORY_NAR and not runtime.nars.cached(info.nar_hash.nix32()):
            await limit.acquire()  # released in verified() (or here on failure)
            try:
                data: bytes = await runtime.nars.verified_bytes(res)
            except BaseException:
                limit.release()
                raise
            progress.add_bytes(len(data))
            return data
        async with limit:
            async for chunk in runtime.nars.stream(res, 0):
                progress.add_bytes(len(chunk))
        return None

    # Started in import order: slots are taken in that order, so the path the import needs next
    # always holds one or already has its bytes (no wait on memory held by later paths).
    downloads = {r.hash_part: asyncio.ensure_future(download(r)) for r in order}

    async def verified(res: Resolution) -> AsyncIterator[bytes]:
        """The path's verified NAR, once its download finished: from memory or the cache."""
        try:
            data = await downloads[res.hash_part]
            if data is not None:
                del downloads[res.hash_part]  # drop the finished task's reference to the bytes
                limit.release()
                yield data
            else:
                async for chunk in runtime.nars.stream(res, 0):
                    yield chunk
        except (FetchError, SubstituterError) as exc:
            failures[resolved_info(res).store_path] = str(exc)
            raise
        progress.path_done(resolved_info(res).store_path, "imported")
        realised(resolved_info(res).store_path)

    try:
        # One AddMultipleToStore for the whole closure: references come first, each path is
        # registered whole or not at all.  A private chroot store (our own daemon) trusts what
        # the broker's TrustPolicy accepted; a shared daemon checks signatures itself too.
        await store.add_multiple_to_store(((to_path_info(resolved_info(r)), verified(r)) for r in order),
                                          dont_check_sigs=getattr(store, "private", False))
    except (FetchError, StoreError, SubstituterError) as exc:
        if not failures:
            failures["(import)"] = str(exc)
    finally:
        for task in downloads.values():
            task.cancel()
        await asyncio.gather(*downloads.values(), return_exceptions=True)
        progress.finish()
    return plan, failures


def run_fetch(config: Any, targets: list[str], store_spec: str, *, jobs: int = 8,
              require_sigs: bool = True, out: TextIO = sys.stderr,
              started: StartedDaemon | None = None) -> int:
    """The whole `substituter fetch`: returns the exit code (0 all present, 1 failures).
    ``started``: the chroot's daemon, when the caller started it already (:func:`start_store`)."""
    # A chroot's nix-daemon starts first and comes up while the rest is imported and set up.
    if started is None:
        try:
            started = start_store(store_spec)
        except SubstituterError as exc:
            print(f"error: {exc}", file=out)
            return 1
    try:
        return _run_fetch(config, targets, store_spec, started, jobs=jobs, require_sigs=require_sigs, out=out)
    finally:
        if started is not None:
            started.kill()  # only does something when nothing attached to it


def _run_fetch(config: Any, targets: list[str], store_spec: str, started: StartedDaemon | None, *,
               jobs: int, require_sigs: bool, out: TextIO) -> int:
    import signal

    from syndicate import actor, turn

    from .metrics import Metrics
    from .runtime import Runtime
    from .trust import TrustPolicy

    trust = TrustPolicy(config.trusted_public_keys, require_sigs=require_sigs)
    runtime = Runtime(config, trust=trust, spool_limit=2**63, durable_cache=False, remote_openers=False,
                      metrics=Metrics(enabled=False))  # nothing serves /metrics in a one-off fetch
    loop = asyncio.new_event_loop()
    result = {"code": 1}

    async def main(_facet: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, task.cancel)
            except (RuntimeError, ValueError):
                pass
        store: Store | None = None
        # The store (for a DIR, our own nix-daemon starting) comes up while the fetchers do.
        opening = asyncio.ensure_future(open_store(store_spec, config.store_dir, started=started))
        try:
            await runtime.start()
            store = await opening
            plan, failures = await fetch_closure(runtime, store, targets, jobs=jobs, progress=Progress(out))
            for hash_part, reason in sorted(plan.missing.items()):
                print(f"error: {hash_part}: not found: {reason}", file=out)
            for path, reason in failures.items():
                print(f"error: {path}: {reason}", file=out)
            if not plan.missing and not failures:
                n = len(plan.resolutions)
                print(f"{n} path(s) imported, {len(plan.present)} already present", file=out)
                result["code"] = 0
        except asyncio.CancelledError:
            print("interrupted: nothing partial was registered", file=out)
            result["code"] = 130
        except SubstituterError as exc:
            print(f"error: {exc}", file=out)
        except OSError as exc:
            print(f"error: {exc}", file=out)
        finally:
            if store is None:
                opening.cancel()
                await asyncio.wait([opening])
                if not opening.cancelled() and opening.exception() is None:
                    store = opening.result()  # opened while the runtime failed to start
            if store is not None:
                await store.close()
            await runtime.stop()

    def boot() -> None:
        runtime.boot()
        turn.linked_task()(main)

    actor.System(loop=loop).run(boot, name="fetch", configure_logging=False)
    return result["code"]
