"""A tiny Bazel-style HTTP remote cache on loopback: ``/cas/<sha256 hex>`` and ``/ac/<key>``.

GET and HEAD, ``Range: bytes=N-`` answered with 206, and PUT as Bazel uploads.  Knobs let tests
make it misbehave the ways real caches do: ignore Range, fail with 503, cut a body short.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from aiohttp import web

_RANGE = re.compile(r"bytes=(\d+)-")
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass
class CasServer:
    cas: dict[str, bytes] = field(default_factory=dict)
    ac: dict[str, bytes] = field(default_factory=dict)
    #: (method, path, Range header or None) of every request, in order.
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    ignore_range: bool = False
    #: Answer this many requests with 503 before behaving.
    fail_next: int = 0
    #: Close the connection after this many body bytes of a CAS GET.
    cut_after: int | None = None
    url: str = ""

    def put_blob(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        self.cas[key] = data
        return key

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{namespace:cas|ac}/{key}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Range")))
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="try again")
        namespace, key = request.match_info["namespace"], request.match_info["key"]
        if not _HEX.fullmatch(key):
            return web.Response(status=400, text="keys are sha256 hex")
        store = self.cas if namespace == "cas" else self.ac
        if request.method == "PUT":
            body = await request.read()
            if namespace == "cas" and hashlib.sha256(body).hexdigest() != key:
                return web.Response(status=400, text="blob does not hash to its key")
            store[key] = body
            return web.Response(status=200)
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        data = store.get(key)
        if data is None:
            return web.Response(status=404)
        if request.method == "HEAD":
            return web.Response(status=200, headers={"Content-Length": str(len(data))})
        return await self._send(request, data, cut=self.cut_after if namespace == "cas" else None)

    async def _send(self, request: web.Request, data: bytes, cut: int | None) -> web.StreamResponse:
        start = 0
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        if match is not None and not self.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        response = web.StreamResponse(status=206 if start else 200)
        response.content_length = len(data) - start
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await response.prepare(request)
        body = data[start:]
        if cut is not None:
            await response.write(body[:cut])
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-body
            return response
        await response.write(body)
        await response.write_eof()
        return response
