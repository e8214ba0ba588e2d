"""HTTP plumbing shared by the HTTP-speaking fetchers: retry policy, auth, streaming a URL.

The HTTP-speaking fetchers use an :class:`aiohttp.ClientSession` (its per-request cost is a
fraction of httpx's: see bench/README.md).  Everything it raises is translated here into the
project's exception tree, including errors in the middle of a body, so callers only ever see
:mod:`substituter.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import netrc
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from substituter.errors import FetchError, NotAvailable, TransientFetchError

__all__ = [
    "RetryPolicy",
    "RequestAuth",
    "CONNECT_ERRORS",
    "check_status",
    "is_transient_status",
    "is_missing_status",
    "retry_after_seconds",
    "translate_client_error",
    "new_session",
    "stream_url",
]

log = logging.getLogger("fetchers.http")

#: Statuses that mean "the server does not have it (for us)": permanent for this source.
MISSING_STATUSES = frozenset({401, 403, 404, 407, 410})
#: Statuses that are worth asking again about, as Nix does.
TRANSIENT_STATUSES = frozenset({408, 429})
#: Most bytes asked of the socket buffer per read of a body: few, large steps downstream.
READ_SIZE = 1 << 20
#: aiohttp errors meaning the server could not be reached at all (not: it failed while talking).
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
)

Sleep = Callable[[float], Awaitable[None]]


class _HasHeaders(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


def is_transient_status(status: int) -> bool:
    return status >= 500 or status in TRANSIENT_STATUSES


def is_missing_status(status: int) -> bool:
    return status in MISSING_STATUSES


def retry_after_seconds(response: _HasHeaders) -> float | None:
    """The delay a ``Retry-After`` header asks for (seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class RetryPolicy:
    """Jittered exponential backoff, bounded by a number of retries and a longest delay.

    ``sleep`` is injectable so tests can record the delays instead of waiting them out.
    """

    retries: int = 3
    base_delay: float = 0.2
    max_delay: float = 30.0
    sleep: Sleep = field(default=asyncio.sleep, repr=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        if retry_after is not None:
            # The server said when; believe it, but never let it park us forever.
            return float(min(retry_after, self.max_delay))
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        # "Equal jitter": at least half the ceiling, so retries never bunch up at zero.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    @property
    def tries(self) -> int:
        return self.retries + 1


class RequestAuth:
    """aiohttp client middleware: netrc credentials for the host they name, and a bearer token
    (it wins) for one origin only, so the token never leaks to other hosts.

    Runs for every request, redirects included, and decides from that request's own URL.
    """

    def __init__(
        self, netrc_file: Path | None = None, token: str | None = None, origin_url: str = ""
    ) -> None:
        # Parsed once; a malformed file raises netrc.NetrcParseError here, not per request.
        self._netrc = netrc.netrc(str(netrc_file)) if netrc_file is not None else None
        self._token = token
        self._origin = _origin(origin_url) if token is not None else None

    def __repr__(self) -> str:  # credentials must not end up in logs
        return f"RequestAuth(netrc={self._netrc is not None}, bearer_origin={self._origin!r})"

    def header(self, url: str) -> str | None:
        """The ``Authorization`` value for a request to ``url``, if any."""
        if self._token is not None and _origin(url) == self._origin:
            return f"Bearer {self._token}"
        if self._netrc is not None:
            host = urlsplit(url).hostname
            entry = self._netrc.authenticators(host) if host else None
            if entry is not None and entry[2]:
                login, _account, password = entry
                credentials = base64.b64encode(f"{login}:{password}".encode()).decode()
                return f"Basic {credentials}"
        return None

    async def __call__(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        value = self.header(str(request.url))
        if value is not None:
            request.headers["Authorization"] = value
        return await handler(request)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def new_session(
    *,
    connect_timeout: float,
    stall_timeout: float,
    max_connections: int = 100,
    auth: RequestAuth | None = None,
) -> aiohttp.ClientSession:
    """A pooled keep-alive session that never decodes bodies (call from the event loop)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=stall_timeout
        ),
        # A .nar.xz served with Content-Encoding must reach us as stored.
        auto_decompress=False,
        read_bufsize=READ_SIZE,
        middlewares=() if auth is None else (auth,),
    )


def translate_client_error(exc: BaseException, url: str) -> FetchError:
    """Map an aiohttp (or socket) exception to the project's tree: what could work is transient."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError,
                        OSError)):
        # Refused, reset, timed out, a peer closing mid-body: all worth retrying.
        return TransientFetchError(f"{url}: {type(exc).__name__}: {detail}")
    return FetchError(f"{url}: {type(exc).__name__}: {detail}")


def _status_error(url: str, status: int, reason: str | None) -> FetchError:
    message = f"{url}: HTTP {status} {reason or ''}".rstrip()
    if is_missing_status(status):
        return NotAvailable(message)
    if is_transient_status(status):
        return TransientFetchError(message)
    return FetchError(message)


def _check_range(url: str, status: int, headers: Mapping[str, str], offset: int) -> int:
    """How many leading bytes of this response body to drop so the stream begins at ``offset``."""
    if status == 200:
        return offset  # the server ignored Range: skip ourselves
    content_range = headers.get("content-range", "")
    # "bytes START-END/TOTAL"
    try:
        unit, _, spec = content_range.partition(" ")
        start = int(spec.split("-", 1)[0])
    except ValueError:
        start = -1
        unit = ""
    if unit != "bytes" or start != offset:
        raise FetchError(
            f"{url}: asked for bytes from {offset}, got 206 with Content-Range {content_range!r}"
        )
    return 0


def check_status(url: str, status: int, reason: str | None, offset: int) -> None:
    """Raise what a file's answer with ``status`` means, unless it is its bytes (200, 206)."""
    if status == 416:
        raise FetchError(f"{url}: offset {offset} is beyond the end of the file (HTTP 416)")
    if status not in (200, 206):
        raise _status_error(url, status, reason)


def _request_headers(offset: int) -> dict[str, str]:
    # Compressed NARs are served as application/x-xz etc. without Content-Encoding; and even if a
    # server adds one, we want the bytes as stored, so ask for nothing and decode nothing.
    headers = {"Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    return headers


def stream_url(
    client: aiohttp.ClientSession, url: str, offset: int, stall_timeout: float
) -> AsyncIterator[bytes]:
    """Yield the raw bytes (never content-decoded) of ``url`` from ``offset`` on.

    Raises :class:`NotAvailable` for a missing file, :class:`TransientFetchError` for failures worth
    retrying (5xx, resets, stalls: also in the middle of the body) and :class:`FetchError`
    otherwise.  ``client`` is an aiohttp session (see :func:`new_session`).
    """
    return _stream_aiohttp(client, url, offset, stall_timeout)


async def _stream_aiohttp(
    session: aiohttp.ClientSession, url: str, offset: int, stall_timeout: float
) -> AsyncIterator[bytes]:
    try:
        async with asyncio.timeout(stall_timeout):
            response = await session.get(url, headers=_request_headers(offset))
    except TimeoutError as exc:
        if isinstance(exc, CONNECT_ERRORS):
            raise translate_client_error(exc, url) from exc
        raise TransientFetchError(f"{url}: no response in {stall_timeout:g}s") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise translate_client_error(exc, url) from exc
    complete = False
    try:
        check_status(url, response.status, response.reason, offset)
        skip = _check_range(url, response.status, response.headers, offset) if offset > 0 else 0
        read = response.content.read
        while True:
            try:
                async with asyncio.timeout(stall_timeout):
                    chunk = await read(READ_SIZE)
            except TimeoutError as exc:
                raise TransientFetchError(
                    f"{url}: stalled, no byte for {stall_timeout:g}s"
                ) from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise translate_client_error(exc, url) from exc
            if not chunk:
                break
            if skip:
                dropped = min(skip, len(chunk))
                skip -= dropped
                chunk = chunk[dropped:]
                if not chunk:
                    continue
            yield chunk
        if skip:
            raise FetchError(f"{url}: file ends before offset {offset}")
        complete = True
    finally:
        if complete:
            response.release()  # the connection goes back to the pool
        else:
            response.close()  # a body left unread: this connection cannot be reused
