"""File bodies sent with sendfile(2): zero-copy, no worker round trip per piece.

uvloop does not implement ``loop.sendfile``; aiohttp then reads the file in 256 KiB pieces in
worker threads and writes each one through the transport: Nix's copy of a 256 MiB NAR from the
warm daemon took 1.1-1.45x as long as from nginx (0.9-1.0x with this module).  Here one worker
thread calls sendfile(2) on the connection's socket until the range is sent, waiting with poll(2)
while the socket buffer is full, after the transport has flushed everything queued before (the
response's headers).  The socket is duplicated first, so that a connection the event loop closes
meanwhile cannot hand its descriptor number to another client.

Anything this cannot do (no socket behind the transport, every sendfile thread busy, a platform
without os.sendfile) is sent the ordinary way, through ``response.write``.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, cast

from aiohttp import web

#: Connections served with sendfile at once; more go through ``response.write``.
SENDFILE_THREADS = 8
#: Seconds a client may take no bytes at all before the send is given up.
STALL_TIMEOUT = 120.0
#: Bytes per sendfile(2) call: bounds how long a cancelled send takes to notice.
CALL_BYTES = 8 << 20
#: Piece size of the ordinary path.
WRITE_PIECE = 256 << 10

_POLL_MS = 250


class _Pool:
    """The sendfile threads, created on first use; ``busy`` counts sends in progress."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        self.busy = 0

    def take(self) -> ThreadPoolExecutor | None:
        if self.busy >= SENDFILE_THREADS or not hasattr(os, "sendfile"):
            return None
        if self.executor is None:
            self.executor = ThreadPoolExecutor(SENDFILE_THREADS, thread_name_prefix="substituter-sendfile")
        self.busy += 1
        return self.executor

    def give_back(self) -> None:
        self.busy -= 1


_POOL = _Pool()


async def send_file_body(request: web.Request, response: web.StreamResponse, file: BinaryIO,
                         offset: int, count: int) -> None:
    """Send ``count`` bytes of ``file`` from ``offset`` as the body of ``response`` (prepared
    here; its Content-Length must say ``count``), then finish it.

    Raises OSError when the client goes away or stops reading for STALL_TIMEOUT seconds, or when
    the file holds fewer bytes than promised: the caller must then close the connection, since
    the body is cut short.
    """
    writer = await response.prepare(request)
    assert writer is not None
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    executor = _POOL.take() if sock is not None and count > 0 else None
    if executor is None:
        await _write_pieces(response, file, offset, count)
    else:
        assert transport is not None and sock is not None
        try:
            await _flushed(writer, transport)
            # Copies of both descriptors: the thread may outlive a cancelled handler, whose file
            # and connection are then closed, and their numbers reused by others.
            sock_fd = os.dup(sock.fileno())
            try:
                file_fd = os.dup(file.fileno())
            except BaseException:
                os.close(sock_fd)
                raise
        except BaseException:
            _POOL.give_back()
            raise
        stop = threading.Event()
        sending = asyncio.get_running_loop().run_in_executor(
            executor, _sendfile_all, sock_fd, file_fd, offset, count, stop)
        sending.add_done_callback(lambda _done: _POOL.give_back())
        try:
            await asyncio.shield(sending)
        except asyncio.CancelledError:
            stop.set()
            raise
    await response.write_eof()


async def _flushed(writer: object, transport: asyncio.BaseTransport) -> None:
    """Until everything written through the transport (the headers) has left it."""
    send_headers = getattr(writer, "send_headers", None)
    if send_headers is not None:
        send_headers()  # aiohttp holds the headers back to send them with the first body piece
    # uvloop's transports implement WriteTransport without deriving from it.
    pending = cast(asyncio.WriteTransport, transport).get_write_buffer_size
    give_up = time.monotonic() + STALL_TIMEOUT
    while pending() > 0:
        if transport.is_closing():
            raise ConnectionResetError("connection closed before the body was sent")
        if time.monotonic() > give_up:
            raise TimeoutError(f"client took no bytes for {STALL_TIMEOUT:.0f} s")
        await asyncio.sleep(0.001)


def _sendfile_all(sock_fd: int, file_fd: int, offset: int, count: int, stop: threading.Event) -> None:
    """In a worker: sendfile(2) until ``count`` bytes went out; closes both descriptors (dups)."""
    try:
        poller = select.poll()
        poller.register(sock_fd, select.POLLOUT)
        progress = time.monotonic()
        while count > 0:
            if stop.is_set():
                raise ConnectionAbortedError("send cancelled")
            try:
                sent = os.sendfile(sock_fd, file_fd, offset, min(count, CALL_BYTES))
            except BlockingIOError:
                poller.poll(_POLL_MS)
                if time.monotonic() - progress > STALL_TIMEOUT:
                    raise TimeoutError(f"client took no bytes for {STALL_TIMEOUT:.0f} s") from None
                continue
            if sent == 0:
                raise _short(count)
            offset += sent
            count -= sent
            progress = time.monotonic()
    finally:
        os.close(sock_fd)
        os.close(file_fd)


def _short(missing: int) -> OSError:
    return OSError(f"file ended {missing} bytes before the promised length")


async def _write_pieces(response: web.StreamResponse, file: BinaryIO, offset: int, count: int) -> None:
    while count > 0:
        piece = await asyncio.to_thread(os.pread, file.fileno(), min(count, WRITE_PIECE), offset)
        if not piece:
            raise _short(count)
        await response.write(piece)
        offset += len(piece)
        count -= len(piece)
