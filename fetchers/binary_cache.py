"""The ``binary-cache`` fetcher: an HTTP(S) Nix binary cache such as https://cache.nixos.org.

It speaks the protocol Nix itself uses: ``GET /nix-cache-info`` once, ``GET /<hash>.narinfo`` per
path, and the NAR file named by the narinfo's ``URL``.  A cache that cannot be reached does not stop
the daemon from starting: the fetcher marks it down, answers quickly that it is unreachable, and
probes it again with backoff.

HTTP goes through one pooled aiohttp session per fetcher (keep-alive, HTTP/1.1): a narinfo GET costs
about a fifth of what it did with httpx (bench/README.md).
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiohttp

from substituter.errors import (
    ConfigError,
    FetchError,
    NarInfoError,
    PluginError,
    StorePathError,
    TransientFetchError,
)
from substituter.nix.narinfo import NarInfo
from substituter.nix.store_path import validate_hash_part
from substituter.plugin import Answer, Fetcher, FetcherContext, Offer, Unavailable, UriOpener

from ._http import (
    CONNECT_ERRORS,
    RequestAuth,
    RetryPolicy,
    check_status,
    is_missing_status,
    is_transient_status,
    new_session,
    retry_after_seconds,
    stream_url,
    translate_client_error,
)
from .binary_cache_http import ConnectionLost, SmallGets
from .cache_info import check_store_dir, parse_cache_info

__all__ = ["BinaryCacheFetcher", "BinaryCacheOptions", "HttpOpener"]

log = logging.getLogger("fetchers.binary_cache")

#: Metadata (nix-cache-info, narinfo) larger than this is not a narinfo: refuse to buffer it.
MAX_METADATA_BYTES = 1 << 20
#: Re-probing a down cache starts after this many seconds and doubles up to the maximum.
PROBE_BACKOFF_START = 1.0
PROBE_BACKOFF_MAX = 60.0
#: Longest wait for nix-cache-info once connected (start and re-probes).
PROBE_READ_TIMEOUT = 10.0
#: NAR files up to this size (by the narinfo's FileSize) are fetched whole by the plain client:
#: its stall timeout bounds the whole answer, so a slow link still gets ~9 KiB/s.
SMALL_FILE = 256 * 1024
#: A relative URL urljoin would only append to the cache's (no scheme, query, fragment,
#: leading slash or dot segment at the start; dot segments inside are checked apart).
_PLAIN_RELATIVE = re.compile(r"[A-Za-z0-9_~+=,@%-][A-Za-z0-9_~+=,@%.-]*(?:/[A-Za-z0-9_~+=,@%.-]+)*")


@dataclass(frozen=True)
class BinaryCacheOptions:
    url: str = field(metadata={"help": "base URL of the cache (http or https)"})
    connect_timeout: float = field(
        default=3.0, metadata={"help": "seconds to wait for a TCP/TLS connection"}
    )
    stall_timeout: float = field(
        default=30.0,
        metadata={"help": "seconds without a byte before a transfer counts as stalled"},
    )
    retries: int = field(
        default=3,
        metadata={"help": "extra tries for a narinfo after 5xx/408/429/connection errors"},
    )
    netrc_file: Path | None = field(
        default=None,
        metadata={"help": "netrc file with credentials (default: $NETRC, else ~/.netrc, if any)"},
    )
    bearer_token_file: Path | None = field(
        default=None,
        metadata={"help": "file with a token sent as 'Authorization: Bearer' to this cache only"},
    )
    http2: bool = field(
        default=True,
        metadata={"help": "accepted for compatibility; requests use pooled HTTP/1.1 keep-alive"},
    )
    max_connections: int = field(
        default=32, metadata={"help": "most simultaneous connections to this cache"}
    )

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"option 'url' must be an http:// or https:// URL, got {self.url!r}")
        if parts.username is not None or parts.password is not None:
            # The URL becomes the fetcher's name, shown to everyone on the dataspace and logged.
            raise ValueError("option 'url' must not carry credentials; put them in netrc-file "
                             "or bearer-token-file")
        for name in ("connect_timeout", "stall_timeout"):
            if not getattr(self, name) > 0:
                option = name.replace("_", "-")
                raise ValueError(f"option {option!r} must be a positive number of seconds")
        if self.retries < 0:
            raise ValueError(f"option 'retries' must be 0 or more, got {self.retries}")
        if self.max_connections < 1:
            raise ValueError(
                f"option 'max-connections' must be 1 or more, got {self.max_connections}"
            )


def default_netrc() -> Path | None:
    """The netrc file curl and Nix would read: ``$NETRC``, else ``~/.netrc``, when it exists."""
    env = os.environ.get("NETRC")
    candidate = Path(env) if env else Path.home() / ".netrc"
    return candidate if candidate.is_file() else None


class BinaryCacheFetcher(Fetcher):
    """Fetch paths from one HTTP(S) Nix binary cache."""

    kind = "binary-cache"
    Options = BinaryCacheOptions
    schemes = ("http", "https")

    options: BinaryCacheOptions

    def __init__(
        self,
        name: str,
        options: BinaryCacheOptions,
        context: FetcherContext | None = None,
        priority: int | None = None,
    ) -> None:
        super().__init__(name, options, context, priority)
        self.base_url = options.url.rstrip("/") + "/"
        self.retry = RetryPolicy(retries=options.retries)
        #: The cache's own ``Priority`` from nix-cache-info (lower first), once known.
        self.cache_priority: int | None = None
        self._client: aiohttp.ClientSession | None = None
        #: Plain narinfo GETs go here first (aiohttp's client costs ~0.1 ms of the loop each).
        self._small: SmallGets | None = None
        #: ... and small NAR files, on connections of their own (not queued behind narinfos).
        self._small_files: SmallGets | None = None
        self._clock: Callable[[], float] = time.monotonic
        self._down_reason: str | None = None
        self._next_probe = 0.0
        self._probe_backoff = PROBE_BACKOFF_START
        self._latency_ms: float | None = None

    def describe(self) -> str:
        return self.options.url

    @property
    def is_up(self) -> bool:
        return self._down_reason is None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        opts = self.options
        auth = self._auth()
        # max-connections is shared: half for narinfo GETs, a quarter for small NAR files, the
        # rest for aiohttp (larger NARs and whatever the plain clients hand back); with one,
        # aiohttp does everything.
        small = opts.max_connections // 2
        small_files = (opts.max_connections - small) // 2
        self._client = new_session(
            connect_timeout=opts.connect_timeout,
            stall_timeout=opts.stall_timeout,
            max_connections=opts.max_connections - small - small_files,
            auth=auth,
        )

        def plain(share: int, max_body: int) -> SmallGets | None:
            return SmallGets(
                self.base_url,
                connect_timeout=opts.connect_timeout,
                stall_timeout=opts.stall_timeout,
                max_connections=share,
                max_body=max_body,
                authorization=None if auth is None else auth.header,
            ) if share else None

        self._small = plain(small, MAX_METADATA_BYTES)
        self._small_files = plain(small_files, SMALL_FILE)
        try:
            await self._probe()
        except BaseException:
            await self.stop()  # a fetcher that failed to start holds no connections
            raise

    async def stop(self) -> None:
        for small in (self._small, self._small_files):
            if small is not None:
                small.close()
        self._small = self._small_files = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _auth(self) -> RequestAuth | None:
        """netrc credentials for any host they name, then the bearer token (it wins) for ours."""
        opts = self.options
        netrc_file = opts.netrc_file or default_netrc()
        if opts.netrc_file is not None and not opts.netrc_file.is_file():
            raise ConfigError(f"{self.name}: option 'netrc-file': {opts.netrc_file} does not exist")
        token = None
        if opts.bearer_token_file is not None:
            token = self._read_token(opts.bearer_token_file)
        if netrc_file is None and token is None:
            return None
        try:
            return RequestAuth(netrc_file, token, self.base_url)
        except Exception as exc:  # netrc.NetrcParseError, OSError
            raise ConfigError(f"{self.name}: option 'netrc-file': {netrc_file}: {exc}") from exc

    def _read_token(self, path: Path) -> str:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{self.name}: option 'bearer-token-file': cannot read {path}: {exc.strerror}"
            ) from exc
        if not token:
            raise ConfigError(f"{self.name}: option 'bearer-token-file': {path} is empty")
        return token

    # --- health -------------------------------------------------------------------------------

    async def _probe(self) -> None:
        """Read nix-cache-info once; a StoreDir mismatch is fatal, unreachability is not."""
        url = self.base_url + "nix-cache-info"
        try:
            status, body, _ = await self._get_small(url, self._probe_timeout())
        except FetchError as exc:
            self._mark_down(str(exc))
            return
        if is_transient_status(status):
            self._mark_down(f"{url}: HTTP {status}")
            return
        if status in (401, 403, 407):
            raise ConfigError(
                f"{self.name}: {url} refused us (HTTP {status}); check the credentials in "
                "option 'netrc-file' or 'bearer-token-file'"
            )
        if status != 200:
            raise ConfigError(
                f"{self.name}: {url} answered HTTP {status}; "
                f"is {self.options.url} a Nix binary cache?"
            )
        info = parse_cache_info(body.decode("utf-8", errors="replace"))
        check_store_dir(info, self.context.store_dir, f"{self.name} ({self.options.url})")
        self.cache_priority = info.priority
        if info.priority is not None and not self.priority_configured:
            self.priority = info.priority  # the cache's own Priority, as Nix uses it
        if self._down_reason is not None:
            log.info("%s: cache %s is reachable again", self.name, self.options.url)
        self._down_reason = None
        self._probe_backoff = PROBE_BACKOFF_START

    def _probe_timeout(self) -> aiohttp.ClientTimeout:
        # Startup waits on this probe: a cache that accepts but never answers must not hold the
        # daemon for a whole stall timeout.
        opts = self.options
        read = min(opts.stall_timeout, PROBE_READ_TIMEOUT)
        return aiohttp.ClientTimeout(total=None, sock_connect=opts.connect_timeout, sock_read=read)

    def _mark_down(self, reason: str) -> None:
        if self._down_reason is None:
            log.warning("%s: cache %s unreachable: %s", self.name, self.options.url, reason)
        self._down_reason = reason
        jitter = random.uniform(0.5, 1.0)
        self._next_probe = self._clock() + self._probe_backoff * jitter
        self._probe_backoff = min(PROBE_BACKOFF_MAX, self._probe_backoff * 2)

    async def _ensure_up(self) -> bool:
        if self._down_reason is not None and self._clock() >= self._next_probe:
            try:
                await self._probe()
            except ConfigError as exc:
                # The cache came back as something we cannot use: keep it down, say why.
                self._mark_down(str(exc))
        return self._down_reason is None

    # --- locate -------------------------------------------------------------------------------

    async def locate(self, hash_part: str) -> Answer:
        try:
            validate_hash_part(hash_part)
        except StorePathError as exc:
            return Unavailable(str(exc))
        if not await self._ensure_up():
            return Unavailable(f"cache unreachable: {self._down_reason}")
        url = f"{self.base_url}{hash_part}.narinfo"
        try:
            status, body = await self._get_retrying(url)
        except TransientFetchError as exc:
            if isinstance(exc.__cause__, CONNECT_ERRORS):
                self._mark_down(str(exc))
            return Unavailable(str(exc))
        except FetchError as exc:
            return Unavailable(str(exc))
        if is_missing_status(status):
            return Unavailable(f"not in {self.options.url} (HTTP {status})")
        if status != 200:
            return Unavailable(f"{url}: unexpected HTTP {status}")
        return self._offer(hash_part, url, body)

    def _offer(self, hash_part: str, url: str, body: bytes) -> Answer:
        try:
            info = NarInfo.parse(body)
        except NarInfoError as exc:
            log.warning("%s: %s does not parse: %s", self.name, url, exc)
            return Unavailable(f"{url}: bad narinfo: {exc}")
        if info.hash_part != hash_part:
            log.warning("%s: %s describes %s", self.name, url, info.store_path)
            return Unavailable(f"{url}: narinfo is for {info.store_path}, not {hash_part}")
        return Offer(
            info=info,
            uri=self._file_uri(info.url),
            compression=info.compression,
            file_size=info.file_size,
            file_hash=None if info.file_hash is None else str(info.file_hash),
            cost=round(self._latency_ms or 0),
        )

    def _file_uri(self, url: str) -> str:
        """The narinfo's URL resolved against the cache's: a plain relative path such as
        ``nar/<hash>.nar.xz`` (what caches write) is appended, anything else goes through
        urljoin (~6 µs an offer)."""
        if _PLAIN_RELATIVE.fullmatch(url) and "/./" not in url and "/../" not in url \
                and not url.endswith(("/.", "/..")):
            return self.base_url + url
        return urljoin(self.base_url, url)

    async def _get_retrying(self, url: str) -> tuple[int, bytes]:
        """GET a small resource, retrying transient failures with backoff (honours Retry-After)."""
        last: TransientFetchError | None = None
        for attempt in range(1, self.retry.tries + 1):
            retry_after: float | None = None
            started = self._clock()
            try:
                status, body, retry_after = await self._get_small(url)
            except TransientFetchError as exc:
                last = exc
            else:
                if not is_transient_status(status):
                    self._record_latency((self._clock() - started) * 1000)
                    return status, body
                last = TransientFetchError(f"{url}: HTTP {status}")
            if attempt < self.retry.tries:
                await self.retry.sleep(self.retry.delay(attempt, retry_after))
        assert last is not None
        raise TransientFetchError(
            f"gave up after {self.retry.tries} tries: {last}"
        ) from (last.__cause__ or last)

    def _record_latency(self, ms: float) -> None:
        # A moving average, so one slow answer does not reorder every offer.
        self._latency_ms = ms if self._latency_ms is None else 0.8 * self._latency_ms + 0.2 * ms

    async def _get_small(
        self, url: str, timeout: aiohttp.ClientTimeout | None = None
    ) -> tuple[int, bytes, float | None]:
        """GET a metadata file: (status, body, Retry-After); never buffers a runaway body."""
        small = self._small
        if timeout is None and small is not None and small.handles(url):
            plain = await small.get(url)
            if plain is not None:
                if plain.status == 200:
                    return 200, plain.body, None
                return plain.status, b"", retry_after_seconds(plain)
        client = self._require_client()
        try:
            request = client.get(url) if timeout is None else client.get(url, timeout=timeout)
            async with request as response:
                status = response.status
                if status != 200:
                    return status, b"", retry_after_seconds(response)
                length = response.content_length
                if length is not None and length > MAX_METADATA_BYTES:
                    raise FetchError(f"{url}: more than {MAX_METADATA_BYTES} bytes")
                body = await response.content.read(MAX_METADATA_BYTES + 1)
                if len(body) <= MAX_METADATA_BYTES and not response.content.at_eof():
                    # More than one read's worth (no or a wrong Content-Length): gather it.
                    parts = [body]
                    size = len(body)
                    while size <= MAX_METADATA_BYTES:
                        chunk = await response.content.read(MAX_METADATA_BYTES + 1 - size)
                        if not chunk:
                            break
                        parts.append(chunk)
                        size += len(chunk)
                    body = b"".join(parts)
                if len(body) > MAX_METADATA_BYTES:
                    raise FetchError(f"{url}: more than {MAX_METADATA_BYTES} bytes")
                return status, body, None
        except (aiohttp.ClientError, OSError) as exc:
            raise translate_client_error(exc, url) from exc

    @classmethod
    def opener(cls, context: FetcherContext) -> UriOpener:
        return HttpOpener()

    def _require_client(self) -> aiohttp.ClientSession:
        if self._client is None:
            raise PluginError(f"{self.name}: used before start() or after stop()")
        return self._client

    # --- open ---------------------------------------------------------------------------------

    async def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream the offered file from ``offset``; works for any http(s) URI, not only ours."""
        # Our own cache's files (nearly all offers) are http(s) by construction: no urlsplit.
        if not offer.uri.startswith(self.base_url) and urlsplit(offer.uri).scheme not in self.schemes:
            raise FetchError(f"{self.name}: cannot open {offer.uri!r}: not an http(s) URI")
        if offer.file_size is not None and offset >= offer.file_size:
            if offset > offer.file_size:
                raise FetchError(f"{offer.uri}: offset {offset} beyond size {offer.file_size}")
            return
        client = self._require_client()
        small = self._small_files
        if (offset == 0 and small is not None and offer.file_size is not None
                and offer.file_size <= SMALL_FILE and small.handles(offer.uri)):
            # A small file in one plain GET (a fifth of aiohttp's cost); anything unusual about
            # the answer (a redirect, chunked, larger than said) goes to aiohttp below.
            try:
                answer = await small.get(offer.uri)
            except ConnectionLost:
                answer = None  # nothing of it was handed on: aiohttp tries once more, from 0
            if answer is not None:
                check_status(offer.uri, answer.status, None, 0)
                if answer.body:
                    yield answer.body
                return
        async for chunk in stream_url(client, offer.uri, offset, self.options.stall_timeout):
            yield chunk


class HttpOpener(UriOpener):
    """Opens any http(s) URI with default settings: for offers from out-of-process fetchers."""

    def __init__(self, stall_timeout: float = 30.0, connect_timeout: float = 3.0) -> None:
        self.stall_timeout = stall_timeout
        self.connect_timeout = connect_timeout
        self._client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._client = new_session(
            connect_timeout=self.connect_timeout, stall_timeout=self.stall_timeout
        )

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        if self._client is None:
            raise PluginError("HttpOpener used before start() or after stop()")
        if urlsplit(offer.uri).scheme not in BinaryCacheFetcher.schemes:
            raise FetchError(f"cannot open {offer.uri!r}: not an http(s) URI")
        async for chunk in stream_url(self._client, offer.uri, offset, self.stall_timeout):
            yield chunk
