"""HTTP plumbing shared by the HTTP-speaking fetchers: retry policy, auth, streaming a URL.

Everything httpx raises is translated here into the project's exception tree, including errors that
happen in the middle of a body, so callers only ever see :mod:`substituter.errors`.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from substituter.errors import FetchError, NotAvailable, TransientFetchError

__all__ = [
    "RetryPolicy",
    "BearerAuth",
    "MultiAuth",
    "is_transient_status",
    "is_missing_status",
    "retry_after_seconds",
    "translate_http_error",
    "stream_url",
]

log = logging.getLogger("fetchers.http")

#: Statuses that mean "the server does not have it (for us)": permanent for this source.
MISSING_STATUSES = frozenset({401, 403, 404, 407, 410})
#: Statuses that are worth asking again about, as Nix does.
TRANSIENT_STATUSES = frozenset({408, 429})

Sleep = Callable[[float], Awaitable[None]]


def is_transient_status(status: int) -> bool:
    return status >= 500 or status in TRANSIENT_STATUSES


def is_missing_status(status: int) -> bool:
    return status in MISSING_STATUSES


def retry_after_seconds(response: httpx.Response) -> float | None:
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
            return min(retry_after, self.max_delay)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        # "Equal jitter": at least half the ceiling, so retries never bunch up at zero.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    @property
    def tries(self) -> int:
        return self.retries + 1


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer`` for one origin only, so the token never leaks to other hosts."""

    def __init__(self, token: str, origin_url: str) -> None:
        self._token = token
        self._origin = _origin(origin_url)

    def __repr__(self) -> str:  # the token must not end up in logs
        return f"BearerAuth(origin={self._origin!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(str(request.url)) == self._origin:
            request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class MultiAuth(httpx.Auth):
    """Apply several single-request auth schemes in turn (e.g. netrc, then a bearer token)."""

    def __init__(self, *auths: httpx.Auth) -> None:
        self._auths = auths

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        for auth in self._auths:
            flow = auth.sync_auth_flow(request)
            request = next(flow)
            flow.close()
        yield request


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def translate_http_error(exc: httpx.HTTPError, url: str) -> FetchError:
    """Map an httpx exception to the project's tree: what could work next time is transient."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, (httpx.TransportError, httpx.TimeoutException)):
        # Connection refused/reset, timeouts, a peer closing mid-body: all worth retrying.
        return TransientFetchError(f"{url}: {type(exc).__name__}: {detail}")
    return FetchError(f"{url}: {detail}")


def _status_error(response: httpx.Response) -> FetchError:
    url, status = response.request.url, response.status_code
    message = f"{url}: HTTP {status} {response.reason_phrase}".rstrip()
    if is_missing_status(status):
        return NotAvailable(message)
    if is_transient_status(status):
        return TransientFetchError(message)
    return FetchError(message)


def _check_range(response: httpx.Response, offset: int) -> int:
    """How many leading bytes of this response body to drop so the stream begins at ``offset``."""
    if response.status_code == 200:
        return offset  # the server ignored Range: skip ourselves
    content_range = response.headers.get("content-range", "")
    # "bytes START-END/TOTAL"
    try:
        unit, _, spec = content_range.partition(" ")
        start = int(spec.split("-", 1)[0])
    except ValueError:
        start = -1
        unit = ""
    if unit != "bytes" or start != offset:
        raise FetchError(
            f"{response.request.url}: asked for bytes from {offset}, "
            f"got 206 with Content-Range {content_range!r}"
        )
    return 0


async def stream_url(
    client: httpx.AsyncClient, url: str, offset: int, stall_timeout: float
) -> AsyncIterator[bytes]:
    """Yield the raw bytes (never content-decoded) of ``url`` from ``offset`` on.

    Raises :class:`NotAvailable` for a missing file, :class:`TransientFetchError` for failures worth
    retrying (5xx, resets, stalls: also in the middle of the body) and :class:`FetchError`
    otherwise.
    """
    headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
    # Compressed NARs are served as application/x-xz etc. without Content-Encoding; and even if a
    # server adds one, we want the bytes as stored, so ask for nothing and decode nothing.
    headers["Accept-Encoding"] = "identity"
    try:
        async with asyncio.timeout(stall_timeout):
            request = client.build_request("GET", url, headers=headers)
            response = await client.send(request, stream=True)
    except TimeoutError as exc:
        raise TransientFetchError(f"{url}: no response in {stall_timeout:g}s") from exc
    except httpx.HTTPError as exc:
        raise translate_http_error(exc, url) from exc
    try:
        if response.status_code == 416:
            raise FetchError(f"{url}: offset {offset} is beyond the end of the file (HTTP 416)")
        if response.status_code not in (200, 206):
            raise _status_error(response)
        skip = _check_range(response, offset) if offset > 0 else 0
        chunks = response.aiter_raw()
        while True:
            try:
                async with asyncio.timeout(stall_timeout):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError as exc:
                raise TransientFetchError(
                    f"{url}: stalled, no byte for {stall_timeout:g}s"
                ) from exc
            except httpx.HTTPError as exc:
                raise translate_http_error(exc, url) from exc
            if skip:
                dropped = min(skip, len(chunk))
                skip -= dropped
                chunk = chunk[dropped:]
                if not chunk:
                    continue
            yield chunk
        if skip:
            raise FetchError(f"{url}: file ends before offset {offset}")
    finally:
        await response.aclose()
