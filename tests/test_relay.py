"""The embedded relay: capabilities, a client in another OS process, and hostile bytes."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from preserves import Embedded, ImmutableDict, Record, Symbol, encode, stringify
from syndicate import Decoder, actor, turn
from syndicate import patterns as P
from syndicate.schema import dataspace as dataspace_schema
from syndicate.schema import protocol, sturdy

from substituter.dataspace.connect import parse_address, parse_capability
from substituter.dataspace.gatekeeper import (
    KEY_FILE_NAME,
    Gatekeeper,
    load_or_create_key,
    mint,
    signature,
)
from substituter.dataspace.relay import RelayListener
from substituter.errors import ConfigError
from tests.syndicate_server import ClientProcess

try:  # the real embedded dataspace, once it exists; until then a stand-in
    from substituter.dataspace.dataspace import Dataspace as _RealDataspace
except ImportError:
    _RealDataspace = None

KEY = b"relay-test-key"
OID = "substituter"
HELLO = Symbol("hello")


class BroadcastDataspace(actor.Entity):
    """Stand-in dataspace: every observer sees every non-Observe assertion, captured whole.

    That equals a real dataspace for the patterns these tests use (``<bind <hello _>>``) as long
    as only ``<hello ...>`` records are asserted.
    """

    def __init__(self) -> None:
        self.assertions: dict[int, Any] = {}
        self.observers: dict[int, actor.Ref] = {}
        self.replies: dict[tuple[int, int], int] = {}

    def on_publish(self, v: Any, handle: int) -> None:
        observe = dataspace_schema.Observe.try_decode(v)
        if observe is not None:
            self.observers[handle] = observe.observer
            for h, value in self.assertions.items():
                self.replies[(handle, h)] = turn.publish(observe.observer, (value,))
        else:
            self.assertions[handle] = v
            for h, observer in self.observers.items():
                self.replies[(h, handle)] = turn.publish(observer, (v,))

    def on_retract(self, handle: int) -> None:
        self.assertions.pop(handle, None)
        self.observers.pop(handle, None)
        for key in [k for k in self.replies if handle in k]:
            turn.retract(self.replies.pop(key))


def new_dataspace() -> actor.Entity:
    return _RealDataspace() if _RealDataspace is not None else BroadcastDataspace()


class Hellos(actor.Entity):
    """In-process observer of ``<hello _>``: the values currently asserted."""

    def __init__(self) -> None:
        self.by_handle: dict[int, Any] = {}
        self.changed = asyncio.Event()

    def on_publish(self, v: Any, handle: int) -> None:
        captures = tuple(v) if isinstance(v, list | tuple) else (v,)
        self.by_handle[handle] = captures[0]
        self.changed.set()

    def on_retract(self, handle: int) -> None:
        self.by_handle.pop(handle, None)
        self.changed.set()

    @property
    def names(self) -> list[str]:
        return sorted(v.fields[0] for v in self.by_handle.values())

    async def until(self, predicate: Callable[[list[str]], bool], timeout: float = 20.0) -> None:
        async def wait() -> None:
            while not predicate(self.names):
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"condition never held; hellos are {self.names}") from None


class Server:
    """The embedded dataspace served on a unix socket and loopback TCP, plus an observer."""

    def __init__(self, socket_path: Path, **listener_options: Any) -> None:
        self.socket_path = socket_path
        self.hellos = Hellos()
        self.facet: actor.Facet | None = None
        self.dataspace: actor.Ref | None = None
        self.listener: RelayListener | None = None
        self._options = listener_options

    def boot(self) -> None:
        self.facet = turn.active_facet()
        self.dataspace = turn.ref(new_dataspace())
        turn.publish(self.dataspace, dataspace_schema.Observe(
            P.bind(P.rec("hello", P._)), turn.ref(self.hellos)))
        gatekeeper = Gatekeeper(KEY, {OID: self.dataspace})
        self.listener = RelayListener(
            gatekeeper, unix_path=self.socket_path, tcp=("127.0.0.1", 0), **self._options)

    def run(self, action: Callable[[], None]) -> None:
        assert self.facet is not None
        turn.run(self.facet, action)

    @property
    def unix_addr(self) -> str:
        return f'<unix "{self.socket_path}">'

    @property
    def tcp_addr(self) -> str:
        assert self.listener is not None and self.listener.tcp_address is not None
        return f"127.0.0.1:{self.listener.tcp_address[1]}"


async def start_server(socket_path: Path, **options: Any) -> Server:
    system = actor.System(loop=asyncio.get_running_loop())
    server = Server(socket_path, **options)
    actor.Actor(server.boot, system=system, name="relay-test-server")
    assert server.listener is not None
    await server.listener.ready
    return server


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    server = await start_server(tmp_path / "ds.sock")
    yield server
    server.run(lambda: turn.stop_actor())
    for _ in range(20):  # let the listener and connections close
        await asyncio.sleep(0.01)


# --- capabilities -------------------------------------------------------------------------


def test_signature_matches_syndicate_server() -> None:
    # The reference value from syndicate-rs: key b"" and oid "syndicate".
    assert signature(b"", "syndicate").hex() == "69ca300c1dbfa08fba692102dd82311a"


def test_minted_ref_parses_and_checks() -> None:
    text = mint(KEY, OID)
    assert text.startswith('<ref {oid: "substituter" sig: #x"')
    target = object()
    assert Gatekeeper(KEY, {OID: target}).check(parse_capability(text)) is target  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "step, why",
    [
        (mint(b"other key", OID), "bad signature"),
        (mint(KEY, "elsewhere"), "no binding"),
        ('<ref {oid: "substituter" sig: #x"00112233445566778899aabbccddeeff"}>', "bad signature"),
        ('<ref {oid: "substituter"}>', "lacks oid or sig"),
        ("<nope 1>", "not a sturdy ref"),
    ],
)
def test_gatekeeper_refuses(step: str, why: str) -> None:
    from preserves import parse

    gatekeeper = Gatekeeper(KEY, {OID: object()})  # type: ignore[dict-item]
    with pytest.raises(PermissionError, match=why):
        gatekeeper.check(parse(step))


def test_caveats_are_refused() -> None:
    step = parse_capability(mint(KEY, OID))
    params = dict(step.fields[0])
    params[Symbol("caveats")] = (Record(Symbol("reject"), [Record(Symbol("_"), [])]),)
    with pytest.raises(PermissionError, match="caveats"):
        Gatekeeper(KEY, {OID: object()}).check(Record(Symbol("ref"), [ImmutableDict(params)]))  # type: ignore[dict-item]


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = load_or_create_key(state)
    path = state / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32
    assert load_or_create_key(state) == key
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_key(state)


# --- addresses and listener configuration ---------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<unix "/run/ds.sock">', '<unix "/run/ds.sock">'),
        ("unix:/run/ds.sock", '<unix "/run/ds.sock">'),
        ("/run/ds.sock", '<unix "/run/ds.sock">'),
        ('<tcp "127.0.0.1" 9001>', '<tcp "127.0.0.1" 9001>'),
        ("127.0.0.1:9001", '<tcp "127.0.0.1" 9001>'),
        ("[::1]:9001", '<tcp "::1" 9001>'),
    ],
)
def test_parse_address(text: str, expected: str) -> None:
    from preserves import preserve

    assert stringify(preserve(parse_address(text))) == expected


@pytest.mark.parametrize("text", ["", "nonsense", "<ws \"ws://x\">", "host:port"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


async def test_unsafe_listener_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a loopback"):
        _construct_listener(tcp=("0.0.0.0", 0))
    with pytest.raises(ConfigError, match="too open"):
        _construct_listener(unix_path=tmp_path / "y.sock", unix_mode=0o666)


def _construct_listener(**options: Any) -> None:
    # Validation happens before anything is bound, so a bare turn is enough.
    errors: list[BaseException] = []

    def boot() -> None:
        try:
            RelayListener(Gatekeeper(KEY, {}), **options)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    actor.Actor(boot, system=actor.System(loop=asyncio.get_running_loop()))
    if errors:
        raise errors[0]


async def test_socket_is_private(server: Server) -> None:
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o600


# --- a client in another OS process -------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_assertions_flow_both_ways(server: Server, transport: str) -> None:
    addr = server.unix_addr if transport == "unix" else server.tcp_addr
    client = await ClientProcess.start(addr, mint(KEY, OID), "remote")
    try:
        await client.wait_for("connected")
        await client.wait_for("synced")
        await server.hellos.until(lambda names: names == ["remote"])
        handle: list[int] = []
        server.run(lambda: handle.append(turn.publish(server.dataspace, Record(HELLO, ["local"]))))
        await client.wait_for('+ <hello "local">')
        server.run(lambda: turn.retract(handle[0]))
        await client.wait_for('- <hello "local">')
    finally:
        await client.kill()


async def test_killing_the_client_retracts_its_assertions(server: Server) -> None:
    client = await ClientProcess.start(server.unix_addr, mint(KEY, OID), "doomed")
    await client.wait_for("connected")
    await server.hellos.until(lambda names: names == ["doomed"])
    await client.kill()
    await server.hellos.until(lambda names: names == [])
    assert server.listener is not None
    listener = server.listener

    async def connection_gone() -> None:
        while listener.connection_count:  # noqa: ASYNC110 - a test poll, not production code
            await asyncio.sleep(0.01)

    await asyncio.wait_for(connection_gone(), 20)  # the connection's actor goes away too


@pytest.mark.parametrize(
    "cap",
    [mint(b"wrong key", OID), mint(KEY, "unbound-oid"),
     '<ref {oid: "substituter" sig: #x"00112233445566778899aabbccddeeff"}>'],
    ids=["wrong-key", "unbound-oid", "forged-sig"],
)
async def test_bad_capability_sees_nothing_and_asserts_nothing(
    server: Server, cap: str, caplog: pytest.LogCaptureFixture
) -> None:
    handle: list[int] = []
    server.run(lambda: handle.append(turn.publish(server.dataspace, Record(HELLO, ["secret"]))))
    await server.hellos.until(lambda names: names == ["secret"])
    with caplog.at_level(logging.WARNING, logger="substituter.dataspace"):
        intruder = await ClientProcess.start(server.unix_addr, cap, "intruder")
        assert await intruder.exited() == 0
    assert any(line.startswith("refused ") for line in intruder.lines), intruder.lines
    assert "connected" not in intruder.lines
    assert not any("secret" in line for line in intruder.lines)
    assert server.hellos.names == ["secret"]
    refusals = [r for r in caplog.records if r.name == "substituter.dataspace" and "refused" in r.message]
    assert refusals, caplog.text
    # A good client is served afterwards: the refusal closed one connection, not the server.
    good = await ClientProcess.start(server.unix_addr, mint(KEY, OID), "good")
    try:
        await client_sees_secret(good)
    finally:
        await good.kill()


async def client_sees_secret(client: ClientProcess) -> None:
    await client.wait_for("connected")
    await client.wait_for('+ <hello "secret">')


# --- raw bytes on the wire ----------------------------------------------------------------


def turn_packet(*events: tuple[int, Any]) -> bytes:
    """Encode a Turn packet of (oid, event record) pairs."""
    return encode([[oid, event] for oid, event in events])


def assert_event(value: Any, handle: int) -> Record:
    return Record(Symbol("A"), [value, handle])


async def raw_session(server: Server, payload: bytes) -> list[Any]:
    """Send ``payload``, then read until the server closes; the packets it sent."""
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    try:
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
        await writer.wait_closed()
    return list(Decoder(data, decode_embedded=sturdy.WireRef.decode))


def error_messages(packets: list[Any]) -> list[str]:
    return [p.fields[0] for p in packets if isinstance(p, Record) and p.key == Symbol("error")]


HOSTILE = {
    "invalid-tag": b"\xff\x00\x01",
    "unknown-record": encode(Record(Symbol("frobnicate"), [1, 2])),
    "not-a-packet": encode(42),
    "unknown-event": turn_packet((0, Record(Symbol("Z"), [1]))),
    "no-cap-assert-at-gatekeeper": turn_packet((0, assert_event(Record(HELLO, ["intruder"]), 1))),
    "no-cap-message-at-gatekeeper": turn_packet((0, Record(Symbol("M"), [Record(HELLO, ["x"])]))),
    "assert-to-ungranted-oid": turn_packet((1, assert_event(Record(HELLO, ["intruder"]), 1))),
    "retract-unknown-handle": turn_packet((0, Record(Symbol("R"), [99]))),
    "deep-nesting": b"\xb5" * 100_000,
    "oversized": b"\xb1" + bytes([0x80 | 0x7F, 0x80 | 0x7F, 0x7F]) + b"x" * 70_000,
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_bytes_close_the_connection_not_the_server(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(tmp_path / "ds.sock", max_packet_bytes=64 * 1024)
    try:
        with caplog.at_level(logging.WARNING, logger="substituter.dataspace"):
            packets = await raw_session(server, HOSTILE[name])
        messages = error_messages(packets)
        assert len(messages) == 1, packets
        assert any(m in caplog.text for m in messages)
        assert server.hellos.names == []
        client = await ClientProcess.start(server.unix_addr, mint(KEY, OID), "after")
        try:
            await client.wait_for("connected")
            await server.hellos.until(lambda names: names == ["after"])
        finally:
            await client.kill()
    finally:
        server.run(lambda: turn.stop_actor())
        await asyncio.sleep(0.05)


async def resolve_raw(
    server: Server,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A raw connection that resolved the capability; returns the dataspace's oid too."""
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    resolve = Record(Symbol("resolve"), [
        parse_capability(mint(KEY, OID)), Embedded(sturdy.WireRef.mine(sturdy.Oid(7)))])
    writer.write(turn_packet((0, assert_event(resolve, 1))))
    event = (await read_events(reader, 1))[0]
    accepted = event.event.value.assertion.value
    return reader, writer, accepted.fields[0].embeddedValue.oid.value


async def read_events(reader: asyncio.StreamReader, count: int) -> list[Any]:
    decoder = Decoder(decode_embedded=sturdy.WireRef.decode)
    events: list[Any] = []
    while len(events) < count:
        decoder.extend(await asyncio.wait_for(reader.read(65536), 20))
        for packet in decoder:
            events.extend(protocol.Packet.decode(packet).value.value)
    return events


async def test_reused_handle_closes_and_retracts(server: Server) -> None:
    """A raw client resolves properly, then reuses a live handle: closed, nothing left behind."""
    reader, writer, ds_oid = await resolve_raw(server)
    try:
        writer.write(turn_packet((ds_oid, assert_event(Record(HELLO, ["raw"]), 2))))
        await server.hellos.until(lambda names: names == ["raw"])
        writer.write(turn_packet((ds_oid, assert_event(Record(HELLO, ["again"]), 2))))
        rest = await asyncio.wait_for(reader.read(), 20)
        assert any("reusing live handle" in m for m in error_messages(list(Decoder(rest))))
        await server.hellos.until(lambda names: names == [])
    finally:
        writer.close()
        await writer.wait_closed()


async def test_sync_with_doubly_embedded_peer_is_answered(server: Server) -> None:
    """Stock syndicate-py 0.19.3 writes <S #:#:[0 n]>; the relay answers it anyway."""
    reader, writer, ds_oid = await resolve_raw(server)
    try:
        peer = Embedded(Embedded(sturdy.WireRef.mine(sturdy.Oid(9))))
        writer.write(turn_packet((ds_oid, Record(Symbol("S"), [peer]))))
        (event,) = await read_events(reader, 1)
        assert event.oid.value == 9
        assert event.event.VARIANT.name == "Message"
        assert event.event.value.body.value is True
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_silent_connection_is_closed_after_the_capability_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import substituter.dataspace.relay as relay_module

    monkeypatch.setattr(relay_module, "AUTH_TIMEOUT", 0.3)
    server = await start_server(tmp_path / "ds.sock")
    try:
        with caplog.at_level(logging.WARNING, logger="substituter.dataspace"):
            reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
            # Says nothing; the server must hang up on its own (EOF), not wait forever.
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        assert b"no valid capability" in rest
        assert "no valid capability" in caplog.text
        # A client that does present its capability in time is unaffected.
        reader, writer, _oid = await resolve_raw(server)
        await asyncio.sleep(0.6)
        assert not reader.at_eof()
        writer.close()
    finally:
        server.run(lambda: turn.stop_actor())
        await asyncio.sleep(0.05)
