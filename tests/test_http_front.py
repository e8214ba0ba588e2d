"""The HTTP front: answers of its own in order, hand-over to aiohttp, and no request answered
differently from aiohttp alone (a differential fuzz over real loopback sockets)."""

from __future__ import annotations

import asyncio
import random
import re
import socket
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import pytest
from aiohttp import web

from substituter import http_cache
from substituter.http_front import FrontServer, Prebuilt, prebuilt

WARM = "1" * 32
COLD = "2" * 32
MISSING = "0" * 32
BIG = "3" * 32  # a 64 KiB answer
CACHED_NAR = "1" * 52  # a NarHash in the fake verified cache
NAR_BODY = b"(zstd file of a small NAR)"
RECENT_NAR = "4" * 52  # a NAR the fake holds in memory


class FakeAnswers:
    """Narinfo answers without a broker: hashes starting with 0 are missing, lookups take a while."""

    def __init__(self) -> None:
        self.warmed: set[str] = {WARM, BIG}
        self.lookups: list[str] = []

    def cache_info(self) -> Prebuilt:
        return prebuilt(200, "text/x-nix-cache-info; charset=utf-8", "max-age=86400", b"StoreDir: /nix/store\n")

    def narinfo(self, hash_part: str) -> Prebuilt | Awaitable[Prebuilt]:
        return self._hit(hash_part) if hash_part in self.warmed else self._lookup(hash_part)

    async def _lookup(self, hash_part: str) -> Prebuilt:
        self.lookups.append(hash_part)
        await asyncio.sleep(0.01)
        if hash_part.startswith("0"):
            return prebuilt(404, "text/plain; charset=utf-8", "no-store", f"{hash_part}: nobody has it\n".encode())
        self.warmed.add(hash_part)
        return self._hit(hash_part)

    def cached_nar(self, nar_hash: str, hash_part: str, compressed: bool) -> Prebuilt | Awaitable[Prebuilt] | None:
        if nar_hash == RECENT_NAR and not compressed:  # in memory: answered at once
            return Prebuilt(200, {"Content-Type": "application/x-nix-nar"}, b"(a small NAR)")
        return self._nar() if nar_hash == CACHED_NAR and compressed else None

    @staticmethod
    async def _nar() -> Prebuilt:
        await asyncio.sleep(0.005)
        return Prebuilt(200, {"Content-Type": "application/zstd", "Cache-Control": "immutable"}, NAR_BODY)

    @staticmethod
    def _hit(hash_part: str) -> Prebuilt:
        body = f"StorePath: /nix/store/{hash_part}-x\n".encode()
        if hash_part == BIG:
            body += b"Sig: " + b"x" * (64 * 1024) + b"\n"
        return prebuilt(200, "text/x-nix-narinfo", "max-age=86400", body)


async def _other(request: web.Request) -> web.Response:
    return web.Response(text=f"aiohttp {request.method} {request.path_qs}\n")


def fallback_app(answers: FakeAnswers) -> web.Application:
    """The daemon's own narinfo handlers over the fake answers, and a catch-all."""
    app = web.Application()
    app[http_cache.NARINFOS] = answers  # type: ignore[misc]
    app.router.add_get("/nix-cache-info", http_cache.cache_info)
    app.router.add_get("/{hash}.narinfo", http_cache.narinfo)
    app.router.add_route("*", "/{tail:.*}", _other)
    return app


@dataclass
class Servers:
    front: int  # the front with aiohttp behind it
    plain: int  # aiohttp alone (same app): the reference
    answers: FakeAnswers


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    loop = asyncio.get_running_loop()
    answers = FakeAnswers()
    runners = []
    listeners = []
    ports = []
    for with_front in (True, False):
        runner = web.AppRunner(fallback_app(answers), access_log=None)
        await runner.setup()
        runners.append(runner)
        if with_front:
            assert runner.server is not None
            front = FrontServer(answers, runner.server)
            server = await loop.create_server(front, "127.0.0.1", 0)
        else:
            server = await loop.create_server(runner.server, "127.0.0.1", 0)
        listeners.append(server)
        ports.append(server.sockets[0].getsockname()[1])
    yield Servers(ports[0], ports[1], answers)
    front.close()
    for server in listeners:
        server.close()
    for runner in runners:
        await runner.cleanup()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_reply(reader: asyncio.StreamReader, head_only: bool = False) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    body = b"" if head_only else await reader.readexactly(int(headers["content-length"]))
    return Reply(status, headers, body)


def get(target: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/7 Nix/2.8\r\n{extra}\r\n".encode()


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(servers: Servers) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", servers.front)
    requests = [
        (get(f"/{WARM}.narinfo"), False),
        (get(f"/{COLD}.narinfo", "HEAD"), True),   # a lookup: everything after it waits
        (get("/nix-cache-info"), False),
        (get(f"/{MISSING}.narinfo"), False),
        (get(f"/{COLD}.narinfo"), False),          # warm by now
        (get("/nar/abc.nar"), False),              # not the front's: aiohttp from here on
        (get(f"/{WARM}.narinfo"), False),
        (get("/metrics", "HEAD"), True),
    ]
    writer.write(b"".join(r for r, _ in requests))
    replies = [await read_reply(reader, head_only) for _, head_only in requests]
    writer.close()
    await writer.wait_closed()
    assert [r.status for r in replies] == [200, 200, 200, 404, 200, 200, 200, 200]
    assert replies[0].body == f"StorePath: /nix/store/{WARM}-x\n".encode()
    assert replies[0].headers["content-type"] == "text/x-nix-narinfo"
    assert "date" in replies[0].headers
    assert replies[1].body == b"" and int(replies[1].headers["content-length"]) == len(replies[4].body)
    assert replies[2].body == b"StoreDir: /nix/store\n"
    assert replies[3].headers["cache-control"] == "no-store"
    assert replies[4].body == f"StorePath: /nix/store/{COLD}-x\n".encode()
    assert replies[5].body == b"aiohttp GET /nar/abc.nar\n"
    assert replies[6].body == replies[0].body and "server" in replies[6].headers  # aiohttp's answer
    assert servers.answers.lookups == [COLD, MISSING]


async def test_a_flood_of_pipelined_requests_is_answered_in_full_and_in_order(
        servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """More answers than the transport buffers: the front stops reading while the client does
    not read (write flow control) and carries on where it stopped."""
    from substituter import http_front

    paused = []
    pause = http_front.FrontProtocol.pause_writing
    monkeypatch.setattr(http_front.FrontProtocol, "pause_writing", lambda self: (paused.append(1), pause(self)))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so the server's buffers fill
    sock.connect(("127.0.0.1", servers.front))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    hashes = [BIG if i % 2 else WARM if i % 3 else COLD for i in range(400)]
    writer.write(b"".join(get(f"/{h}.narinfo", "HEAD" if i % 5 == 0 else "GET") for i, h in enumerate(hashes)))
    await asyncio.sleep(0.3)  # let the server fill its buffers while nobody reads
    for i, h in enumerate(hashes):
        reply = await asyncio.wait_for(read_reply(reader, head_only=i % 5 == 0), 10)
        assert reply.status == 200
        assert i % 5 == 0 or reply.body.startswith(f"StorePath: /nix/store/{h}-x\n".encode())
    writer.close()
    await writer.wait_closed()
    assert paused  # the flow-control path was taken


async def test_a_request_split_into_single_bytes_is_answered(servers: Servers) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", servers.front)
    for byte in get(f"/{WARM}.narinfo"):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0)
    reply = await asyncio.wait_for(read_reply(reader), 5)
    assert reply.status == 200 and "server" not in reply.headers  # the front's own answer
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize(("request_bytes", "status"), [
    (get(f"/{WARM}.narinfo", extra="Connection: close\r\n"), 200),
    (get(f"/{WARM}.narinfo", extra="Content-Length: 0\r\n"), 200),
    (get(f"/{WARM}.narinfo", extra="transfer-encoding: chunked\r\n") + b"0\r\n\r\n", 200),
    (get(f"/{WARM}.narinfo").replace(b"HTTP/1.1", b"HTTP/1.0"), 200),
    (get(f"/{WARM}.narinfo?x=1"), 200),
    (get(f"/{WARM}.narinfo").replace(b"\r\n", b"\n"), 400),  # bare LFs: aiohttp refuses them
])
async def test_unusual_requests_go_to_aiohttp(servers: Servers, request_bytes: bytes, status: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", servers.front)
    writer.write(request_bytes)
    reply = await asyncio.wait_for(read_reply(reader), 5)
    writer.close()
    await writer.wait_closed()
    assert reply.status == status and "server" in reply.headers


async def test_idle_connections_are_closed(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    from substituter import http_front

    monkeypatch.setattr(http_front, "IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(http_front, "_SWEEP", 0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", servers.front)
    writer.write(get(f"/{WARM}.narinfo"))
    assert (await read_reply(reader)).status == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server, not by the timeout
    writer.close()
    await writer.wait_closed()


def split_replies(stream: bytes) -> list[tuple[int, str, str, str, bytes]]:
    """(status, content type, cache control, length, body) of each response in a stream.  A
    response without a body (HEAD) is one followed directly by the next status line or the end."""
    replies = []
    while stream:
        m = re.match(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n", stream)
        assert m is not None, stream[:200]
        headers = {k.lower(): v for k, _, v in
                   (line.partition(": ") for line in m.group(2).decode("latin-1").split("\r\n") if line)}
        stream = stream[m.end():]
        length = int(headers.get("content-length", "0"))
        body = b""
        if stream and not re.match(rb"HTTP/1\.[01] ", stream):
            body, stream = stream[:length], stream[length:]
        replies.append((int(m.group(1)), headers.get("content-type", ""), headers.get("cache-control", ""),
                        headers.get("content-length", ""), body))
    return replies


async def exchange(port: int, parts: list[bytes], quiet: float = 0.3) -> bytes:
    """Send each part once the server went quiet after the previous one; everything received
    until the server closes or stays quiet after the last."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        for part in parts:
            writer.write(part)
            while chunk := await asyncio.wait_for(reader.read(65536), quiet):
                received += chunk
    except (TimeoutError, ConnectionError):
        pass
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass
    return received


BASES = [
    get(f"/{WARM}.narinfo"), get(f"/{COLD}.narinfo", "HEAD"), get("/nix-cache-info"),
    get(f"/{MISSING}.narinfo"), get("/nar/x.nar"),
]
NOISE = [b"\r", b"\n", b" ", b"\t", b"\0", b":", b"/", b".", b"H", b"e", b"\x80", b"\xff", b"\r\n", b"1"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data) + 1)
        op = rng.randrange(3)
        if op == 0:
            data = data[:i] + rng.choice(NOISE) + data[i:]
        elif op == 1:
            data = data[:i] + data[i + 1:]
        else:
            data = data[:i] + rng.choice(NOISE) + data[i + 1:]
    return data


async def test_malformed_requests_get_the_same_answers_as_from_aiohttp_alone(servers: Servers) -> None:
    """Mutated requests (after a valid one on the same connection, before a closing one in the
    same write) must get the same responses from the front as from aiohttp on its own: the
    front answers only what aiohttp would answer the same way, and never a 5xx."""
    rng = random.Random(5)
    cases = []
    for _ in range(300):
        data = mutate(rng, rng.choice(BASES))
        if rng.random() < 0.7:
            data += get(f"/{WARM}.narinfo", extra="Connection: close\r\n")
        cases.append([rng.choice(BASES), data])
    for start in range(0, len(cases), 50):
        batch = cases[start:start + 50]
        fronts = await asyncio.gather(*(exchange(servers.front, parts) for parts in batch))
        plains = await asyncio.gather(*(exchange(servers.plain, parts) for parts in batch))
        for parts, front, plain in zip(batch, fronts, plains, strict=True):
            ours, theirs = split_replies(front), split_replies(plain)
            assert all(status < 500 for status, *_ in ours), parts
            if ours != theirs:
                # One difference is allowed: a mutation that splits a request in two, a good one
                # and a bad one.  aiohttp parses a whole read before answering, so its 400 replaces
                # the good one's answer; the front answers the good one, then aiohttp the bad one.
                assert theirs[-1][0] == 400 and ours[-1] == theirs[-1], parts
                assert ours[:len(theirs) - 1] == theirs[:-1], parts
                assert all(status < 400 for status, *_ in ours[len(theirs) - 1:-1]), parts


@pytest.mark.nix
@pytest.mark.slow
@pytest.mark.parametrize("event_loop", ["default", "asyncio"])
def test_daemon_front_and_aiohttp_serve_the_same_narinfo(nix, nix_keys, tmp_path, serve_cache,
                                                         event_loop: str) -> None:
    """A real daemon over a real cache: pipelined HEAD and GET of a narinfo (first unresolved,
    then resolved) from the front, the same bytes from aiohttp after a hand-over, misses as
    uncacheable 404s, every answer counted.  With uvloop (when installed) and asyncio's loop."""
    import httpx

    from .cache_server import build_cache
    from .daemon_proc import DaemonProcess

    cache = build_cache(nix, nix_keys, tmp_path / "cache", "xz")
    server = serve_cache(cache.root)
    # No NAR prefetch: a NAR cached between two requests changes the narinfo served (its URL).
    config = {"trusted-public-keys": [cache.public_key], "nar-cache": {"prefetch": 0},
              "fetchers": [{"type": "binary-cache", "name": "upstream", "url": server.url}]}
    hash_part = cache.hash_part(cache.top)

    async def talk(port: int) -> list[Reply]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        requests = [
            (get(f"/{hash_part}.narinfo", "HEAD"), True),
            (get(f"/{hash_part}.narinfo"), False),
            (get(f"/{MISSING}.narinfo"), False),
            (get(f"/{hash_part}.narinfo"), False),
            (get("/nix-cache-info"), False),
            (get("/metrics", "HEAD"), True),  # aiohttp's from here on
            (get(f"/{hash_part}.narinfo"), False),
            (get("/nix-cache-info"), False),
        ]
        writer.write(b"".join(r for r, _ in requests))
        replies = [await asyncio.wait_for(read_reply(reader, head_only), 20) for _, head_only in requests]
        writer.close()
        await writer.wait_closed()
        return replies

    env = {**nix.env, "SUBSTITUTER_EVENT_LOOP": event_loop}
    with DaemonProcess(tmp_path, config, env) as daemon:
        replies = asyncio.run(talk(daemon.port))
        metrics = httpx.get(f"{daemon.url}/metrics").text
    assert [r.status for r in replies] == [200, 200, 404, 200, 200, 200, 200, 200]
    head, first, miss, again, info, _, handed, info_aiohttp = replies
    assert "server" not in first.headers and "server" in handed.headers  # front, then aiohttp
    assert first.body.startswith(f"StorePath: {cache.top}\n".encode())
    assert first.body == again.body == handed.body
    assert int(head.headers["content-length"]) == len(first.body)
    for reply in (head, first, handed):
        assert reply.headers["content-type"] == "text/x-nix-narinfo"
        assert reply.headers["cache-control"] == "max-age=86400"
    assert miss.headers["cache-control"] == "no-store"
    assert info.body == info_aiohttp.body and b"WantMassQuery: 1\n" in info.body
    assert info.headers["content-type"] == info_aiohttp.headers["content-type"]
    assert 'substituter_narinfo_requests_total{result="hit"} 4.0' in metrics
    assert 'substituter_narinfo_requests_total{result="miss"} 1.0' in metrics
    assert "substituter_narinfo_seconds_count 5.0" in metrics


async def test_a_cached_nar_is_served_by_the_front_and_the_connection_stays_with_it(servers: Servers) -> None:
    """Nix uses one keep-alive connection for everything: a small cached NAR must not hand it
    to aiohttp, or every narinfo after it would pay aiohttp's cost."""
    reader, writer = await asyncio.open_connection("127.0.0.1", servers.front)
    nar = f"/nar/{CACHED_NAR}-{WARM}.nar.zst"
    requests = [
        (get(f"/{WARM}.narinfo"), False),
        (get(nar), False),
        (get(nar, "HEAD"), True),
        (get(f"/{COLD}.narinfo"), False),
        (get(f"/nar/{RECENT_NAR}-{WARM}.nar"), False),
        (get(nar, extra="Range: bytes=5-\r\n"), False),  # ranges are aiohttp's
        (get(f"/{WARM}.narinfo"), False),
    ]
    writer.write(b"".join(r for r, _ in requests))
    replies = [await asyncio.wait_for(read_reply(reader, head_only), 10) for _, head_only in requests]
    writer.close()
    await writer.wait_closed()
    first, body, head, cold, recent, ranged, after = replies
    assert [r.status for r in replies] == [200] * 7
    assert recent.body == b"(a small NAR)" and "server" not in recent.headers
    assert body.body == NAR_BODY and body.headers["content-type"] == "application/zstd"
    assert int(head.headers["content-length"]) == len(NAR_BODY)
    assert all("server" not in r.headers for r in (first, body, head, cold))  # the front's
    assert ranged.body.startswith(b"aiohttp GET /nar/") and "server" in after.headers


async def test_a_nar_not_in_the_cache_goes_to_aiohttp(servers: Servers) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", servers.front)
    for target in (f"/nar/{'2' * 52}-{WARM}.nar.zst", f"/nar/{CACHED_NAR}-{WARM}.nar"):
        writer.write(get(target))
        reply = await asyncio.wait_for(read_reply(reader), 10)
        assert reply.body == f"aiohttp GET {target}\n".encode()
    writer.close()
    await writer.wait_closed()
