"""`substituter fetch`: get a closure, verified, from wherever it is, into a Nix store, now.

Three things run at the same time, each path moving on as soon as its own step is done:
1. Resolve the closure from the narinfos' references, level by level, asking the broker for a
   whole level at once (all fetchers in parallel); skip what the store already has.
2. Download each resolved NAR (``--jobs`` at once), verified against its signed NarHash/NarSize
   (a corrupt source is replaced by the next one); small ones stay in memory until imported.
3. Import, whenever the store is free, every path whose references are in, in one
   AddMultipleToStore through the nix-daemon worker protocol (signatures and CA travel with
   each path): to a daemon's socket, or for a chroot DIR to our own
   `nix-daemon --stdio --store DIR`.  A path is either fully imported and valid, or absent.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable
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
#: At most this many bytes of such NARs wait in memory for their import; beyond, they spool.
MEMORY_BUDGET = 64 * 1024 * 1024


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
        nar_hash=info.nar_hash_text(),  # str(info.nar_hash), encoded once (the broker did)
        nar_size=info.nar_size,
        references=frozenset(info.reference_paths()),
        deriver=f"{info.store_dir}/{info.deriver}" if info.deriver else None,
        sigs=frozenset(info.sigs),
        ca=info.ca,
    )


@dataclass
class FetchPlan:
    """The closure as resolved so far: paths to import, paths already valid, and what is missing."""

    resolutions: dict[str, Resolution] = field(default_factory=dict)  # hash part -> to import
    present: dict[str, str] = field(default_factory=dict)  # hash part -> store path, already valid
    missing: dict[str, str] = field(default_factory=dict)  # hash part -> why


class ImportOrder:
    """Topological order, built while the closure is still being resolved (Kahn's algorithm).

    A path is ready once each of its references is done: valid in the store already, or handed
    out for import before it.  :meth:`take` hands out every ready path in an order where each
    comes after its references, so a batch can go into one AddMultipleToStore."""

    def __init__(self) -> None:
        self.done: set[str] = set()
        self._ready: deque[str] = deque()
        self._blocked: dict[str, int] = {}  # hash part -> references not done yet
        self._waiters: dict[str, list[str]] = {}  # reference -> paths blocked on it

    def add(self, hash_part: str, references: Iterable[str]) -> None:
        """A path to import, with the hash parts of its references (itself may be among them)."""
        blocking = {ref for ref in references if ref != hash_part and ref not in self.done}
        if not blocking:
            self._ready.append(hash_part)
            return
        self._blocked[hash_part] = len(blocking)
        for ref in blocking:
            self._waiters.setdefault(ref, []).append(hash_part)

    def mark_done(self, hash_part: str) -> None:
        """``hash_part`` is valid in the store (or will be before anything handed out later)."""
        if hash_part in self.done:
            return
        self.done.add(hash_part)
        for waiter in self._waiters.pop(hash_part, ()):
            self._blocked[waiter] -= 1
            if not self._blocked[waiter]:
                del self._blocked[waiter]
                self._ready.append(waiter)

    def take(self) -> list[str]:
        """Every path ready now (and those they unblock), references first."""
        batch = []
        while self._ready:
            hash_part = self._ready.popleft()
            batch.append(hash_part)
            self.mark_done(hash_part)
        return batch

    def blocked(self) -> list[str]:
        """Paths still waiting for a reference (never resolved, missing, or in a cycle)."""
        return sorted(self._blocked)


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


class _Fetch:
    """One closure's fetch: resolving, downloading and importing run at the same time.

    Resolution goes level by level (all of a level's paths asked at once), and each path is
    handled as soon as its own answer is in: its NAR download starts, and it joins the import
    order.  The importer sends, whenever the store is free, every path whose references are
    in, as one AddMultipleToStore (so the store works while the rest still resolves)."""

    def __init__(self, runtime: Any, store: Store | Awaitable[Store], jobs: int, progress: Progress) -> None:
        self.runtime = runtime
        #: The store, or its opening (resolution starts while, e.g., a chroot's daemon comes up).
        self._opening: asyncio.Future[Store] | None = None
        if isinstance(store, Store):
            self.store = store
        else:
            self._opening = asyncio.ensure_future(store)
        self.progress = progress
        self.plan = FetchPlan()
        self.order = ImportOrder()
        self.failures: dict[str, str] = {}
        self.resolved = False  # every level asked and answered
        self.store_failed = False  # the store could not be opened
        #: Next-level resolutions started before the level is known (references of roots).
        self._early: dict[str, asyncio.Future[Resolution]] = {}
        self._changed = asyncio.Event()  # something became ready, or resolution ended
        self._limit = asyncio.Semaphore(jobs)
        self._downloads: dict[str, asyncio.Future[bytes | None]] = {}
        self._held = 0  # bytes of verified NARs kept in memory until imported
        from preserves import Record, Symbol
        self._realised_label = Symbol("realised")
        self._record = Record

    # -- resolving ------------------------------------------------------------------------

    async def _store(self) -> Store:
        if self._opening is not None:
            try:
                self.store = await self._opening
            except BaseException:
                self.store_failed = True  # not an import failure: the caller reports it
                raise
            self._opening = None
        return self.store

    async def resolve(self, roots: list[str]) -> None:
        store_dir = self.runtime.config.store_dir
        seen: set[str] = set(roots)
        # Hash part -> the path to ask the store about: known for references (``store_dir/ref``),
        # not for roots (their name comes with the narinfo).
        frontier: dict[str, str | None] = dict.fromkeys(roots)
        while frontier:
            # A whole level is asked at once, and meanwhile the store is asked which of the
            # named paths it has already; the answers for those are dropped.
            asked = {h: self._early.pop(h, None) or asyncio.ensure_future(self.runtime.broker.resolve(h, "fetch"))
                     for h in frontier}
            try:
                frontier = dict(await self._resolve_level(frontier, asked, seen, store_dir))
            except BaseException:
                for task in self._early.values():
                    task.cancel()
                self._early.clear()
                raise
            finally:
                for task in asked.values():
                    task.cancel()  # only those still running: the store has their paths
            for hash_part in [h for h in self._early if h not in frontier]:
                self._early.pop(hash_part).cancel()  # a root the store had already
        self.resolved = True
        self._changed.set()

    async def _resolve_level(self, frontier: dict[str, str | None], asked: dict[str, asyncio.Future[Resolution]],
                             seen: set[str], store_dir: str) -> dict[str, str]:
        """Handle one level's answers as they come; returns the next level (references not yet seen)."""
        named = [path for path in frontier.values() if path is not None]
        if named:
            # References the store already has (e.g. built locally) need no source at all.
            valid = await (await self._store()).query_valid_paths(named)
            for hash_part, path in frontier.items():
                if path in valid:
                    asked.pop(hash_part).cancel()
                    await self._present(hash_part, path)  # a valid path's closure is valid too
        wanted_refs: dict[str, str] = {}  # hash part -> full path, references not yet seen
        unchecked: list[Resolution] = []
        for answer in asyncio.as_completed(list(asked.values())):
            res = await answer
            info = res.info
            if info is None:
                self.plan.missing[res.hash_part] = res.reason
                continue
            # Only roots, and a path whose narinfo names it differently, need asking here.
            if frontier[res.hash_part] != info.store_path:
                unchecked.append(res)
                # While the store is asked (and perhaps still coming up), its references are
                # asked for already: dropped again if the store has the path.
                for ref in info.references:
                    if ref[:32] not in seen and ref[:32] not in self._early:
                        self._early[ref[:32]] = asyncio.ensure_future(self.runtime.broker.resolve(ref[:32], "fetch"))
                continue
            self._accept(res, seen, wanted_refs, store_dir)
        if unchecked:
            valid = await (await self._store()).query_valid_paths(resolved_info(r).store_path for r in unchecked)
            for res in unchecked:
                if resolved_info(res).store_path in valid:
                    await self._present(res.hash_part, resolved_info(res).store_path)
                else:
                    self._accept(res, seen, wanted_refs, store_dir)
        return wanted_refs

    def _accept(self, res: Resolution, seen: set[str], wanted_refs: dict[str, str], store_dir: str) -> None:
        """A path to import: its download starts now, and it joins the import order."""
        info = resolved_info(res)
        self.plan.resolutions[res.hash_part] = res
        self.progress.paths_total += 1
        self.progress.bytes_total += info.nar_size
        self._downloads[res.hash_part] = asyncio.ensure_future(self._download(res))
        refs = [ref[:32] for ref in info.references]
        for ref, name in zip(refs, info.references, strict=True):
            if ref not in seen:
                seen.add(ref)
                wanted_refs[ref] = f"{store_dir}/{name}"
        self.order.add(res.hash_part, refs)
        self._changed.set()

    async def _present(self, hash_part: str, path: str) -> None:
        add_temp_root = getattr(await self._store(), "add_temp_root", None)
        if add_temp_root is not None:
            # What is already there must survive a garbage collection until its referrers are in.
            await add_temp_root(path)
        self.plan.present[hash_part] = path
        self.order.mark_done(hash_part)
        self._changed.set()

    # -- downloading ----------------------------------------------------------------------

    async def _download(self, res: Resolution) -> bytes | None:
        """Small NARs: the verified bytes, kept in memory until imported (no cache file written
        and read back), up to MEMORY_BUDGET bytes in all.  Larger NARs, those over the budget
        or already cached: spooled into the verified cache, read back by the import."""
        info = resolved_info(res)
        nars = self.runtime.nars
        async with self._limit:
            if (info.nar_size <= IN_MEMORY_NAR and self._held + info.nar_size <= MEMORY_BUDGET
                    and not nars.cached(info.nar_hash_text().partition(":")[2])):
                self._held += info.nar_size
                try:
                    data: bytes = await nars.verified_bytes(res)
                except BaseException:
                    self._held -= info.nar_size
                    raise
                self.progress.add_bytes(len(data))
                return data
            async for chunk in nars.stream(res, 0):
                self.progress.add_bytes(len(chunk))
        return None

    async def _verified(self, res: Resolution) -> AsyncIterator[bytes]:
        """The path's verified NAR, once its download finished: from memory or the cache."""
        info = resolved_info(res)
        try:
            data = await self._downloads[res.hash_part]
            if data is not None:
                del self._downloads[res.hash_part]  # drop the finished task's reference to the bytes
                self._held -= info.nar_size
                yield data
            else:
                async for chunk in self.runtime.nars.stream(res, 0):
                    yield chunk
        except (FetchError, SubstituterError) as exc:
            self.failures[info.store_path] = str(exc)
            raise
        self.progress.path_done(info.store_path, "imported")

    def _realised(self, paths: list[str]) -> None:
        """Tell the dataspace (and whoever watches it) that the paths are now in this store:
        once the store said so, all in one turn."""
        from syndicate import turn

        from . import turns

        store = getattr(self.store, "root", None) or getattr(self.store, "socket_path", None) or "store"
        records = [self._record(self._realised_label, (path, store)) for path in paths]  # preserve(Realised(…))

        def publish() -> None:
            for record in records:
                turn.publish(self.runtime.ds, record)

        turns.external(self.runtime.facet, publish)

    # -- importing ------------------------------------------------------------------------

    async def import_ready(self) -> None:
        """Import batch after batch of ready paths until the resolution ended and none is left."""
        # A private chroot store (our own daemon) trusts what the broker's TrustPolicy
        # accepted; a shared daemon checks signatures itself too.
        store = await self._store()
        private = getattr(store, "private", False)
        while True:
            self._changed.clear()
            batch = self.order.take()
            if batch:
                resolutions = [self.plan.resolutions[h] for h in batch]
                # References come first; each path is registered whole or not at all.
                await store.add_multiple_to_store(
                    ((to_path_info(resolved_info(r)), self._verified(r)) for r in resolutions),
                    dont_check_sigs=private)
                self._realised([resolved_info(r).store_path for r in resolutions])
            elif self.resolved:
                return
            else:
                await self._changed.wait()

    async def cancel_downloads(self) -> None:
        for task in self._downloads.values():
            task.cancel()
        await asyncio.gather(*self._downloads.values(), return_exceptions=True)
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()  # the caller still holds it (and closes what it opened)


async def fetch_closure(runtime: Any, store: Store | Awaitable[Store], roots: list[str], *, jobs: int = 8,
                        progress: Progress | None = None) -> tuple[FetchPlan, dict[str, str]]:
    """Resolve, fetch and import the closures of ``roots`` into ``store`` (or the store being
    opened: roots are resolved meanwhile); returns the plan and failures by store path (empty
    when every path went in; paths blocked by a missing one are not named)."""
    fetch = _Fetch(runtime, store, jobs, progress or Progress())
    resolving = asyncio.ensure_future(fetch.resolve(roots))
    importing = asyncio.ensure_future(fetch.import_ready())
    try:
        # The first to fail stops the other (the finally below cancels what still runs).
        await asyncio.wait([resolving, importing], return_when=asyncio.FIRST_EXCEPTION)
        if resolving.done() and resolving.exception() is not None:
            raise resolving.exception()  # type: ignore[misc]
        try:
            await importing
        except (FetchError, StoreError, SubstituterError) as exc:
            if fetch.store_failed:
                raise
            if not fetch.failures:
                fetch.failures["(import)"] = str(exc)
        if not fetch.plan.missing and not fetch.failures and fetch.order.blocked():
            fetch.failures["(import)"] = f"reference cycle through {fetch.order.blocked()[0]}"
    finally:
        for task in (resolving, importing):
            task.cancel()
        await asyncio.gather(resolving, importing, return_exceptions=True)
        await fetch.cancel_downloads()
        fetch.progress.finish()
    return fetch.plan, fetch.failures


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
            # The store may still be coming up (a chroot's daemon creating its database): the
            # roots are resolved meanwhile.
            plan, failures = await fetch_closure(runtime, opening, targets, jobs=jobs, progress=Progress(out))
            store = await opening
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
