"""The binary-cache HTTP endpoint Nix talks to (aiohttp, in the actors' event loop).

One handler per resource, one route table registering GET and HEAD for each:

* ``/nix-cache-info``          StoreDir, WantMassQuery, Priority
* ``/<hash>.narinfo``          the best trusted narinfo, its URL pointing at our own NAR URL
* ``/nar/<narhash>-<hash>.nar.zst`` the verified NAR as zstd: the cached file itself (sendfile,
  Range) or, while it is first fetched, a stream passing the source's zstd blocks on as they
  verify (see nix.zstd_frames.ZstdRelay; offered for large NARs with nar-cache.stream-zstd)
* ``/nar/<narhash>-<hash>.nar`` the verified, uncompressed NAR (Range supported)
* ``/metrics``                 Prometheus metrics

The NAR URL names the NarHash, so a narinfo Nix cached for a month stays valid across restarts,
and the store hash part, so the daemon can find sources again.  Hash parts are validated before
any lookup; a miss or a NarHash mismatch is a 404 with ``Cache-Control: no-store``; a missing
path is never a 5xx.  A NAR that cannot be finished aborts the connection, so Nix sees a failed
download, never a short success.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import FetchError
from .http_front import Prebuilt, prebuilt
from .nix.narinfo import NarInfo
from .sendfile import send_file_body

if TYPE_CHECKING:
    from .broker import Resolution
    from .daemon import Daemon
    from .nar_cache import CachedNar

__all__ = ["Narinfos", "make_app", "nar_url"]

log = logging.getLogger("substituter.http")
T = TypeVar("T")

_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
_HASH_PART = re.compile(f"[{_NIX32}]{{32}}")
_NAR_NAME = re.compile(f"([{_NIX32}]{{52}})-([{_NIX32}]{{32}})\\.nar(\\.zst)?")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")

NARINFO_TYPE = "text/x-nix-narinfo"
NO_STORE = {"Cache-Control": "no-store"}
DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")


def nar_url(info: NarInfo, compressed: bool) -> str:
    """The daemon's own, content-addressed URL for a path's NAR (relative to the cache root)."""
    nar_hash = info.nar_hash_text().partition(":")[2]  # the nix32 form, encoded once per narinfo
    return f"nar/{nar_hash}-{info.hash_part}.nar" + (".zst" if compressed else "")


def served_narinfo(info: NarInfo, cached: CachedNar | None, stream_zstd_above: int | None) -> bytes:
    """The upstream narinfo with its signatures, describing our own file of the NAR instead.

    A NAR already in the verified cache is offered as that zstd file (sent with sendfile).  One
    that is not: as the plain NAR, streamed while it is verified (no compression work, a known
    length, Range); or, above ``stream_zstd_above`` bytes (nar-cache.stream-zstd: the NARs not
    verified whole first), as a zstd stream passing a zstd source's own blocks on as they verify
    (the file's hash and size are not known up front).  All these URLs stay valid whatever the
    cache holds later.

    Rendered once per narinfo object and cache state: a resolution hands out the same
    :class:`NarInfo` object for as long as it stands, so repeated requests reuse the bytes.
    """
    entry = _served_entry(info)
    state = -1 if cached is None else cached.file_size
    body = entry.bodies.get(state)
    if body is None:
        if cached is not None:
            body = info.with_file(nar_url(info, True), "zstd", None, cached.file_size).to_bytes()
        elif stream_zstd_above is not None and info.nar_size > stream_zstd_above:
            body = info.with_file(nar_url(info, True), "zstd", None, None).to_bytes()
        else:
            body = info.with_file(nar_url(info, False), "none", info.nar_hash, info.nar_size).to_bytes()
        entry.bodies[state] = body
    return body


class _Served:
    """What is derived from one narinfo object for serving it (kept with the object itself)."""

    __slots__ = ("info", "nar_hash", "bodies", "answers", "prefetched")

    def __init__(self, info: NarInfo) -> None:
        self.info = info  # holds the object, so its id() is not reused while this entry lives
        self.nar_hash = info.nar_hash_text().partition(":")[2]
        self.bodies: dict[int, bytes] = {}
        self.answers: dict[int, Prebuilt] = {}  # the same, as whole responses
        self.prefetched = False  # its references and NAR were asked for once served


#: Rendered narinfos by ``id(info)``, oldest first; bounded so old resolutions can go.
_SERVED: OrderedDict[int, _Served] = OrderedDict()
SERVED_ENTRIES = 8192


def _served_entry(info: NarInfo) -> _Served:
    entry = _SERVED.get(id(info))
    if entry is None or entry.info is not info:
        entry = _SERVED[id(info)] = _Served(info)
        if len(_SERVED) > SERVED_ENTRIES:
            _SERVED.popitem(last=False)
    return entry


def _not_found(reason: str) -> web.Response:
    return web.Response(status=404, text=reason + "\n", headers=NO_STORE)


NARINFO_CACHE_CONTROL = "max-age=86400"


class Narinfos:
    """Narinfo and nix-cache-info answers as prebuilt responses, for the front and for aiohttp.

    Every narinfo request asks the broker, as it always did, but without a task: the broker's
    ``resolve`` coroutine is stepped right away and, for a path already decided (it returns
    without waiting), the answer is ready in the same call.  Only a path still being located
    continues as a coroutine.

    Hits answered at once are counted in a plain int and folded into the Prometheus metrics
    when they are scraped (:meth:`flush_metrics`): a counter increment and a histogram
    observation cost ~1.5 µs a request, a fifth of this path.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        config = daemon.config
        info = f"StoreDir: {config.store_dir}\nWantMassQuery: 1\nPriority: {config.priority}\n"
        self._cache_info = prebuilt(200, "text/x-nix-cache-info; charset=utf-8", NARINFO_CACHE_CONTROL,
                                    info.encode())
        metrics = daemon.metrics
        self._hits = metrics.narinfo_requests.labels("hit")
        self._misses = metrics.narinfo_requests.labels("miss")
        self._latency = metrics.narinfo_latency
        self._instant_hits = 0
        self._stream_zstd_above = daemon.nars.spool_limit if config.nar_cache.stream_zstd else None

    def flush_metrics(self) -> None:
        """Count the hits answered at once in the hit counter and as 0 s in the histogram."""
        n, self._instant_hits = self._instant_hits, 0
        if not n:
            return
        self._hits.inc(n)
        buckets = getattr(self._latency, "_buckets", None)  # prometheus_client's, lowest first
        if buckets:
            buckets[0].inc(n)  # n observations of 0 s in one step
        else:
            for _ in range(n):
                self._latency.observe(0.0)

    def cache_info(self) -> Prebuilt:
        return self._cache_info

    def cached_nar(self, nar_hash: str, hash_part: str,
                   compressed: bool) -> Prebuilt | Awaitable[Prebuilt] | None:
        """A small NAR in hand: verified lately (still in memory), being fetched ahead of the
        request, or in the verified cache (its zstd file or the NAR, read in one worker call).
        None (aiohttp serves it) for anything else.  Keeps Nix's one keep-alive connection on
        the front for the narinfos that follow."""
        nars = self.daemon.nars
        if not compressed:
            data = nars.recent(nar_hash)
            if data is not None:
                self.daemon.metrics.nar_bytes.inc(len(data))
                return _raw_nar(data)
            if nars.spooling_small(nar_hash):
                return self._fetched_nar(nar_hash, hash_part)
        cache = nars.cache
        if cache is None or nar_hash not in cache:
            return None
        if compressed and (small := cache.small_file(nar_hash)) is not None:
            self.daemon.metrics.nar_bytes.inc(len(small))
            return _zstd_nar(small)
        entry = cache.get(nar_hash)
        if entry is None or entry.file_size > SMALL_FILE or (not compressed and entry.nar_size > SMALL_FILE):
            return None
        return self._read_nar(entry, hash_part, compressed)

    async def _fetched_nar(self, nar_hash: str, hash_part: str) -> Prebuilt:
        """A small NAR whose fetch is under way: the same steps as aiohttp's handler."""
        res = (await self.daemon.broker.resolve(hash_part, "fetch")).for_nar(nar_hash)
        if res.info is None:
            return prebuilt(404, "text/plain; charset=utf-8", "no-store", f"{hash_part}: {res.reason}\n".encode())
        try:
            data = b"".join([chunk async for chunk in self.daemon.nars.stream(res)])
        except FetchError as exc:
            self.daemon.metrics.nar_failures.inc()
            log.error("NAR %s for %s: %s", nar_hash, hash_part, exc)
            return prebuilt(404, "text/plain; charset=utf-8", "no-store", f"{exc}\n".encode())
        self.daemon.metrics.nar_bytes.inc(len(data))
        return _raw_nar(data)

    async def _read_nar(self, entry: CachedNar, hash_part: str, compressed: bool) -> Prebuilt:
        from .nar_cache import NarCache

        try:
            if compressed:
                body = await asyncio.to_thread(entry.path.read_bytes)
                self.daemon.nars.cache.keep_small(entry, body)  # type: ignore[union-attr]
            else:
                body = await asyncio.to_thread(NarCache._read_entry, entry)
        except Exception as exc:  # evicted meanwhile (or unreadable): a miss, never a guess
            log.warning("cached NAR %s for %s: %s", entry.nar_hash, hash_part, exc)
            return prebuilt(404, "text/plain; charset=utf-8", "no-store", f"{hash_part}: NAR left the cache ({exc})\n".encode())
        self.daemon.metrics.nar_bytes.inc(len(body))
        return _zstd_nar(body) if compressed else _raw_nar(body)

    def narinfo(self, hash_part: str) -> Prebuilt | Awaitable[Prebuilt]:
        """The answer for a valid nix32 hash part (the narinfo, or a 404 saying why): right away
        when the broker has decided, else an awaitable of it."""
        started = time.monotonic()
        resolving = self.daemon.broker.resolve(hash_part, "query")
        try:
            waiting_on = resolving.send(None)
        except StopIteration as done:
            return self._answer(hash_part, done.value, started, instant=True)
        return self._later(resolving, waiting_on, hash_part, started)

    async def _later(self, resolving: Coroutine[Any, Any, Resolution], waiting_on: Any, hash_part: str,
                     started: float) -> Prebuilt:
        return self._answer(hash_part, await _resume(resolving, waiting_on), started, instant=False)

    def _answer(self, hash_part: str, res: Resolution, started: float, instant: bool) -> Prebuilt:
        info = res.info
        if info is None:
            self._latency.observe(time.monotonic() - started)
            self._misses.inc()
            log.info("%s.narinfo: not found (%s)", hash_part, res.reason)
            return prebuilt(404, "text/plain; charset=utf-8", "no-store", f"{hash_part}: {res.reason}\n".encode())
        if instant:
            self._instant_hits += 1
        else:
            self._latency.observe(time.monotonic() - started)
            self._hits.inc()
        entry = _served_entry(info)
        nars = self.daemon.nars
        cache = nars.cache
        # `in` first: a dict lookup, where get() also checks the name and takes a lock.
        cached = cache.get(entry.nar_hash) if cache is not None and entry.nar_hash in cache else None
        if not entry.prefetched:
            # The first answer of this narinfo: Nix asks for its references next, one request at
            # a time, and for the NAR after that; have them resolved and fetched meanwhile.
            entry.prefetched = True
            self.daemon.broker.prefetch(ref[:32] for ref in info.references if ref[:32] != hash_part)
            if cached is None:
                nars.prefetch(res)
        state = -1 if cached is None else cached.file_size
        answer = entry.answers.get(state)
        if answer is None:
            answer = entry.answers[state] = prebuilt(200, NARINFO_TYPE, NARINFO_CACHE_CONTROL,
                                                     served_narinfo(info, cached, self._stream_zstd_above))
        return answer


def _zstd_nar(data: bytes) -> Prebuilt:
    return Prebuilt(200, {"Content-Type": "application/zstd", "Cache-Control": IMMUTABLE}, data)


def _raw_nar(data: bytes) -> Prebuilt:
    return Prebuilt(200, {"Content-Type": "application/x-nix-nar", "Accept-Ranges": "bytes",
                          "Cache-Control": IMMUTABLE}, data)


async def _resume(coro: Coroutine[Any, Any, T], waiting_on: Any) -> T:
    """Run a coroutine whose first step already ran (and yielded ``waiting_on``) to its end, as
    an asyncio task would: resume it each time what it waits for is done."""
    try:
        while True:
            if isinstance(waiting_on, asyncio.Future):
                waiting_on._asyncio_future_blocking = False  # as Task does before waiting
                await asyncio.wait((waiting_on,))  # done or failed: the coroutine reads the outcome
            else:  # a bare yield (asyncio.sleep(0)): just give the loop a turn
                await asyncio.sleep(0)
            try:
                waiting_on = coro.send(None)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
    except BaseException:
        coro.close()  # cancelled (the front's connection went) or failed: finish it, not leak it
        raise


NARINFOS: web.AppKey[Narinfos] = web.AppKey("narinfos")


def _response(answer: Prebuilt) -> web.Response:
    """The same answer through aiohttp (for connections the front handed over)."""
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


async def cache_info(request: web.Request) -> web.Response:
    return _response(request.app[NARINFOS].cache_info())


async def narinfo(request: web.Request) -> web.Response:
    hash_part = request.match_info["hash"]
    if not _HASH_PART.fullmatch(hash_part):
        return _not_found("not a store path hash")
    answer = request.app[NARINFOS].narinfo(hash_part)
    if not isinstance(answer, Prebuilt):
        answer = await answer
    return _response(answer)


IMMUTABLE = "max-age=31536000, immutable"
#: Cached zstd files up to this size are sent from memory rather than with sendfile.
SMALL_FILE = 256 * 1024


async def nar(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON_KEY]
    m = _NAR_NAME.fullmatch(request.match_info["name"])
    if not m:
        return _not_found("not a NAR of this cache")
    nar_hash, hash_part, zst = m.groups()
    cache = daemon.nars.cache
    cached = cache.get(nar_hash) if cache is not None else None
    res = None
    if cached is None:
        # Not cached yet: only a trusted offer of exactly this NarHash will do.
        res = await daemon.broker.resolve(hash_part, "fetch")
        # Only offers of exactly this NAR: another trusted build of the path is another NAR.
        res = res.for_nar(nar_hash)
        if res.info is None:
            return _not_found(f"{hash_part}: {res.reason}")
    if zst:
        return await _nar_zstd(request, daemon, nar_hash, hash_part, cached, res)
    return await _nar_raw(request, daemon, nar_hash, hash_part, cached, res)


async def _nar_zstd(request: web.Request, daemon: Daemon, nar_hash: str, hash_part: str,
                    cached: CachedNar | None, res: Resolution | None) -> web.StreamResponse:
    headers = {"Content-Type": "application/zstd", "Cache-Control": IMMUTABLE}
    if cached is None and res is not None and request.method != "HEAD":
        try:
            cached = await daemon.nars.cached_file(res)  # small NARs: verified whole first
        except FetchError as exc:
            return _nar_failed(daemon, nar_hash, hash_part, exc, None, request)
    if cached is not None:
        # Verified before it was cached and named by its NarHash: sent as it is.
        daemon.metrics.nar_bytes.inc(cached.file_size)
        if cached.file_size <= SMALL_FILE and request.method == "GET" and "Range" not in request.headers:
            # A small file costs less read in one worker call and sent with its headers in one
            # write than opened in a worker and sent with sendfile.
            try:
                body = await asyncio.to_thread(cached.path.read_bytes)
            except FileNotFoundError:
                return _not_found(f"{hash_part}: NAR left the cache")
            return web.Response(body=body, headers=headers)
        return await _send_cached_file(request, daemon, cached, headers, hash_part)
    assert res is not None
    response = web.StreamResponse(headers=headers)  # length unknown while compressing: chunked
    if request.method == "HEAD":
        await response.prepare(request)
        return response
    return await _send(request, response, daemon.nars.stream_zstd(res), daemon, nar_hash, hash_part)


async def _send_cached_file(request: web.Request, daemon: Daemon, cached: CachedNar, headers: dict[str, str],
                            hash_part: str) -> web.StreamResponse:
    """A cache file as it is (it was verified before it was cached), with sendfile(2)."""
    try:
        file = await asyncio.to_thread(open, cached.path, "rb")
    except FileNotFoundError:
        return _not_found(f"{hash_part}: NAR left the cache")
    with file:
        response, offset = await _ranged_response(request, cached.file_size, {**headers, "Accept-Ranges": "bytes"})
        if offset is None:
            return response
        try:
            await send_file_body(request, response, file, offset, cached.file_size - offset)
        except OSError as exc:
            return _nar_failed(daemon, cached.nar_hash, hash_part, exc, response, request)
    return response


async def _ranged_response(request: web.Request, size: int, headers: dict[str, str]
                           ) -> tuple[web.StreamResponse, int | None]:
    """The response for ``size`` bytes and the offset its body starts from, where the request's
    Range header says (only open-ended ranges are served: what resuming clients send), with
    Content-Length set, for the caller to send the body.  The offset is None when the answer is
    complete already: the 416 to a range that is not one, or the headers of a HEAD."""
    offset = 0
    status = 200
    if (rng := request.headers.get("Range")) is not None:
        rm = _RANGE.fullmatch(rng.strip())
        if rm is None or int(rm.group(1)) >= size or (rm.group(2) and int(rm.group(2)) < size - 1):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}", **NO_STORE}), None
        offset = int(rm.group(1))
        status = 206
        headers = {**headers, "Content-Range": f"bytes {offset}-{size - 1}/{size}"}
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = size - offset
    if request.method == "HEAD":
        await response.prepare(request)
        return response, None
    return response, offset


async def _nar_raw(request: web.Request, daemon: Daemon, nar_hash: str, hash_part: str,
                   cached: CachedNar | None, res: Resolution | None) -> web.StreamResponse:
    size = cached.nar_size if cached is not None else res.info.nar_size  # type: ignore[union-attr]
    headers = {"Content-Type": "application/x-nix-nar", "Accept-Ranges": "bytes", "Cache-Control": IMMUTABLE}
    response, offset = await _ranged_response(request, size, headers)
    if offset is None:
        return response
    if cached is not None:
        stream = daemon.nars.cache.open(nar_hash, offset)  # type: ignore[union-attr]
    else:
        stream = daemon.nars.stream(res, offset)  # type: ignore[arg-type]
    return await _send(request, response, stream, daemon, nar_hash, hash_part)


async def _send(request: web.Request, response: web.StreamResponse, stream: AsyncIterator[bytes],
                daemon: Daemon, nar_hash: str, hash_part: str) -> web.StreamResponse:
    """Stream to the client; if the source cannot finish, fail loudly (404 or a cut connection)."""
    sent = 0
    started = time.monotonic()
    try:
        async for chunk in stream:
            if not response.prepared:
                await response.prepare(request)
            await response.write(chunk)
            sent += len(chunk)
    except (FetchError, OSError) as exc:  # OSError: e.g. the cache entry was evicted meanwhile
        return _nar_failed(daemon, nar_hash, hash_part, exc, response, request)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    daemon.metrics.nar_bytes.inc(sent)
    daemon.metrics.nar_seconds.observe(time.monotonic() - started)
    return response


def _nar_failed(daemon: Daemon, nar_hash: str, hash_part: str, exc: Exception,
                response: web.StreamResponse | None, request: web.Request) -> web.StreamResponse:
    daemon.metrics.nar_failures.inc()
    log.error("NAR %s for %s: %s; aborting the response", nar_hash, hash_part, exc)
    if response is None or not response.prepared:
        return web.Response(status=404, text=f"{exc}\n", headers=NO_STORE)
    # The body is cut short (Content-Length unmet, or an unfinished chunked/zstd stream):
    # closing tells Nix the download failed.
    if request.transport is not None:
        request.transport.close()
    return response


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    request.app[NARINFOS].flush_metrics()
    return web.Response(body=generate_latest(daemon.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(daemon: Daemon, narinfos: Narinfos | None = None) -> web.Application:
    app = web.Application()
    app[DAEMON_KEY] = daemon
    app[NARINFOS] = narinfos or Narinfos(daemon)
    for path, handler in (
        ("/nix-cache-info", cache_info),
        ("/{hash}.narinfo", narinfo),
        ("/nar/{name}", nar),
        ("/metrics", metrics),
    ):
        # add_get also registers HEAD, which Nix sends before GET for narinfos.
        app.router.add_get(path, handler)
    return app
