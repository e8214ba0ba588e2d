"""A small HTTP/1.1 front for Nix's hottest requests, ahead of aiohttp on the same socket.

Nix asks for narinfos one small request at a time over keep-alive connections; through aiohttp
each costs a Request, a Response and a handler task (~50 µs of one event loop).  The front reads
the connection itself and answers complete ``GET|HEAD /<hash>.narinfo`` and ``/nix-cache-info``
requests from prebuilt bytes: a narinfo the broker has decided without awaiting anything, one
still being located after an await (later requests wait their turn); all answers of one read in
one write.

Anything else -- a NAR, ``/metrics``, a request with a body or with ``Connection``/``Expect``/
``Upgrade`` headers, HTTP/1.0, anything malformed -- hands the connection, at a request boundary
and with the bytes not yet answered, to aiohttp's own request handler for good, so everything
but the strict common case keeps aiohttp's parser and behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Protocol

__all__ = ["Answers", "FrontServer", "Prebuilt", "prebuilt"]

log = logging.getLogger("substituter.http")

#: A request line the front answers itself: GET/HEAD of exactly these targets, HTTP/1.1
#: (a NAR only when it is a small one already in the verified cache).
_REQUEST_LINE = re.compile(
    rb"(GET|HEAD) /(?:([0-9a-df-np-sv-z]{32})\.narinfo|nix-cache-info"
    rb"|nar/([0-9a-df-np-sv-z]{52})-([0-9a-df-np-sv-z]{32})\.nar(\.zst)?) HTTP/1\.1\r\n"
)
_RANGE = re.compile(rb"(?:^|\n)range:", re.IGNORECASE)
#: Header lines it accepts: CRLF-terminated, names tokens, values without control characters
#: but tab (what aiohttp's parser accepts, minus anything doubtful).
_HEADER_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n")
_HEADER_NAME = re.compile(rb"(?:^|\n)([^:\r\n]+):")
#: Headers that change framing or connection handling: such requests go to aiohttp.
_SPECIAL = frozenset({"content-length", "transfer-encoding", "connection", "expect", "upgrade", "te"})
#: Headers aiohttp refuses to see twice (its parser's list): a request repeating one goes there.
_SINGLETONS = frozenset({"content-location", "content-range", "content-type", "etag", "host", "max-forwards",
                         "server", "user-agent"})
#: The end of a head, also with bare LFs (then not ours, but complete: hand it on now).
_HEAD_END = re.compile(rb"\n\r?\n")
#: The longest request line of ours (HEAD of a zstd NAR).
_MAX_LINE = 128
_VERDICTS = 256
_VERDICT_BLOCK = 1024


def _headers_ours(block: bytes) -> bool:
    """Whether a request's header lines (and blank line) are ones the front may answer: well
    formed, one Host (HTTP/1.1 needs it), no repeated singleton, nothing about framing."""
    if not _HEADER_LINES.fullmatch(block):
        return False
    names = [name.decode("latin-1").lower() for name in _HEADER_NAME.findall(block)]
    if names.count("host") != 1 or not _SPECIAL.isdisjoint(names):
        return False
    singletons = [name for name in names if name in _SINGLETONS]
    return len(singletons) == len(set(singletons))
#: A head longer than this without an end is not a request of ours.
MAX_HEAD = 16 * 1024
#: Unanswered input buffered while a lookup is pending before reading pauses.
MAX_PENDING_INPUT = 64 * 1024
IDLE_TIMEOUT = 75.0  # as aiohttp's keep-alive timeout
_SWEEP = 15.0


_REASONS = {200: "OK", 404: "Not Found"}



class Prebuilt:
    """One response: ``head`` is its status line and headers without Date and the blank line."""

    __slots__ = ("status", "headers", "body", "head")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers  # without Content-Length (for aiohttp)
        self.body = body
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n{lines}Content-Length: {len(body)}\r\n".encode("latin-1")



def prebuilt(status: int, content_type: str, cache_control: str, body: bytes) -> Prebuilt:
    return Prebuilt(status, {"Content-Type": content_type, "Cache-Control": cache_control}, body)


class Answers(Protocol):
    """What the front serves; every call counts its own metrics."""

    def cache_info(self) -> Prebuilt: ...

    def narinfo(self, hash_part: str) -> Prebuilt | Awaitable[Prebuilt]:
        """The answer (a hit or a 404): right away if it is known, else an awaitable of it."""

    def cached_nar(self, nar_hash: str, hash_part: str,
                   compressed: bool) -> Prebuilt | Awaitable[Prebuilt] | None:
        """A small NAR in hand (its response, or an awaitable of it), or None when this request
        is for aiohttp (not cached, large, ...)."""


class FrontServer:
    """Protocol factory for ``loop.create_server``; ``fallback`` makes aiohttp's handlers
    (``AppRunner.server``)."""

    def __init__(self, answers: Answers, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.answers = answers
        self.fallback = fallback
        self.connections: set[FrontProtocol] = set()
        self.verdicts: dict[bytes, bool] = {}  # header lines -> whether the front answers them
        self.closing = False
        self._date = b""
        self._date_until = 0.0
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> FrontProtocol:
        if self._sweeper is None and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)
        return FrontProtocol(self)

    def date(self) -> bytes:
        """``Date: …\\r\\n\\r\\n``, rendered once a second."""
        now = time.time()
        if now >= self._date_until:
            self._date = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n\r\n"
            self._date_until = int(now) + 1.0
        return self._date

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - IDLE_TIMEOUT
        for conn in list(self.connections):
            if conn.last_active < deadline and conn.pending is None:
                conn.close()
        if self.connections and not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)

    def close(self) -> None:
        """Close idle connections now and busy ones once their answers are written."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            if conn.pending is None:
                conn.close()


class FrontProtocol(asyncio.Protocol):
    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.pending: asyncio.Task[None] | None = None  # a lookup in flight; later requests wait
        self.last_active = time.monotonic()
        self._write_paused = False
        self._read_paused = False
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        self.last_active = time.monotonic()
        if self.pending is None and not self._write_paused:
            self._process()
        elif len(self.buffer) > MAX_PENDING_INPUT:
            self._pause_reading()

    def eof_received(self) -> bool:
        # Answer what was asked before the client stopped sending, then close.
        self._eof = True
        if self.pending is None and not self._write_paused:
            self._process()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.pending is None:
            self._process()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _process(self) -> None:
        """Answer every complete request in the buffer that can be answered right away."""
        transport = self.transport
        if transport is None:
            return
        buf = self.buffer
        pos = 0
        out: list[bytes] = []
        answers = self.server.answers
        while pos < len(buf):
            end = _HEAD_END.search(buf, pos)
            if end is None:
                # Incomplete: wait for the rest only if it can still be a request of ours.
                nl = buf.find(b"\n", pos, pos + _MAX_LINE)
                if (nl < 0 and len(buf) - pos >= _MAX_LINE) or len(buf) - pos > MAX_HEAD or (
                        nl >= 0 and not _REQUEST_LINE.match(buf, pos, nl + 1)):
                    self._hand_off(out, buf[pos:])
                    return
                break
            stop = end.end()
            m = _REQUEST_LINE.match(buf, pos, stop)
            if m is None:
                self._hand_off(out, buf[pos:])
                return
            # A client sends the same header lines with every request: judged once per client.
            block = buf[m.end():stop]
            verdicts = self.server.verdicts
            ours = verdicts.get(block)
            if ours is None:
                ours = _headers_ours(block)
                if len(block) <= _VERDICT_BLOCK:  # bounded memory: 256 small blocks at most
                    verdicts[block] = ours
                    if len(verdicts) > _VERDICTS:
                        del verdicts[next(iter(verdicts))]
            if not ours:
                self._hand_off(out, buf[pos:])
                return
            head_only = m.group(1) == b"HEAD"
            hash_part = m.group(2)
            found: Prebuilt | Awaitable[Prebuilt] | None
            if m.group(3) is not None:  # a NAR: ours only when small and in hand
                found = None if _RANGE.search(block) else answers.cached_nar(
                    m.group(3).decode("ascii"), m.group(4).decode("ascii"), m.group(5) is not None)
                if found is None:
                    self._hand_off(out, buf[pos:])
                    return
            elif hash_part is None:
                found = answers.cache_info()
            else:
                found = answers.narinfo(hash_part.decode("ascii"))
            pos = stop
            if not isinstance(found, Prebuilt):
                # Still being looked up: the rest of the buffer waits its turn.
                self.buffer = buf[pos:]
                self._write(out)
                self.pending = asyncio.ensure_future(self._wait(found, head_only))
                return
            answer = found
            out.append(answer.head)
            out.append(self.server.date())
            if not head_only:
                out.append(answer.body)
        self.buffer = buf[pos:]
        self._write(out)
        if self._read_paused and not self._write_paused:
            self._read_paused = False
            transport.resume_reading()
        if self._eof or (self.server.closing and not self.buffer):
            transport.close()  # after EOF a partial request can never complete

    def _write(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def _wait(self, found: Awaitable[Prebuilt], head_only: bool) -> None:
        try:
            answer = await found
        except Exception:
            # A bug, not a missing path: never guess an answer Nix would remember.
            log.exception("answering a narinfo request")
            self.pending = None
            self.close()
            return
        self.pending = None
        if self.transport is None or self.transport.is_closing():
            return
        out = [answer.head, self.server.date()]
        if not head_only:
            out.append(answer.body)
        self._write(out)
        if not self._write_paused:
            self._process()

    def _hand_off(self, out: list[bytes], rest: bytes) -> None:
        """From here on aiohttp serves this connection, starting with ``rest``."""
        transport = self.transport
        assert transport is not None
        self._write(out)
        self.server.connections.discard(self)
        self.buffer = b""
        self.transport = None
        handler = self.server.fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._read_paused:
            transport.resume_reading()
        if rest:
            handler.data_received(rest)
        if self._eof:
            handler.eof_received()
