"""An ERIS-over-HTTP (N2R) server for a block directory: GET, HEAD and PUT of single blocks.

``/uri-res/N2R?urn:blake2b:<52 base32>`` is the only resource. The query is validated before the
disk is touched: anything but a well-formed block URN is 400 (a ``urn:eris:`` capability
included, since a server-decoded stream could not be checked block by block). A PUT body must be
an ERIS block whose BLAKE2b-256 is the URN it is put under; without a query the server names it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from aiohttp import web

from substituter.errors import FormatError, HashMismatch

from .blockstore import MAX_BLOCK, N2R_PATH, DirectoryBlockStore, n2r_path
from .codec import block_urn, parse_block_urn

__all__ = ["make_app", "serve", "start_server"]

log = logging.getLogger("fetchers.eris.server")

_IMMUTABLE = "public, max-age=31536000, immutable"  # a block never changes under its name


def make_app(store: DirectoryBlockStore, *, writable: bool = True) -> web.Application:
    """The N2R application over ``store``; ``writable=False`` refuses PUT with 405."""
    app = web.Application(client_max_size=MAX_BLOCK)
    handlers = _Handlers(store, writable)
    app.router.add_get(N2R_PATH, handlers.get)  # aiohttp answers HEAD through the GET route
    app.router.add_put(N2R_PATH, handlers.put)
    return app


def _error(status: type[web.HTTPException], text: str) -> web.HTTPException:
    return status(text=text + "\n", headers={"Cache-Control": "no-store"})


class _Handlers:
    def __init__(self, store: DirectoryBlockStore, writable: bool) -> None:
        self.store = store
        self.writable = writable

    def _ref(self, request: web.Request) -> bytes:
        query = request.query_string
        if query.startswith("urn:eris:"):
            raise _error(web.HTTPBadRequest, "only single blocks (urn:blake2b:...) are served")
        try:
            return parse_block_urn(query)
        except FormatError as exc:
            raise _error(web.HTTPBadRequest, str(exc)) from exc

    async def get(self, request: web.Request) -> web.Response:
        ref = self._ref(request)
        block = await self.store.get(ref)
        if block is None:
            raise _error(web.HTTPNotFound, f"{block_urn(ref)} is not here")
        return web.Response(
            body=block,
            content_type="application/octet-stream",
            headers={"Cache-Control": _IMMUTABLE},
        )

    async def put(self, request: web.Request) -> web.Response:
        if not self.writable:
            raise web.HTTPMethodNotAllowed(
                request.method, ["GET", "HEAD"], text="this block store is read-only\n"
            )
        ref = self._ref(request) if request.query_string else None
        body = await request.read()  # bounded by client_max_size: 413 beyond one block
        if ref is None:  # the server names the block
            ref = hashlib.blake2b(body, digest_size=32).digest()
        try:
            await self.store.put(ref, body)
        except (HashMismatch, FormatError) as exc:
            raise _error(web.HTTPBadRequest, str(exc)) from exc
        return web.Response(status=201, headers={"Content-Location": n2r_path(ref)})


async def start_server(
    store: DirectoryBlockStore, host: str = "127.0.0.1", port: int = 0, *, writable: bool = True
) -> tuple[web.AppRunner, int]:
    """Start serving ``store``; returns the runner (``await runner.cleanup()`` stops) and port."""
    runner = web.AppRunner(make_app(store, writable=writable), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # aiohttp exposes the bound port only through the asyncio server
    assert server is not None and hasattr(server, "sockets")
    bound = int(server.sockets[0].getsockname()[1])
    return runner, bound


async def serve(store: DirectoryBlockStore, host: str, port: int, *, writable: bool = True) -> None:
    """Serve until cancelled."""
    runner, bound = await start_server(store, host, port, writable=writable)
    log.info("serving ERIS blocks from %s on http://%s:%d%s", store.describe(), host, bound, N2R_PATH)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
