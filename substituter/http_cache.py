"""The binary-cache HTTP endpoint Nix talks to (aiohttp, in the actors' event loop).

One handler per resource, one route table registering GET and HEAD for each:

* ``/nix-cache-info``          StoreDir, WantMassQuery, Priority
* ``/<hash>.narinfo``          the best trusted narinfo, its URL pointing at our own NAR URL
* ``/nar/<narhash>-<hash>.nar`` the verified, uncompressed NAR (Range supported)
* ``/metrics``                 Prometheus metrics

The NAR URL names the NarHash, so a narinfo Nix cached for a month stays valid across restarts,
and the store hash part, so the daemon can find sources again.  Hash parts are validated before
any lookup; a miss or a NarHash mismatch is a 404 with ``Cache-Control: no-store``; a missing
path is never a 5xx.  A NAR that cannot be finished aborts the connection, so Nix sees a failed
download, never a short success.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import FetchError
from .nix.narinfo import NarInfo

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["make_app", "nar_url"]

log = logging.getLogger("substituter.http")

_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
_HASH_PART = re.compile(f"[{_NIX32}]{{32}}")
_NAR_NAME = re.compile(f"([{_NIX32}]{{52}})-([{_NIX32}]{{32}})\\.nar")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")

NARINFO_TYPE = "text/x-nix-narinfo"
NO_STORE = {"Cache-Control": "no-store"}
DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")


def nar_url(info: NarInfo) -> str:
    """The daemon's own, content-addressed URL for a path's NAR (relative to the cache root)."""
    return f"nar/{info.nar_hash.nix32()}-{info.hash_part}.nar"


def served_narinfo(info: NarInfo) -> bytes:
    """The upstream narinfo with its signatures, describing our uncompressed NAR instead."""
    return info.with_file(nar_url(info), "none", None, None).to_bytes()


def _not_found(reason: str) -> web.Response:
    return web.Response(status=404, text=reason + "\n", headers=NO_STORE)


async def cache_info(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    body = f"StoreDir: {daemon.config.store_dir}\nWantMassQuery: 1\nPriority: {daemon.config.priority}\n"
    return web.Response(text=body, content_type="text/x-nix-cache-info",
                        headers={"Cache-Control": "max-age=86400"})


async def narinfo(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    hash_part = request.match_info["hash"]
    if not _HASH_PART.fullmatch(hash_part):
        return _not_found("not a store path hash")
    started = time.monotonic()
    res = await daemon.broker.resolve(hash_part, "query")
    daemon.metrics.narinfo_latency.observe(time.monotonic() - started)
    if res.info is None:
        daemon.metrics.narinfo_requests.labels("miss").inc()
        log.info("%s.narinfo: not found (%s)", hash_part, res.reason)
        return _not_found(f"{hash_part}: {res.reason}")
    daemon.metrics.narinfo_requests.labels("hit").inc()
    return web.Response(
        body=served_narinfo(res.info),
        content_type=NARINFO_TYPE,
        headers={"Cache-Control": "max-age=86400"},
    )


async def nar(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON_KEY]
    m = _NAR_NAME.fullmatch(request.match_info["name"])
    if not m:
        return _not_found("not a NAR of this cache")
    nar_hash, hash_part = m.groups()
    cache = daemon.nars.cache
    cached = cache.get(nar_hash) if cache is not None else None
    res = None
    if cached is not None:
        # Verified before it was cached, and named by its NarHash: no upstream is asked.
        size = cached.nar_size
    else:
        res = await daemon.broker.resolve(hash_part, "fetch")
        if res.info is None:
            return _not_found(f"{hash_part}: {res.reason}")
        if res.info.nar_hash.nix32() != nar_hash:
            # The path is offered now with another NAR than the one this URL names.
            return _not_found(f"{hash_part}: NarHash differs from the requested NAR")
        size = res.info.nar_size
    offset = 0
    status = 200
    headers = {"Content-Type": "application/x-nix-nar", "Accept-Ranges": "bytes",
               "Cache-Control": "max-age=31536000, immutable"}
    if (rng := request.headers.get("Range")) is not None:
        rm = _RANGE.fullmatch(rng.strip())
        if rm is None or int(rm.group(1)) >= size or (rm.group(2) and int(rm.group(2)) < size - 1):
            # Only open-ended ranges are served (what resuming clients send).
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}", **NO_STORE})
        offset = int(rm.group(1))
        status = 206
        headers["Content-Range"] = f"bytes {offset}-{size - 1}/{size}"
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = size - offset
    if request.method == "HEAD":
        await response.prepare(request)
        return response
    sent = 0
    started = time.monotonic()
    stream = cache.open(nar_hash, offset) if cached is not None else daemon.nars.stream(res, offset)
    try:
        async for chunk in stream:
            if sent == 0 and not response.prepared:
                await response.prepare(request)
            await response.write(chunk)
            sent += len(chunk)
    except FetchError as exc:
        daemon.metrics.nar_failures.inc()
        log.error("NAR %s for %s: %s; aborting the response", nar_hash, hash_part, exc)
        if not response.prepared:
            return web.Response(status=404, text=f"{exc}\n", headers=NO_STORE)
        # Content-Length is unmet: closing tells Nix the download failed.
        if request.transport is not None:
            request.transport.close()
        return response
    finally:
        await stream.aclose()
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    daemon.metrics.nar_bytes.inc(sent)
    daemon.metrics.nar_seconds.observe(time.monotonic() - started)
    return response


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    return web.Response(body=generate_latest(daemon.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application()
    app[DAEMON_KEY] = daemon
    for path, handler in (
        ("/nix-cache-info", cache_info),
        ("/{hash}.narinfo", narinfo),
        ("/nar/{name}", nar),
        ("/metrics", metrics),
    ):
        # add_get also registers HEAD, which Nix sends before GET for narinfos.
        app.router.add_get(path, handler)
    return app
