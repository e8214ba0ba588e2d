"""The binary-cache fetcher's own client for narinfo GETs, against real loopback servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from fetchers.binary_cache_http import PlainAnswer, SmallGets, parse_answer
from substituter.errors import TransientFetchError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[int]], Awaitable[None]]


def test_parse_answer_plain_partial_and_not_plain() -> None:
    ok = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: y\r\n\r\nabc", 100)
    assert isinstance(ok, PlainAnswer) and (ok.status, ok.body, ok.reusable) == (200, b"abc", True)
    assert parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab", 100) is True
    assert parse_answer(b"HTTP/1.1 200 OK\r\nContent-Le", 100) is True
    closing = parse_answer(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 100)
    assert isinstance(closing, PlainAnswer) and closing.status == 404 and not closing.reusable
    busy = parse_answer(b"HTTP/1.1 503 x\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n", 100)
    assert isinstance(busy, PlainAnswer) and busy.headers == {"retry-after": "7"}
    old = parse_answer(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", 100)
    assert isinstance(old, PlainAnswer) and not old.reusable
    for other in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                  b"HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
                  b"HTTP/1.1 200 OK\r\n\r\nuntil close",
                  b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
                  b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n",
                  b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
                  b"SSH-2.0-nope\r\n\r\n"):
        assert parse_answer(other, 100) is None, other


async def _answer(writer: asyncio.StreamWriter, body: bytes, extra: str = "") -> None:
    writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body)
    await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return head.split(b" ")[1]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server; the list counts connections accepted."""
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer, connections)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/", connections
    finally:
        server.close()


def client(base: str, max_connections: int = 4, stall: float = 5.0) -> SmallGets:
    return SmallGets(base, connect_timeout=2.0, stall_timeout=stall, max_connections=max_connections,
                     max_body=1 << 20)


async def echo_paths(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _c: list[int]) -> None:
    while (path := await _read_request(reader)) is not None:
        await _answer(writer, path)


async def test_keep_alive_one_connection_and_first_come_first_served() -> None:
    async with serving(echo_paths) as (base, connections):
        gets = client(base, max_connections=1)
        for i in range(5):
            answer = await gets.get(f"{base}{i}.narinfo")
            assert answer is not None and answer.body == f"/{i}.narinfo".encode()
        order: list[int] = []

        async def one(i: int) -> None:
            answer = await gets.get(f"{base}{i}.narinfo")
            assert answer is not None and answer.body == f"/{i}.narinfo".encode()
            order.append(i)

        await asyncio.gather(*(one(i) for i in range(20)))
        assert order == list(range(20)) and len(connections) == 1
        gets.close()


async def test_a_connection_the_server_closed_is_replaced() -> None:
    async def one_answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              _c: list[int]) -> None:
        path = await _read_request(reader)
        if path is not None:
            await _answer(writer, path)  # keep-alive promised, then closed anyway

    async with serving(one_answer_each) as (base, connections):
        gets = client(base)
        for i in range(3):
            await asyncio.sleep(0.05)  # the close has arrived, or not: both must work
            answer = await gets.get(f"{base}{i}.narinfo")
            assert answer is not None and answer.body == f"/{i}.narinfo".encode()
        assert len(connections) == 3


async def test_what_is_not_plain_goes_back_to_the_caller() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _c: list[int]) -> None:
        while await _read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            await writer.drain()

    async with serving(chunked) as (base, _connections):
        assert await client(base).get(f"{base}x.narinfo") is None
    async with serving(echo_paths) as (base, _connections):
        pass
    assert await client(base).get(f"{base}x.narinfo") is None  # refused: aiohttp says why


async def test_a_stall_or_a_cut_answer_is_transient() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _c: list[int]) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)

    async with serving(silent) as (base, _connections):
        gets = client(base, stall=0.2)
        with pytest.raises(TransientFetchError, match="TimeoutError"):
            await gets.get(f"{base}x.narinfo")
        assert gets._open == 0  # the slot came back

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _c: list[int]) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()

    async with serving(cut) as (base, _connections):
        with pytest.raises(TransientFetchError, match="closed before a complete answer"):
            await client(base).get(f"{base}x.narinfo")


def test_encoded_answers_are_not_plain() -> None:
    """Bytes must arrive as stored: an answer with a Content-Encoding goes to aiohttp."""
    encoded = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 1\r\n\r\nx"
    assert parse_answer(encoded, 100) is None
    same = b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Length: 1\r\n\r\nx"
    assert isinstance(parse_answer(same, 100), PlainAnswer)
