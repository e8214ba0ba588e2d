"""File bodies with sendfile(2) under aiohttp, on uvloop (the daemon's loop) and asyncio's own:
exact bytes from any offset, the ordinary path when no sendfile thread is free, and a client that
goes away, stalls, or a file that is shorter than promised all end the response cleanly while
the server goes on serving."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from substituter import sendfile
from substituter.sendfile import send_file_body

uvloop = pytest.importorskip("uvloop")

SIZE = 24 << 20  # well above a socket buffer, so the sender has to wait for the reader


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sendfile") / "body"
    path.write_bytes(os.urandom(1 << 20) * (SIZE >> 20) + b"tail")
    return path


class Server:
    """An aiohttp app serving ``payload`` from the offset in the path, with what each handler
    raised."""

    def __init__(self, payload: Path, promise_extra: int = 0) -> None:
        self.payload = payload
        self.promise_extra = promise_extra  # claim more bytes than the file has
        self.errors: list[BaseException] = []
        self.finished = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        offset = int(request.match_info["offset"])
        size = self.payload.stat().st_size
        count = size - offset + self.promise_extra
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = count
        with open(self.payload, "rb") as file:  # noqa: ASYNC230 - a test server
            try:
                await send_file_body(request, response, file, offset, count)
            except OSError as exc:
                self.errors.append(exc)
                assert request.transport is not None
                request.transport.close()
                return response
        self.finished += 1
        return response

    async def __aenter__(self) -> Server:
        app = web.Application()
        app.router.add_get("/{offset}", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def fetch(port: int, path: str, read_limit: int | None = None, pause: float = 0.0) -> tuple[bytes, bytes]:
    """(headers, body) of a GET over a raw socket; stop after ``read_limit`` body bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if pause:
        await asyncio.sleep(pause)
    body = bytearray()
    while read_limit is None or len(body) < read_limit:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        body += chunk
    writer.close()
    return bytes(head), bytes(body)


def on_loop(kind: str, test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if kind == "uvloop":
        uvloop.run(test())
    else:
        asyncio.run(test())


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(sendfile.os, "sendfile", counting)
    return calls


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("offset", [0, 1, 12345678])
def test_the_body_is_the_file_from_the_offset(payload: Path, loop: str, offset: int,
                                               sendfile_calls: list[int]) -> None:
    async def test() -> None:
        async with Server(payload) as server:
            head, body = await fetch(server.port, f"/{offset}", pause=0.05)
            assert head.startswith(b"HTTP/1.1 200")
            assert f"Content-Length: {SIZE + 4 - offset}".encode() in head
            assert body == payload.read_bytes()[offset:]
            assert server.finished == 1 and not server.errors
        assert sendfile.SENDFILE_THREADS > 0 and sendfile_calls  # zero-copy, not read and written

    on_loop(loop, test)
    assert sendfile._POOL.busy == 0


def test_with_every_sendfile_thread_busy_the_body_goes_the_ordinary_way(
        payload: Path, monkeypatch: pytest.MonkeyPatch, sendfile_calls: list[int]) -> None:
    monkeypatch.setattr(sendfile, "SENDFILE_THREADS", 0)

    async def test() -> None:
        async with Server(payload) as server:
            _, body = await fetch(server.port, "/100")
            assert body == payload.read_bytes()[100:]
            assert server.finished == 1

    on_loop("uvloop", test)
    assert not sendfile_calls


def test_more_clients_than_sendfile_threads_all_get_their_bytes(
        payload: Path, monkeypatch: pytest.MonkeyPatch, sendfile_calls: list[int]) -> None:
    """Beyond SENDFILE_THREADS at once, bodies go the ordinary way; every one is exact."""
    monkeypatch.setattr(sendfile, "SENDFILE_THREADS", 2)
    expected = payload.read_bytes()
    peak = {"busy": 0}
    real_take = sendfile._POOL.take

    def take() -> Any:
        executor = real_take()
        peak["busy"] = max(peak["busy"], sendfile._POOL.busy)
        return executor

    monkeypatch.setattr(sendfile._POOL, "take", take)
    written: list[int] = []
    real_write = sendfile._write_pieces

    async def write_pieces(response: web.StreamResponse, file: Any, offset: int, count: int) -> None:
        written.append(offset)
        await real_write(response, file, offset, count)

    monkeypatch.setattr(sendfile, "_write_pieces", write_pieces)

    async def test() -> None:
        async with Server(payload) as server:
            offsets = [i * 1000 for i in range(6)]
            bodies = await asyncio.gather(*(fetch(server.port, f"/{o}", pause=0.2) for o in offsets))
            for offset, (_, body) in zip(offsets, bodies, strict=True):
                assert body == expected[offset:]
            assert server.finished == 6 and not server.errors

    on_loop("uvloop", test)
    assert peak["busy"] == 2 and sendfile_calls and written  # some by sendfile, the others written
    assert sendfile._POOL.busy == 0


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_file_shorter_than_promised_cuts_the_connection(payload: Path, loop: str) -> None:
    async def test() -> None:
        async with Server(payload, promise_extra=1000) as server:
            head, body = await fetch(server.port, "/0")
            assert f"Content-Length: {SIZE + 4 + 1000}".encode() in head
            assert body == payload.read_bytes()  # all there is, then the connection closes
            assert len(server.errors) == 1 and "ended 1000 bytes before" in str(server.errors[0])
            # Still serving.
            server.promise_extra = 0
            _, body = await fetch(server.port, "/5")
            assert body == payload.read_bytes()[5:]

    on_loop(loop, test)
    assert sendfile._POOL.busy == 0


def test_a_client_that_goes_away_ends_the_send(payload: Path) -> None:
    async def test() -> None:
        async with Server(payload) as server:
            _, body = await fetch(server.port, "/0", read_limit=1 << 20)
            assert body and len(body) < SIZE
            for _ in range(100):
                if server.errors:
                    break
                await asyncio.sleep(0.05)
            assert server.errors and isinstance(server.errors[0], (BrokenPipeError, ConnectionResetError))
            _, body = await fetch(server.port, "/0")
            assert body == payload.read_bytes()

    on_loop("uvloop", test)
    assert sendfile._POOL.busy == 0


def test_a_client_that_stops_reading_is_given_up_after_the_stall_timeout(
        payload: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sendfile, "STALL_TIMEOUT", 0.5)

    async def test() -> None:
        async with Server(payload) as server:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /0 HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                for _ in range(100):  # never read: the server's socket buffer fills
                    if server.errors:
                        break
                    await asyncio.sleep(0.05)
                assert server.errors and isinstance(server.errors[0], TimeoutError)
            finally:
                sock.close()
            _, body = await fetch(server.port, "/7")
            assert body == payload.read_bytes()[7:]

    on_loop("uvloop", test)
    assert sendfile._POOL.busy == 0




class _StuckTransport:
    """A transport whose queued bytes (the headers) never leave."""

    def get_write_buffer_size(self) -> int:
        return 300

    def is_closing(self) -> bool:
        return False


def test_headers_that_never_leave_the_transport_are_given_up_after_the_stall_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that took nothing of an earlier response leaves the next one's headers in the
    transport: the wait for them ends too (before any sendfile thread is taken)."""
    monkeypatch.setattr(sendfile, "STALL_TIMEOUT", 0.3)

    async def test() -> None:
        with pytest.raises(TimeoutError, match="took no bytes"):
            await asyncio.wait_for(sendfile._flushed(object(), _StuckTransport()), 5)  # type: ignore[arg-type]

    on_loop("uvloop", test)
