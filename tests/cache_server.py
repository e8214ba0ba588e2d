"""A real HTTP binary cache for tests: serves a `nix copy --to file://DIR` directory on loopback.

It runs in its own threads (``ThreadingHTTPServer``), so it works the same from sync tests, async
tests and tests that block on a Nix subprocess.  It speaks HTTP/1.1 with keep-alive, answers GET and
HEAD, honours ``Range: bytes=N-`` / ``bytes=N-M`` and can be told to misbehave::

    with CacheServer(cache.root) as server:          # or the `serve_cache` fixture
        server.fail_next(2, status=503, retry_after=1)  # next two requests: 503
        server.cut_after(1000)                         # next NAR: connection dies after 1000 bytes
        server.corrupt(17)                             # every NAR: byte 17 flipped
        release = server.stall(after=4096)             # next NAR: hangs after 4 KiB until
                                                       #   release.set()
        server.require_bearer("s3cret")                # 401 without that token
        server.hide("*.narinfo")                       # 404 for matching paths
        server.honour_range = False                    # answer Range requests with a full 200
        server.reset_next(2)                           # next two requests: connection closed, no
                                                       #   response at all
        release = server.hang_next()                   # next request: no response until released
        server.misrange()                              # Range requests: 206 from byte 0 (wrong)
        server.add_headers("*.gz", {"Content-Encoding": "gzip"})  # extra response headers
        server.requests                                # what was asked, with status and headers

Faults match the request path without its leading slash, as a glob (``nar/*`` by default for the
byte-level faults, ``*`` for ``fail_next``).  ``build_cache`` makes a real signed cache with Nix.
"""

from __future__ import annotations

import base64
import fnmatch
import http.server
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import Nix

__all__ = [
    "CacheServer",
    "RecordedRequest",
    "BuiltCache",
    "build_cache",
    "closed_port",
    "serve_cache",
]

CHUNK = 64 * 1024

CONTENT_TYPES = {
    ".narinfo": "text/x-nix-narinfo",
    ".xz": "application/x-xz",
    ".zst": "application/zstd",
    ".bz2": "application/x-bzip2",
    ".br": "application/x-brotli",
    ".nar": "application/x-nix-nar",
    "nix-cache-info": "text/x-nix-cache-info",
}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    status: int
    client_port: int  # tells connections apart: keep-alive reuses one


@dataclass
class _Fault:
    match: str
    times: int | None  # None: until cleared
    status: int = 0
    retry_after: str | None = None
    after: int = 0
    release: threading.Event | None = None

    def applies(self, path: str) -> bool:
        return (self.times is None or self.times > 0) and fnmatch.fnmatchcase(path, self.match)

    def use(self) -> None:
        if self.times is not None:
            self.times -= 1


@dataclass
class _Faults:
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: list[_Fault] = field(default_factory=list)
    cuts: list[_Fault] = field(default_factory=list)
    corruptions: list[_Fault] = field(default_factory=list)
    stalls: list[_Fault] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    resets: list[_Fault] = field(default_factory=list)
    hangs: list[_Fault] = field(default_factory=list)
    misranges: list[_Fault] = field(default_factory=list)
    headers: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def take(self, faults: list[_Fault], path: str) -> _Fault | None:
        """The first fault of a kind that applies to ``path``, consuming one of its uses."""
        with self.lock:
            for fault in faults:
                if fault.applies(path):
                    fault.use()
                    return fault
        return None

    def all_matching(self, faults: list[_Fault], path: str) -> list[_Fault]:
        with self.lock:
            return [f for f in faults if f.applies(path)]


class CacheServer:
    """Serve ``root`` over HTTP on ``host``; port 0 (default) lets the kernel pick: read ``url``."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = root.absolute()
        self.host = host
        self.requested_port = port
        self.honour_range = True
        self.requests: list[RecordedRequest] = []
        self._required_auth: str | None = None
        self._faults = _Faults()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> CacheServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type(
            "_Server", (http.server.ThreadingHTTPServer,), {"address_family": family}
        )
        self._server = server_class((self.host, self.requested_port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cache-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        for stall in self._faults.stalls + self._faults.hangs:  # never leave a handler parked
            if stall.release is not None:
                stall.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> CacheServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def paths_requested(self, method: str = "GET") -> list[str]:
        return [r.path for r in self.requests if r.method == method]

    # --- auth and faults --------------------------------------------------------------------------

    def require_basic(self, user: str, password: str) -> None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._required_auth = f"Basic {token}"

    def require_bearer(self, token: str) -> None:
        self._required_auth = f"Bearer {token}"

    def fail_next(
        self, n: int, status: int = 500, *, match: str = "*", retry_after: float | str | None = None
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (and an optional Retry-After)."""
        after = None if retry_after is None else str(retry_after)
        with self._faults.lock:
            self._faults.statuses.append(_Fault(match, n, status=status, retry_after=after))

    def cut_after(self, nbytes: int, *, match: str = "nar/*", times: int = 1) -> None:
        """Kill the connection after ``nbytes`` of a matching body (Content-Length stays whole)."""
        with self._faults.lock:
            self._faults.cuts.append(_Fault(match, times, after=nbytes))

    def corrupt(self, byte_index: int, *, match: str = "nar/*") -> None:
        """Flip every bit of byte ``byte_index`` (of the whole file) in every matching body."""
        with self._faults.lock:
            self._faults.corruptions.append(_Fault(match, None, after=byte_index))

    def stall(self, *, after: int = 0, match: str = "nar/*", times: int = 1) -> threading.Event:
        """Stop sending a matching body after ``after`` bytes until the returned event is set."""
        release = threading.Event()
        with self._faults.lock:
            self._faults.stalls.append(_Fault(match, times, after=after, release=release))
        return release

    def hide(self, match: str) -> None:
        """Answer 404 for matching paths, as if the files were not there."""
        with self._faults.lock:
            self._faults.hidden.append(match)

    def reset_next(self, n: int = 1, *, match: str = "*") -> None:
        """Close the connection of the next ``n`` matching requests without any response."""
        with self._faults.lock:
            self._faults.resets.append(_Fault(match, n))

    def hang_next(self, n: int = 1, *, match: str = "*") -> threading.Event:
        """Send no response to the next ``n`` matching requests until the returned event is set."""
        release = threading.Event()
        with self._faults.lock:
            self._faults.hangs.append(_Fault(match, n, release=release))
        return release

    def misrange(self, *, match: str = "*") -> None:
        """Answer matching Range requests with a 206 that starts at byte 0, not where asked."""
        with self._faults.lock:
            self._faults.misranges.append(_Fault(match, None))

    def add_headers(self, match: str, headers: dict[str, str]) -> None:
        """Send ``headers`` with every matching (non-error) response."""
        with self._faults.lock:
            self._faults.headers.append((match, dict(headers)))

    def drop_connections(self) -> None:
        """Close every kept-alive connection now (with stop(): clients find nobody listening)."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def clear_faults(self) -> None:
        for stall in self._faults.stalls + self._faults.hangs:
            if stall.release is not None:
                stall.release.set()
        self._faults = _Faults()

    # --- used by the handler ----------------------------------------------------------------------

    def _resolve(self, path: str) -> Path | None:
        with self._faults.lock:
            if any(fnmatch.fnmatchcase(path, pattern) for pattern in self._faults.hidden):
                return None
        candidate = Path(os.path.normpath(self.root / path))
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate


def _content_type(path: str) -> str:
    for suffix, content_type in CONTENT_TYPES.items():
        if path.endswith(suffix):
            return content_type
    return "application/octet-stream"


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single ``bytes=`` range; None when absent or unparseable."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes="):].partition("-")
    try:
        if not first:  # suffix range: the last N bytes
            return max(0, size - int(last)), size
        start = int(first)
        end = min(size, int(last) + 1) if last else size
    except ValueError:
        return None
    return start, end


def _make_handler(server: CacheServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "test-cache-server"

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def setup(self) -> None:
            super().setup()
            with server._open_lock:
                server._open.add(self.connection)

        def finish(self) -> None:
            with server._open_lock:
                server._open.discard(self.connection)
            super().finish()

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _record(self, path: str, status: int) -> None:
            server.requests.append(
                RecordedRequest(
                    self.command, path, dict(self.headers.items()), status, self.client_address[1]
                )
            )

        def _empty(self, path: str, status: int, headers: dict[str, str] | None = None) -> None:
            self._record(path, status)
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            if status == 404:
                self.send_header("Cache-Control", "no-store")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0].lstrip("/")
            faults = server._faults
            if server._required_auth and self.headers.get("Authorization") != server._required_auth:
                self._empty(path, 401, {"WWW-Authenticate": 'Basic realm="cache"'})
                return
            if faults.take(faults.resets, path) is not None:
                self._record(path, 0)
                self._kill_connection()
                return
            hang = faults.take(faults.hangs, path)
            if hang is not None:
                assert hang.release is not None
                hang.release.wait()
            failure = faults.take(faults.statuses, path)
            if failure is not None:
                extra = {"Retry-After": failure.retry_after} if failure.retry_after else {}
                self._empty(path, failure.status, extra)
                return
            file = server._resolve(path)
            if file is None:
                self._empty(path, 404)
                return
            size = file.stat().st_size
            wanted = _parse_range(self.headers.get("Range"), size) if server.honour_range else None
            start, end = wanted if wanted is not None else (0, size)
            if wanted is not None and faults.all_matching(faults.misranges, path):
                start = 0
            if wanted is not None and start >= size:
                self._empty(path, 416, {"Content-Range": f"bytes */{size}"})
                return
            status = 206 if wanted is not None else 200
            self._record(path, status)
            self.send_response(status)
            self.send_header("Content-Type", _content_type(path))
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            with faults.lock:
                extra = [h for m, h in faults.headers if fnmatch.fnmatchcase(path, m)]
            for headers in extra:
                for name, value in headers.items():
                    self.send_header(name, value)
            self.end_headers()
            if body:
                self._send_body(path, file, start, end)

        def _send_body(self, path: str, file: Path, start: int, end: int) -> None:
            faults = server._faults
            cut = faults.take(faults.cuts, path)
            stall = faults.take(faults.stalls, path)
            corruptions = faults.all_matching(faults.corruptions, path)
            sent = 0  # bytes of this response body written so far
            with file.open("rb") as f:
                f.seek(start)
                position = start
                while position < end:
                    chunk = bytearray(f.read(min(CHUNK, end - position)))
                    for corruption in corruptions:
                        if position <= corruption.after < position + len(chunk):
                            chunk[corruption.after - position] ^= 0xFF
                    if stall is not None and sent + len(chunk) > stall.after:
                        keep = stall.after - sent
                        self._write(chunk[:keep])
                        sent, position, chunk = sent + keep, position + keep, chunk[keep:]
                        assert stall.release is not None
                        stall.release.wait()
                        stall = None
                    if cut is not None and sent + len(chunk) > cut.after:
                        self._write(chunk[: cut.after - sent])
                        self._kill_connection()
                        return
                    self._write(chunk)
                    sent += len(chunk)
                    position += len(chunk)

        def _write(self, data: bytes | bytearray) -> None:
            if data:
                self.wfile.write(data)
                self.wfile.flush()

        def _kill_connection(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    return Handler


# --- fixtures and real caches ---------------------------------------------------------------------


@pytest.fixture
def serve_cache() -> Iterator[Callable[[Path], CacheServer]]:
    """A factory: ``serve_cache(dir)`` starts a CacheServer, stopped when the test ends."""
    servers: list[CacheServer] = []

    def start(root: Path, host: str = "127.0.0.1", port: int = 0) -> CacheServer:
        server = CacheServer(root, host, port).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def closed_port(host: str = "127.0.0.1") -> int:
    """A loopback port nobody listens on (bound, read back, closed): connecting is refused."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class BuiltCache:
    """A real binary cache directory made by ``nix copy``, with the closure it holds."""

    root: Path
    top: str
    paths: list[str]
    public_key: str
    compression: str

    @staticmethod
    def hash_part(store_path: str) -> str:
        return Path(store_path).name[:32]

    def narinfo_file(self, store_path: str) -> Path:
        return self.root / f"{self.hash_part(store_path)}.narinfo"

    def narinfo_text(self, store_path: str) -> str:
        return self.narinfo_file(store_path).read_text()

    def nar_file(self, store_path: str) -> Path:
        """The file the narinfo's URL names."""
        for line in self.narinfo_text(store_path).splitlines():
            if line.startswith("URL: "):
                return self.root / line[len("URL: "):]
        raise AssertionError(f"{self.narinfo_file(store_path)} has no URL line")


def build_cache(
    nix: Nix,
    keys: tuple[Path, Path, str],
    dest: Path,
    compression: str = "xz",
    *,
    name: str = "closure",
    n_deps: int = 2,
) -> BuiltCache:
    """Build a fresh closure, sign it with ``keys`` and ``nix copy`` it to ``file://dest``."""
    secret_key, _, public_key = keys
    top, paths = nix.closure(name, n_deps)
    nix.run("nix", "store", "sign", "-r", "--key-file", str(secret_key), top)
    if dest.exists():
        shutil.rmtree(dest)
    nix.run("nix", "copy", "--to", f"file://{dest}?compression={compression}", top)
    return BuiltCache(dest, top, paths, public_key, compression)
