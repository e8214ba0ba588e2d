"""An asyncio client for the nix-daemon worker protocol (versions 1.34 to 1.38).

Only the operations a substituter needs: validity and metadata queries, temporary GC
roots, and adding paths from NAR streams. One operation runs at a time per connection.
After the daemon reports an error the connection stays usable. After anything that leaves
the byte stream in an unknown state (a NAR producer raising, cancellation, a protocol
error) the connection is dropped without sending the end of the NAR, so the daemon discards
the partial path; the next call reconnects.

Signatures are checked by the daemon: a trusted client may pass ``dont_check_sigs``; for
an untrusted one the daemon requires a signature from a key in its
``trusted-public-keys`` (or a CA that checks) and ignores ``dont_check_sigs``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import subprocess
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from substituter.errors import ProtocolError, StoreError
from substituter.store import wire
from substituter.store.base import (
    DEFAULT_STORE_DIR,
    PathInfo,
    StoreItem,
    check_path_info,
    check_store_path,
    guarded_nar,
    strip_ansi,
)

__all__ = ["DEFAULT_SOCKET", "DaemonStore", "StartedDaemon", "resolve_socket_path"]

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/nix/var/nix/daemon-socket/socket"

WORKER_MAGIC_1 = 0x6E697863  # client hello
WORKER_MAGIC_2 = 0x6478696F  # daemon hello


def _version(major: int, minor: int) -> int:
    return (major << 8) | minor


OLDEST_VERSION = _version(1, 34)
NEWEST_VERSION = _version(1, 38)
# Feature names we understand for protocol >= 1.38; none is needed yet.
CLIENT_FEATURES: frozenset[str] = frozenset()

# The daemon speaks in frames no larger than this; large chunks are split to match.
MAX_FRAME = 256 * 1024


class Op(enum.IntEnum):
    IS_VALID_PATH = 1
    ADD_TEMP_ROOT = 11
    QUERY_PATH_INFO = 26
    QUERY_VALID_PATHS = 31
    ADD_TO_STORE_NAR = 39
    ADD_MULTIPLE_TO_STORE = 44


class Stderr(enum.IntEnum):
    LAST = 0x616C7473
    ERROR = 0x63787470
    NEXT = 0x6F6C6D67
    START_ACTIVITY = 0x53545254
    STOP_ACTIVITY = 0x53544F50
    RESULT = 0x52534C54
    READ = 0x64617461
    WRITE = 0x64617416


_FIELD_INT, _FIELD_STRING = 0, 1
_TRUSTED_FLAG = {0: None, 1: True, 2: False}


def resolve_socket_path(address: str | None) -> str:
    """Map ``None``, ``daemon``, ``unix://PATH[?params]`` or a plain path to a socket path.

    ``None`` and ``daemon`` mean the system daemon (``NIX_DAEMON_SOCKET_PATH`` if set).
    """
    if address is None or address == "daemon":
        return os.environ.get("NIX_DAEMON_SOCKET_PATH") or DEFAULT_SOCKET
    if address.startswith("unix://"):
        path = address[len("unix://") :].split("?", 1)[0]
        return path or os.environ.get("NIX_DAEMON_SOCKET_PATH") or DEFAULT_SOCKET
    if "://" in address:
        raise StoreError(f"store address {address!r} is not a nix-daemon socket (unix://PATH)")
    return address


class _DaemonError(StoreError):
    """Internal marker: the daemon reported an error and the stream is still in sync."""


def _scratch_file() -> BinaryIO:
    """An unnamed read-write file: in memory where Linux offers it (importing tempfile, with
    shutil, random, bz2 and lzma, costs a one-off fetch ~3 ms)."""
    try:
        return open(os.memfd_create("nix-daemon-stderr", os.MFD_CLOEXEC), "w+b")
    except (AttributeError, OSError):
        import tempfile

        return tempfile.TemporaryFile()


class StartedDaemon:
    """A ``nix-daemon --stdio`` child started (synchronously, so it can come up while the caller
    still imports or sets up), its stdin and stdout one end of a socket pair; attach with
    :meth:`DaemonStore.spawn`.  Its stderr goes to a temporary file, read only to explain a
    failure."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None, name: str) -> None:
        self.args, self.env, self.name = args, env, name
        self._sock, theirs = socket.socketpair()
        self._stderr = _scratch_file()
        self._stderr_tail = ""
        try:
            self.process = subprocess.Popen(
                args, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=self._stderr,
                env=None if env is None else dict(env),
            )
        except OSError as exc:
            self._sock.close()
            self._stderr.close()
            raise StoreError(f"cannot run {args[0]}: {exc}") from exc
        finally:
            theirs.close()

    def again(self) -> StartedDaemon:
        """A new child like this one (after a connection was dropped)."""
        return StartedDaemon(self.args, self.env, self.name)

    def stderr_text(self) -> str:
        """The end of what the child wrote to stderr (complete once it has been reaped)."""
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_tail = strip_ansi(self._stderr.read()[-2048:].decode(errors="replace")).strip()
        return self._stderr_tail

    def kill(self) -> None:
        """Stop an unused child (and release its pipes)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._sock.close()
        self._stderr.close()

    async def _exited(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Wait until the child exits, woken by its pidfd (no polling; Linux >= 5.3), or
        return at once where there is none (the caller then polls)."""
        try:
            pidfd = os.pidfd_open(self.process.pid)
        except (AttributeError, OSError):
            return
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        try:
            loop.add_reader(pidfd, readable)
            try:
                await asyncio.wait_for(exited, timeout)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)

    async def reap(self, timeout: float = 10.0) -> None:
        """Wait for the child to exit (it does at end of input), killing it if it does not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.process.poll() is None:
            await self._exited(loop, timeout)
        delay = 0.001
        while self.process.poll() is None:
            if loop.time() > deadline:
                self.process.kill()
                self.process.wait()
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self.stderr_text()  # kept for an error message
        self._stderr.close()


class _Connection:
    """One handshaken connection and the daemon's side of the handshake.

    ``socket_path`` names the peer in messages; ``child`` is set when the daemon is our own
    ``nix-daemon --stdio``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        socket_path: str,
        child: StartedDaemon | None = None,
    ) -> None:
        self.writer = writer
        self.wire = wire.WireReader(reader, f"nix-daemon at {socket_path}")
        self.socket_path = socket_path
        self.child = child
        self.version = 0
        self.nix_version: str | None = None
        self.trusted: bool | None = None
        self.features: frozenset[str] = frozenset()

    @classmethod
    async def open(cls, socket_path: str) -> _Connection:
        try:
            reader, writer = await asyncio.open_unix_connection(socket_path)
        except OSError as exc:
            raise StoreError(f"cannot connect to nix-daemon at {socket_path}: {exc}") from exc
        conn = cls(reader, writer, socket_path)
        await conn._start()
        return conn

    @classmethod
    async def attach(cls, child: StartedDaemon) -> _Connection:
        """Handshake with a started ``nix-daemon --stdio`` child."""
        reader, writer = await asyncio.open_unix_connection(sock=child._sock)
        conn = cls(reader, writer, child.name, child)
        await conn._start()
        return conn

    async def _start(self) -> None:
        try:
            await self._handshake()
        except _DaemonError as exc:
            await self._fail()
            raise StoreError(f"nix-daemon at {self.socket_path} refused the connection: {exc}") from None
        except ProtocolError as exc:
            await self._fail()
            detail = self.child.stderr_text() if self.child is not None else ""
            if detail:  # a child that died says why on its stderr
                raise StoreError(f"{self.socket_path} failed: {detail}") from exc
            raise
        except BaseException:
            await self._fail()
            raise

    async def _fail(self) -> None:
        self.abort()
        await self.reap()

    async def reap(self) -> None:
        if self.child is not None:
            await self.child.reap()

    async def _handshake(self) -> None:
        await self.send(wire.u64(WORKER_MAGIC_1))
        if await self.wire.u64("the hello") != WORKER_MAGIC_2:
            raise ProtocolError(f"{self.socket_path} did not answer like a nix-daemon")
        daemon_version = await self.wire.u64("the protocol version")
        if daemon_version >> 8 != 1 or daemon_version < OLDEST_VERSION:
            raise ProtocolError(
                f"nix-daemon at {self.socket_path} speaks protocol"
                f" {daemon_version >> 8}.{daemon_version & 0xFF}; this client needs 1.34 to 1.38"
            )
        # Old daemons (2.8) do not take the minimum themselves, so send the agreed version.
        self.version = min(daemon_version, NEWEST_VERSION)
        await self.send(wire.u64(self.version))
        if self.minor >= 38:
            await self.send(wire.string_set(CLIENT_FEATURES))
            daemon_features = await self.wire.string_list("the feature set")
            self.features = CLIENT_FEATURES & frozenset(daemon_features)
        # Obsolete CPU affinity (none) and reserveSpace (false).
        await self.send(wire.u64(0), wire.boolean(False))
        if self.minor >= 33:
            self.nix_version = await self.wire.string("the Nix version")
        if self.minor >= 35:
            flag = await self.wire.u64("the trusted flag")
            if flag not in _TRUSTED_FLAG:
                raise ProtocolError(f"nix-daemon sent trusted flag {flag}, expected 0, 1 or 2")
            self.trusted = _TRUSTED_FLAG[flag]
        await self.read_stderr()

    @property
    def minor(self) -> int:
        return self.version & 0xFF

    async def send(self, *parts: bytes) -> None:
        self.writer.write(b"".join(parts))
        try:
            await self.writer.drain()
        except OSError as exc:
            raise ProtocolError(
                f"writing to nix-daemon at {self.socket_path} failed: {exc}"
            ) from exc

    def abort(self) -> None:
        """Drop the connection at once; a NAR in flight is left unterminated."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass  # the daemon hung up first; nothing is lost on close
        await self.reap()

    async def read_stderr(self) -> None:
        """Consume log messages until LAST; raise _DaemonError for ERROR."""
        while True:
            kind = await self.wire.u64("a message type")
            if kind == Stderr.LAST:
                return
            if kind == Stderr.ERROR:
                raise _DaemonError(await self._read_error())
            if kind == Stderr.NEXT:
                log.info("nix-daemon: %s", strip_ansi(await self.wire.string()).rstrip())
            elif kind == Stderr.START_ACTIVITY:
                activity = await self.wire.u64("an activity id")
                await self.wire.u64("a verbosity")
                await self.wire.u64("an activity type")
                text = await self.wire.string("an activity text")
                await self._read_fields()
                await self.wire.u64("a parent activity id")
                if text:
                    log.debug("nix-daemon activity %d: %s", activity, strip_ansi(text))
            elif kind == Stderr.STOP_ACTIVITY:
                await self.wire.u64("an activity id")
            elif kind == Stderr.RESULT:
                await self.wire.u64("an activity id")
                await self.wire.u64("a result type")
                await self._read_fields()
            elif kind == Stderr.READ:
                # Only pre-1.23 uploads ask for data this way; we always send frames.
                raise ProtocolError("nix-daemon asked for unframed data (STDERR_READ)")
            elif kind == Stderr.WRITE:
                # Only dumps to a client-side sink use this; no operation here has one.
                raise ProtocolError("nix-daemon sent data for a sink (STDERR_WRITE)")
            else:
                raise ProtocolError(f"nix-daemon sent unknown message type {kind:#x}")

    async def _read_fields(self) -> None:
        count = await self.wire.u64("a field count")
        for _ in range(count):
            kind = await self.wire.u64("a field type")
            if kind == _FIELD_INT:
                await self.wire.u64("an integer field")
            elif kind == _FIELD_STRING:
                await self.wire.string("a string field")
            else:
                raise ProtocolError(f"nix-daemon sent unknown field type {kind}")

    async def _read_error(self) -> str:
        # >= 1.26: type, level, name, message, position (always 0), traces.
        await self.wire.string("the error type")
        await self.wire.u64("the error level")
        await self.wire.string("the error name")
        message = strip_ansi(await self.wire.string("the error message")).strip()
        if await self.wire.u64("the error position") != 0:
            raise ProtocolError("nix-daemon sent an error position, which it never does")
        traces = []
        for _ in range(await self.wire.u64("the trace count")):
            if await self.wire.u64("a trace position") != 0:
                raise ProtocolError("nix-daemon sent a trace position, which it never does")
            traces.append(strip_ansi(await self.wire.string("a trace")).strip())
        return "\n".join([message, *traces])


def _path_info_fields(info: PathInfo) -> bytes:
    """ValidPathInfo without the path, in wire order (deriver, hash, refs, ...)."""
    return b"".join(
        [
            wire.string(info.deriver or ""),
            wire.string(info.nar_hash),
            wire.string_set(info.references),
            wire.u64(info.registration_time),
            wire.u64(info.nar_size),
            wire.boolean(info.ultimate),
            wire.string_set(info.sigs),
            wire.string(info.ca or ""),
        ]
    )


async def _split(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes | memoryview]:
    async for chunk in chunks:
        view = memoryview(chunk)
        for start in range(0, len(view), MAX_FRAME):
            yield view[start : start + MAX_FRAME]


class DaemonStore:
    """A Nix store reached through a nix-daemon: ``await DaemonStore.connect()`` for a socket,
    ``await DaemonStore.spawn(DIR)`` for a (chroot) store served by our own ``nix-daemon --stdio``."""

    def __init__(
        self,
        socket_path: str,
        conn: _Connection,
        store_dir: str,
        *,
        reconnect: Callable[[], Awaitable[_Connection]] | None = None,
        root: str | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.store_dir = store_dir
        #: The store's directory when we run its daemon ourselves (see :meth:`spawn`).
        self.root = root
        #: Ours alone (a chroot DIR): no other party's trust settings apply, so the caller's
        #: own trust decision is the only signature check, as with ``nix-store --import``.
        self.private = root is not None
        self._conn: _Connection | None = conn
        self._reconnect = reconnect or (lambda: _Connection.open(socket_path))
        self.connection_count = 1  # connections opened so far, including reconnects
        self._lock = asyncio.Lock()
        self._closed = False
        self._dropped: list[_Connection] = []  # aborted connections whose child is not yet reaped
        self.protocol_version = (conn.version >> 8, conn.version & 0xFF)
        self.nix_version = conn.nix_version
        self.trusted = conn.trusted  # None: the daemon (protocol < 1.35) does not say
        self.features = conn.features

    @classmethod
    async def connect(
        cls, socket_path: str | None = None, *, store_dir: str = DEFAULT_STORE_DIR
    ) -> DaemonStore:
        """Connect and handshake; ``socket_path`` as in :func:`resolve_socket_path`.

        Paths are checked against ``store_dir`` before they are sent, because the daemon
        closes the connection on a path it cannot parse.
        """
        path = resolve_socket_path(socket_path)
        return cls(path, await _Connection.open(path), store_dir)

    @staticmethod
    def start(
        root: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        nix_bin: str | os.PathLike[str] | None = None,
    ) -> StartedDaemon:
        """Start ``nix-daemon --stdio --store ROOT`` now; hand it to :meth:`spawn` later."""
        daemon = str(Path(nix_bin) / "nix-daemon") if nix_bin else "nix-daemon"
        return StartedDaemon([daemon, "--stdio", "--store", str(root)], env,
                             f"nix-daemon --stdio --store {root}")

    @classmethod
    async def spawn(
        cls,
        root: str | os.PathLike[str],
        *,
        store_dir: str = DEFAULT_STORE_DIR,
        env: Mapping[str, str] | None = None,
        nix_bin: str | os.PathLike[str] | None = None,
        started: StartedDaemon | None = None,
    ) -> DaemonStore:
        """The store at ``root`` (``--store ROOT``, a chroot store), through ``nix-daemon --stdio``
        run as our child (``started`` by :meth:`start` earlier, or now): one process for every
        query and import, and the worker protocol keeps signatures and CA, which
        ``nix-store --import`` drops.  The child runs as us, so it treats us as trusted.  It
        exits when the connection closes; after a dropped connection the next call starts another."""
        first = started or cls.start(root, env=env, nix_bin=nix_bin)
        later = [first]

        def reconnect() -> Awaitable[_Connection]:
            later[0] = later[0].again()
            return _Connection.attach(later[0])

        return cls(first.name, await _Connection.attach(first), store_dir, reconnect=reconnect,
                   root=str(root))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        async with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await conn.close()
            dropped, self._dropped = self._dropped, []
            for conn in dropped:
                await conn.reap()

    @asynccontextmanager
    async def _operation(self) -> AsyncIterator[_Connection]:
        """Exclusive use of a live connection; drop it unless the stream is known in sync."""
        if self._closed:
            raise StoreError(f"DaemonStore for {self.socket_path} is closed")
        async with self._lock:
            if self._conn is None:
                self._conn = await self._reconnect()
                self.connection_count += 1
            conn = self._conn
            try:
                yield conn
            except _DaemonError as exc:
                raise StoreError(str(exc)) from None
            except BaseException:
                self._conn = None
                conn.abort()
                if conn.child is not None:
                    self._dropped.append(conn)  # it exits at end of input; reaped on close()
                raise

    async def is_valid_path(self, path: str) -> bool:
        check_store_path(path, self.store_dir)
        async with self._operation() as conn:
            await conn.send(wire.u64(Op.IS_VALID_PATH), wire.string(path))
            await conn.read_stderr()
            return await conn.wire.boolean("the validity")

    async def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        paths = {check_store_path(path, self.store_dir) for path in paths}
        async with self._operation() as conn:
            # The trailing false: do not try substituters for missing paths.
            await conn.send(
                wire.u64(Op.QUERY_VALID_PATHS), wire.string_set(paths), wire.boolean(False)
            )
            await conn.read_stderr()
            return set(await conn.wire.string_list("the valid paths"))

    async def query_path_info(self, path: str) -> PathInfo | None:
        """Metadata of a valid path (``nar_hash`` as bare hex, as the daemon sends it)."""
        check_store_path(path, self.store_dir)
        async with self._operation() as conn:
            await conn.send(wire.u64(Op.QUERY_PATH_INFO), wire.string(path))
            await conn.read_stderr()
            if not await conn.wire.boolean("the validity"):
                return None
            deriver = await conn.wire.string("the deriver")
            nar_hash = await conn.wire.string("the NAR hash")
            references = await conn.wire.string_list("the references")
            registration_time = await conn.wire.u64("the registration time")
            nar_size = await conn.wire.u64("the NAR size")
            ultimate = await conn.wire.boolean("the ultimate flag")
            sigs = await conn.wire.string_list("the signatures")
            ca = await conn.wire.string("the content address")
            return PathInfo(
                store_path=path,
                nar_hash=nar_hash,
                nar_size=nar_size,
                references=frozenset(references),
                deriver=deriver or None,
                sigs=frozenset(sigs),
                ca=ca or None,
                ultimate=ultimate,
                registration_time=registration_time,
            )

    async def add_temp_root(self, path: str) -> None:
        """Protect ``path`` from garbage collection while this connection lives."""
        check_store_path(path, self.store_dir)
        async with self._operation() as conn:
            await conn.send(wire.u64(Op.ADD_TEMP_ROOT), wire.string(path))
            await conn.read_stderr()
            await conn.wire.u64("the acknowledgement")

    async def add_to_store_nar(
        self,
        info: PathInfo,
        nar_chunks: AsyncIterable[bytes],
        *,
        repair: bool = False,
        dont_check_sigs: bool = False,
    ) -> None:
        """Stream one path's NAR to the daemon, which checks NarHash, NarSize and (unless
        trusted and ``dont_check_sigs``) signatures before registering it.

        The NAR must already be verified by the caller; even so, if ``nar_chunks`` raises,
        or the bytes do not add up to ``info.nar_size``, the connection is dropped before
        the last chunk is sent and the daemon registers nothing.
        """
        check_path_info(info, self.store_dir)
        async with self._operation() as conn:
            await conn.send(
                wire.u64(Op.ADD_TO_STORE_NAR),
                wire.string(info.store_path),
                _path_info_fields(info),
                wire.boolean(repair),
                wire.boolean(dont_check_sigs),
            )
            await self._send_framed(conn, guarded_nar(info, nar_chunks, check_hash=False))

    async def add_multiple_to_store(
        self,
        items: Iterable[StoreItem],
        *,
        repair: bool = False,
        dont_check_sigs: bool = False,
    ) -> None:
        """Add paths in topological order in one operation (protocol >= 1.32).

        Paths already valid are skipped without reading their streams (unless ``repair``):
        Nix 2.8 does not consume the NAR of a valid path here and would lose its place in
        the stream. The daemon registers each path once its NAR is complete. If a producer
        fails, that path is never registered; earlier ones may or may not be, because the
        daemon stops work when the client hangs up. Retrying the whole list is safe.
        """
        items = list(items)
        for info, _ in items:
            check_path_info(info, self.store_dir)
        if not repair:
            valid = await self.query_valid_paths(info.store_path for info, _ in items)
            items = [(info, chunks) for info, chunks in items if info.store_path not in valid]
        if not items:
            return

        async def stream() -> AsyncIterator[bytes]:
            head = wire.u64(len(items))
            for info, nar_chunks in items:
                head += wire.string(info.store_path) + _path_info_fields(info)
                async for chunk in guarded_nar(info, nar_chunks, check_hash=False):
                    if head:  # a path's header goes in one frame with its first NAR bytes
                        chunk, head = head + chunk, b""
                    yield chunk
            if head:
                yield head

        async with self._operation() as conn:
            await conn.send(
                wire.u64(Op.ADD_MULTIPLE_TO_STORE),
                wire.boolean(repair),
                wire.boolean(dont_check_sigs),
            )
            await self._send_framed(conn, stream())

    @staticmethod
    async def _send_framed(conn: _Connection, chunks: AsyncIterable[bytes]) -> None:
        """Send ``chunks`` as frames while the daemon's log is read concurrently, as
        Nix does, so neither side blocks on a full socket buffer."""
        reply = asyncio.create_task(conn.read_stderr())
        try:
            try:
                async for piece in _split(chunks):
                    if reply.done():
                        # Answered before the end marker: the stream position is lost.
                        break
                    await conn.send(wire.frame(piece))
                else:
                    await conn.send(wire.FRAME_END)
                    await reply
                    return
            except ProtocolError:
                # The daemon hung up (its reader then sees EOF too); its last word, if
                # any, says why better than a broken pipe does.
                await asyncio.wait([reply])
                if not isinstance(reply.exception(), _DaemonError):
                    raise
            # A plain StoreError (not _DaemonError) makes _operation drop the connection.
            exc = reply.exception()
            if isinstance(exc, _DaemonError):
                raise StoreError(str(exc)) from None
            raise ProtocolError(
                "nix-daemon ended the operation before the NAR was sent"
                + (f": {exc}" if exc is not None else "")
            ) from exc
        finally:
            if not reply.done():
                reply.cancel()
                await asyncio.wait([reply])  # the outer error, if any, is the one to report
            elif not reply.cancelled():
                reply.exception()  # mark it retrieved: the outcome was handled above
