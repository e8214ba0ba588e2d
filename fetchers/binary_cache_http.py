"""Small GETs (narinfos) to one binary cache over keep-alive HTTP/1.1, without aiohttp.

Nix walks a closure one narinfo at a time, and the daemon resolves the rest ahead of it; each
narinfo GET through aiohttp's client costs ~0.1 ms of the event loop (request and response
objects, header multidicts, timers, middlewares) for a request of two lines and an answer of
~1 KiB.  Bodies come as stored (``Accept-Encoding: identity``; an encoded answer is not plain).  This client keeps its own idle connections to the cache, writes the request in one
piece and reads the answer with one small parser.

It handles only the plain case: a complete answer with a ``Content-Length`` (or a status without
a body).  Anything else -- a redirect, a chunked or close-delimited body, an oversized answer, a
connection it cannot open -- returns None, and the caller asks aiohttp instead, so those keep
aiohttp's behaviour (redirects, telling an unreachable cache, which marks it down).  A connection
closed before the answer was complete, or no complete answer within the stall timeout, is a
:class:`TransientFetchError`, as through aiohttp (a kept-alive connection found closed is
first tried again on a new one, as aiohttp does).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from substituter.errors import TransientFetchError

__all__ = ["ConnectionLost", "PlainAnswer", "SmallGets", "parse_answer"]

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([2-5][0-9][0-9])[^\r\n]*\r\n")
_HEAD_END = b"\r\n\r\n"
#: A head longer than this is not a narinfo answer of the plain kind.
MAX_HEAD = 16 * 1024


class ConnectionLost(TransientFetchError):
    """The connection closed before the answer was complete (not a stall)."""


class PlainAnswer:
    """A complete answer: status, body and the one header callers read (Retry-After)."""

    __slots__ = ("status", "body", "headers", "reusable")

    def __init__(self, status: int, body: bytes, retry_after: str | None, reusable: bool) -> None:
        self.status, self.body, self.reusable = status, body, reusable
        self.headers: dict[str, str] = {} if retry_after is None else {"retry-after": retry_after}


def parse_answer(data: bytes, max_body: int) -> PlainAnswer | None | bool:
    """The answer in ``data``: a PlainAnswer when complete, True when more bytes are needed,
    None when it is not of the plain kind (aiohttp must handle it)."""
    end = data.find(_HEAD_END)
    if end < 0:
        return True if len(data) <= MAX_HEAD else None
    m = _STATUS_LINE.match(data)
    if m is None:
        return None
    status = int(m.group(2))
    if 300 <= status < 400:
        return None  # a redirect: aiohttp follows it
    length: int | None = None
    retry_after = None
    reusable = m.group(1) == b"1"
    for line in data[m.end():end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        name = name.strip().lower()
        if name == b"content-length":
            text = value.strip()
            if not text.isdigit() or length is not None:
                return None
            length = int(text)
        elif name == b"transfer-encoding" or (name == b"content-encoding"
                                               and value.strip().lower() != b"identity"):
            return None
        elif name == b"connection":
            tokens = value.lower()
            if b"close" in tokens:
                reusable = False
            elif b"keep-alive" not in tokens and m.group(1) == b"0":
                reusable = False
        elif name == b"retry-after":
            retry_after = value.strip().decode("latin-1")
    if length is None:
        if status != 204:
            return None  # a body delimited by the connection closing
        length = 0
    if length > max_body:
        return None
    start = end + len(_HEAD_END)
    if len(data) < start + length:
        return True
    if len(data) > start + length:
        return None  # bytes nobody asked for: never reuse such a connection
    return PlainAnswer(status, data[start:], retry_after, reusable)


#: The connection closed before the answer was complete.
_LOST = PlainAnswer(0, b"", None, False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[PlainAnswer | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.close()  # bytes without a request: the connection is not in a known state
            return
        parsed = parse_answer(self.buffer, self.max_body)
        if parsed is True:
            return
        self.buffer = b""
        waiter.set_result(parsed if isinstance(parsed, PlainAnswer) else None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(_LOST)

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class SmallGets:
    """GETs of small resources under ``base_url``, on at most ``max_connections`` connections."""

    def __init__(self, base_url: str, *, connect_timeout: float, stall_timeout: float,
                 max_connections: int, max_body: int,
                 authorization: Callable[[str], str | None] | None = None) -> None:
        parts = urlsplit(base_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = base_url
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.max_connections = max_connections
        self.max_body = max_body
        self.authorization = authorization
        self._ssl: ssl.SSLContext | None = None
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiting: deque[asyncio.Future[_Connection | None]] = deque()
        self.closed = False

    def handles(self, url: str) -> bool:
        """Whether ``url`` is one this client may try (under the cache's URL, plain path)."""
        return (not self.closed and url.startswith(self.prefix) and self.scheme in ("http", "https")
                and not any(c in url for c in "?#% \r\n\t"))

    async def get(self, url: str) -> PlainAnswer | None:
        """The answer when it is a plain one, else None: ask aiohttp instead."""
        path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
        auth = self.authorization(url) if self.authorization is not None else None
        request = (f"GET {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                   + (f"Authorization: {auth}\r\n" if auth else "")
                   + "Accept: */*\r\nAccept-Encoding: identity\r\n\r\n").encode("latin-1")
        for _attempt in range(2):  # a kept-alive connection the server had closed: once more
            conn, reused = await self._acquire()
            if conn is None:
                return None
            try:
                answer = await self._exchange(conn, request, url)
            except BaseException:
                conn.close()
                self._release(None)
                raise
            if answer is None or answer is _LOST:
                conn.close()
                self._release(None)
                if answer is None:
                    return None
                if reused:
                    continue
                raise ConnectionLost(f"{url}: ServerDisconnectedError: the connection closed "
                                     "before a complete answer")
            if answer.reusable:
                self._release(conn)
            else:
                conn.close()
                self._release(None)
            return answer
        return None

    async def _exchange(self, conn: _Connection, request: bytes, url: str) -> PlainAnswer | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[PlainAnswer | None] = loop.create_future()
        conn.waiter = waiter
        assert conn.transport is not None
        conn.transport.write(request)
        stalled: list[bool] = []

        def stall() -> None:
            stalled.append(True)
            waiter.cancel()

        timer = loop.call_later(self.stall_timeout, stall)
        try:
            return await waiter
        except asyncio.CancelledError:
            if stalled:
                raise TransientFetchError(
                    f"{url}: TimeoutError: no complete answer within {self.stall_timeout:g} s "
                    "(stalled)") from None
            raise
        finally:
            timer.cancel()
            conn.waiter = None

    async def _acquire(self) -> tuple[_Connection | None, bool]:
        """A connection (and whether it was kept alive), or None: none could be opened."""
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn, True
            self._open -= 1
        if self._open < self.max_connections:
            self._open += 1  # a slot of our own, to open a connection in
        else:
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release(waiter.result())  # handed to us as we were cancelled: pass on
                raise
            if handed is not None:
                return handed, True
            # A slot was handed over without a connection: open one in it.
        try:
            opened = await self._connect()
        except BaseException:
            self._release(None)
            raise
        if opened is None:
            self._release(None)
        return opened, False

    async def _connect(self) -> _Connection | None:
        loop = asyncio.get_running_loop()
        if self.scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _transport, conn = await loop.create_connection(
                    lambda: _Connection(self.max_body), self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None)
        except (OSError, TimeoutError, ssl.SSLError):
            return None  # aiohttp will try, and say what is wrong
        return conn

    def _release(self, conn: _Connection | None) -> None:
        """Give back a slot, with its connection if that can be used again (None: closed)."""
        if conn is not None and not conn.usable:
            conn = None
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)  # the slot passes on, first come first served
                return
        if conn is None:
            self._open -= 1
        elif self.closed:
            conn.close()
            self._open -= 1
        else:
            self._idle.append(conn)

    def close(self) -> None:
        self.closed = True
        for conn in self._idle:
            conn.close()
        self._open -= len(self._idle)
        self._idle.clear()
