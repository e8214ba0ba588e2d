"""DaemonStore: the wire encoding, a scripted fake daemon for the protocol corners real
Nix 2.8 does not exercise (1.38 handshake, every stderr message type), and real private
nix-daemons (trusted and untrusted) for everything that writes into a store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from substituter.errors import HashError, ProtocolError, SizeMismatch, StoreError, StorePathError
from substituter.store import wire
from substituter.store.base import PathInfo, check_store_path, guarded_nar, nar_hash_digest
from substituter.store.daemon_client import (
    DEFAULT_SOCKET,
    WORKER_MAGIC_1,
    WORKER_MAGIC_2,
    DaemonStore,
    Op,
    Stderr,
    resolve_socket_path,
)
from tests import nixdaemon
from tests.conftest import Nix
from tests.nixdaemon import DumpedPath, PrivateDaemon, dump_closure, stream_file

nix_daemon_factory = nixdaemon.nix_daemon_factory  # the fixture, by its name here

# ---------------------------------------------------------------------------- pure parts


def reader_of(data: bytes) -> wire.WireReader:
    stream = asyncio.StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    return wire.WireReader(stream, "test peer")


async def test_wire_round_trip() -> None:
    data = (
        wire.u64(2**64 - 1)
        + wire.boolean(True)
        + wire.string("abc")
        + wire.string("")
        + wire.string_set(["b", "a", "b"])
    )
    assert len(data) % 8 == 0
    r = reader_of(data)
    assert await r.u64() == 2**64 - 1
    assert await r.boolean() is True
    assert await r.string() == "abc"
    assert await r.string() == ""
    assert await r.string_list() == ["a", "b"]


async def test_wire_rejects_bad_padding_and_truncation() -> None:
    with pytest.raises(ProtocolError, match="non-zero padding"):
        await reader_of(wire.u64(1) + b"x\x00\x00\x01\x00\x00\x00\x00").string()
    with pytest.raises(ProtocolError, match="closed the connection"):
        await reader_of(wire.u64(10) + b"short").string()
    with pytest.raises(ProtocolError, match="limit"):
        await reader_of(wire.u64(wire.MAX_STRING_LENGTH + 1)).string()


def test_frame_never_empty() -> None:
    assert wire.frame(b"abc") == wire.u64(3) + b"abc"  # frames carry no padding
    with pytest.raises(ValueError):
        wire.frame(b"")


def test_resolve_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIX_DAEMON_SOCKET_PATH", raising=False)
    assert resolve_socket_path(None) == DEFAULT_SOCKET
    assert resolve_socket_path("daemon") == DEFAULT_SOCKET
    assert resolve_socket_path("unix:///tmp/s?root=/x") == "/tmp/s"
    assert resolve_socket_path("/tmp/s") == "/tmp/s"
    monkeypatch.setenv("NIX_DAEMON_SOCKET_PATH", "/run/other")
    assert resolve_socket_path("daemon") == "/run/other"
    with pytest.raises(StoreError, match="not a nix-daemon socket"):
        resolve_socket_path("https://cache.nixos.org")


def test_nar_hash_forms_agree() -> None:
    digest = hashlib.sha256(b"nar").digest()
    hex_form = digest.hex()
    sri = "sha256-" + base64.b64encode(digest).decode()
    value = int.from_bytes(digest, "little")
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    nix32 = "".join(alphabet[(value >> (5 * k)) & 31] for k in range(51, -1, -1))
    for form in (hex_form, "sha256:" + hex_form, sri, "sha256:" + nix32):
        assert nar_hash_digest(form) == digest, form
    for bad in ("md5:abc", "sha256:" + "e" * 52, "sha256:xyz", "sha256:" + "z" * 52):
        with pytest.raises(HashError):
            nar_hash_digest(bad)


async def chunks_then(chunks: list[bytes], error: Exception | None) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
    if error is not None:
        raise error


def info_for(data: bytes) -> PathInfo:
    return PathInfo(
        store_path="/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
        nar_hash="sha256:" + hashlib.sha256(data).hexdigest(),
        nar_size=len(data),
    )


async def test_guard_holds_back_the_last_chunk_until_the_producer_ends() -> None:
    parts = [b"aa", b"", b"bb", b"cc"]
    info = info_for(b"aabbcc")
    received: list[bytes] = []
    with pytest.raises(RuntimeError, match="late failure"):
        async for chunk in guarded_nar(
            info, chunks_then(parts, RuntimeError("late failure")), check_hash=True
        ):
            received.append(chunk)
    assert received == [b"aa", b"bb"]  # the final chunk never left
    received = [c async for c in guarded_nar(info, chunks_then(parts, None), check_hash=True)]
    assert received == [b"aa", b"bb", b"cc"]


async def test_guard_checks_size_and_hash() -> None:
    info = info_for(b"aabbcc")
    with pytest.raises(SizeMismatch, match="longer"):
        [c async for c in guarded_nar(info, chunks_then([b"aabbccd"], None), check_hash=False)]
    with pytest.raises(SizeMismatch, match="5 bytes"):
        [c async for c in guarded_nar(info, chunks_then([b"aabbc"], None), check_hash=False)]
    with pytest.raises(Exception, match="NarHash says"):
        [c async for c in guarded_nar(info, chunks_then([b"aabbcX"], None), check_hash=True)]


# ---------------------------------------------------------------- a scripted fake daemon

FakeHandler = Callable[[wire.WireReader, asyncio.StreamWriter], Awaitable[None]]


async def serve_fake(tmp_path: Path, version: int, after_handshake: FakeHandler) -> asyncio.Server:
    """A daemon that handshakes like a HEAD nix-daemon at ``version``, then runs a script."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r = wire.WireReader(reader, "fake client")
        try:
            assert await r.u64() == WORKER_MAGIC_1
            writer.write(wire.u64(WORKER_MAGIC_2) + wire.u64(version))
            client_version = await r.u64()
            assert client_version == min(version, 0x126), hex(client_version)
            minor = client_version & 0xFF
            if minor >= 38:
                assert await r.string_list() == []
                writer.write(wire.string_set(["some-future-feature"]))
            assert await r.u64() == 0  # cpu affinity
            assert await r.u64() == 0  # reserveSpace
            writer.write(wire.string("9.9.9"))
            if minor >= 35:
                writer.write(wire.u64(2))  # not trusted
            writer.write(wire.u64(Stderr.LAST))
            await after_handshake(r, writer)
        except ProtocolError:
            pass  # the client hung up, as some tests make it do
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, path=str(tmp_path / "fake.sock"))


def fields(*values: int | str) -> bytes:
    out = wire.u64(len(values))
    for value in values:
        out += (
            wire.u64(0) + wire.u64(value)
            if isinstance(value, int)
            else wire.u64(1) + wire.string(value)
        )
    return out


async def test_handshake_and_every_log_message_against_a_1_39_daemon(tmp_path: Path) -> None:
    ops_seen: list[int] = []

    async def script(r: wire.WireReader, w: asyncio.StreamWriter) -> None:
        for _ in range(2):
            ops_seen.append(await r.u64())
            path = await r.string()
            assert path.endswith("-x")
            w.write(
                wire.u64(Stderr.NEXT)
                + wire.string("\x1b[1mhello\x1b[0m\n")
                + wire.u64(Stderr.START_ACTIVITY)
                + wire.u64(7)
                + wire.u64(3)
                + wire.u64(100)
                + wire.string("copying")
                + fields(1, "two")
                + wire.u64(0)
                + wire.u64(Stderr.RESULT)
                + wire.u64(7)
                + wire.u64(105)
                + fields(10, 20)
                + wire.u64(Stderr.STOP_ACTIVITY)
                + wire.u64(7)
            )
            if len(ops_seen) == 1:
                w.write(
                    wire.u64(Stderr.ERROR)
                    + wire.string("Error")
                    + wire.u64(0)
                    + wire.string("Error")
                    + wire.string("\x1b[31;1merror:\x1b[0m path '\x1b[35;1mx\x1b[0m' is odd")
                    + wire.u64(0)
                    + wire.u64(1)
                    + wire.u64(0)
                    + wire.string("while \x1b[1mtesting\x1b[0m")
                )
            else:
                w.write(wire.u64(Stderr.LAST) + wire.u64(1))
            await w.drain()

    server = await serve_fake(tmp_path, 0x127, script)
    async with server, await DaemonStore.connect(f"unix://{tmp_path / 'fake.sock'}") as store:
        assert store.protocol_version == (1, 38)
        assert store.nix_version == "9.9.9"
        assert store.trusted is False
        assert store.features == frozenset()
        with pytest.raises(StoreError) as refused:
            await store.is_valid_path("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x")
        assert str(refused.value) == "error: path 'x' is odd\nwhile testing"
        # same connection, still in step after the error
        assert await store.is_valid_path("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x")
        assert store.connection_count == 1
    assert ops_seen == [Op.IS_VALID_PATH, Op.IS_VALID_PATH]


async def test_unknown_message_type_is_a_protocol_error(tmp_path: Path) -> None:
    async def script(r: wire.WireReader, w: asyncio.StreamWriter) -> None:
        await r.u64()
        await r.string()
        w.write(wire.u64(0x12345678))
        await w.drain()

    async with await serve_fake(tmp_path, 0x122, script):
        store = await DaemonStore.connect(str(tmp_path / "fake.sock"))
        assert store.protocol_version == (1, 34)
        with pytest.raises(ProtocolError, match="unknown message type 0x12345678"):
            await store.is_valid_path("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x")
        await store.close()
        with pytest.raises(StoreError, match="is closed"):
            await store.is_valid_path("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x")


@pytest.mark.parametrize("message", [Stderr.READ, Stderr.WRITE])
async def test_data_requests_are_refused_and_the_store_reconnects(
    tmp_path: Path, message: Stderr
) -> None:
    connections = 0

    async def script(r: wire.WireReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        assert await r.u64() == Op.IS_VALID_PATH
        await r.string()
        if connections == 1:
            w.write(wire.u64(message) + wire.u64(8))
        else:
            w.write(wire.u64(Stderr.LAST) + wire.u64(1))
        await w.drain()
        await r.u64()  # until the client hangs up

    server = await serve_fake(tmp_path, 0x122, script)
    async with server, await DaemonStore.connect(str(tmp_path / "fake.sock")) as store:
        with pytest.raises(ProtocolError, match=message.name):
            await store.is_valid_path("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x")
        assert await store.is_valid_path("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x")
        assert store.connection_count == 2


async def test_too_old_daemon_is_refused(tmp_path: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(wire.u64(WORKER_MAGIC_2) + wire.u64(0x121))
        writer.close()
        await writer.wait_closed()

    async with await asyncio.start_unix_server(handle, path=str(tmp_path / "old.sock")):
        with pytest.raises(ProtocolError, match="speaks protocol 1.33"):
            await DaemonStore.connect(str(tmp_path / "old.sock"))


async def test_malformed_paths_never_reach_the_daemon(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot connect"):
        await DaemonStore.connect(str(tmp_path / "absent.sock"))

    async def script(r: wire.WireReader, w: asyncio.StreamWriter) -> None:
        await r.u64()  # the client must not send anything: this would hang the test

    server = await serve_fake(tmp_path, 0x122, script)
    async with server, await DaemonStore.connect(str(tmp_path / "fake.sock")) as store:
        with pytest.raises(StorePathError):
            await store.query_valid_paths(["/nix/store/bad"])
        with pytest.raises(StorePathError):
            await store.add_to_store_nar(
                replace(info_for(b"x"), references=frozenset({"/tmp/x"})),
                chunks_then([b"x"], None),
            )


def test_store_paths_checked_again_give_the_same_verdict() -> None:
    # Well-formed paths are remembered (per store dir): a fetch checks each one several times.
    good = "/nix/store/" + "a" * 32 + "-x"
    for _ in range(2):
        assert check_store_path(good) == good
        assert check_store_path(good.replace("/nix/store", "/other"), "/other")
        with pytest.raises(StorePathError, match="not a valid store path in /other"):
            check_store_path(good, "/other")
        for bad in ("/nix/store/" + "e" * 32 + "-x", "/nix/store/" + "a" * 32 + "-.x", good + "/sub"):
            with pytest.raises(StorePathError):
                check_store_path(bad)


# ----------------------------------------------------------------- real private daemons


@pytest.fixture
def closure(nix: Nix, tmp_path: Path) -> list[DumpedPath]:
    top, _ = nix.closure("daemon-test", n_deps=2)
    return dump_closure(nix, top, tmp_path / "nars")


@pytest.fixture
def signed_closure(nix: Nix, tmp_path: Path, nix_keys: tuple[Path, Path, str]) -> list[DumpedPath]:
    top, _ = nix.closure("daemon-signed", n_deps=2)
    return dump_closure(nix, top, tmp_path / "nars", key_file=nix_keys[0])


def private_store_check(nix: Nix, daemon: PrivateDaemon, paths: list[str]) -> set[str]:
    """The paths ``nix-store --check-validity`` calls valid in the daemon's store."""
    out = nix.text(
        "nix-store",
        "--store",
        str(daemon.store_root),
        "--check-validity",
        "--print-invalid",
        *paths,
    )
    return set(paths) - set(out.split())


def assert_landed_intact(nix: Nix, daemon: PrivateDaemon, closure: list[DumpedPath]) -> None:
    paths = [d.info.store_path for d in closure]
    assert private_store_check(nix, daemon, paths) == set(paths)
    nix.run("nix-store", "--store", str(daemon.store_root), "--verify-path", *paths)
    for dumped in closure:
        copy = nix.run(
            "nix-store", "--store", str(daemon.store_root), "--dump", dumped.info.store_path
        )
        assert copy == dumped.nar.read_bytes()


@pytest.mark.nix
@pytest.mark.daemon
async def test_trusted_client_adds_a_closure(
    nix: Nix, nix_daemon_factory: Callable[..., PrivateDaemon], closure: list[DumpedPath]
) -> None:
    daemon = nix_daemon_factory(trusted=True)
    async with await DaemonStore.connect(daemon.store_url) as store:
        assert store.protocol_version == (1, 34)  # Nix 2.8 offers 1.34
        assert store.nix_version == nix.text("nix", "--version").split()[-1]
        assert store.trusted is None  # 1.34 predates the trusted flag
        paths = [d.info.store_path for d in closure]
        assert await store.query_valid_paths(paths) == set()
        for dumped in closure:
            await store.add_to_store_nar(dumped.info, stream_file(dumped.nar), dont_check_sigs=True)
        assert await store.query_valid_paths(paths) == set(paths)
        for dumped in closure:
            got = await store.query_path_info(dumped.info.store_path)
            assert got is not None
            assert bytes.fromhex(got.nar_hash) == nar_hash_digest(dumped.info.nar_hash)
            assert got.nar_size == dumped.info.nar_size
            assert got.references == dumped.info.references
            assert got.deriver == dumped.info.deriver
        await store.add_temp_root(closure[-1].info.store_path)
        assert store.connection_count == 1
    assert "(trusted)" in daemon.log()
    assert_landed_intact(nix, daemon, closure)


@pytest.mark.nix
@pytest.mark.daemon
async def test_add_multiple_to_store(
    nix: Nix, nix_daemon_factory: Callable[..., PrivateDaemon], closure: list[DumpedPath]
) -> None:
    daemon = nix_daemon_factory(trusted=True)
    async with await DaemonStore.connect(daemon.store_url) as store:
        # One path already there: Nix 2.8 would lose its place in the stream on it.
        await store.add_to_store_nar(
            closure[0].info, stream_file(closure[0].nar), dont_check_sigs=True
        )
        await store.add_multiple_to_store(
            [(d.info, stream_file(d.nar)) for d in closure], dont_check_sigs=True
        )
        await store.add_multiple_to_store([], dont_check_sigs=True)
        assert store.connection_count == 1
    assert_landed_intact(nix, daemon, closure)


@pytest.mark.nix
@pytest.mark.daemon
async def test_untrusted_unsigned_is_refused_and_connection_survives(
    nix: Nix, nix_daemon_factory: Callable[..., PrivateDaemon], closure: list[DumpedPath]
) -> None:
    daemon = nix_daemon_factory(trusted=False)
    first = closure[0]
    async with await DaemonStore.connect(daemon.store_url) as store:
        with pytest.raises(StoreError) as refused:
            # dont_check_sigs is ignored for an untrusted client
            await store.add_to_store_nar(first.info, stream_file(first.nar), dont_check_sigs=True)
        message = str(refused.value)
        assert "lacks a valid signature" in message
        assert first.info.store_path in message
        assert "\x1b" not in message
        assert not await store.is_valid_path(first.info.store_path)
        assert store.connection_count == 1  # the daemon kept the connection after ERROR
    assert "(trusted)" not in daemon.log()
    assert private_store_check(nix, daemon, [first.info.store_path]) == set()


@pytest.mark.nix
@pytest.mark.daemon
async def test_untrusted_signed_by_trusted_key_is_accepted(
    nix: Nix,
    nix_daemon_factory: Callable[..., PrivateDaemon],
    signed_closure: list[DumpedPath],
    nix_keys: tuple[Path, Path, str],
) -> None:
    daemon = nix_daemon_factory(trusted=False, trusted_public_keys=[nix_keys[2]])
    key_name = nix_keys[2].split(":")[0]
    async with await DaemonStore.connect(daemon.store_url) as store:
        for dumped in signed_closure:
            assert any(sig.startswith(key_name + ":") for sig in dumped.info.sigs)
            await store.add_to_store_nar(dumped.info, stream_file(dumped.nar))
        top = await store.query_path_info(signed_closure[-1].info.store_path)
        assert top is not None and top.sigs == signed_closure[-1].info.sigs
    assert_landed_intact(nix, daemon, signed_closure)


@pytest.mark.nix
@pytest.mark.daemon
async def test_untrusted_signed_by_unknown_key_is_refused(
    nix_daemon_factory: Callable[..., PrivateDaemon], signed_closure: list[DumpedPath]
) -> None:
    daemon = nix_daemon_factory(trusted=False)  # the signing key is not in its keys
    first = signed_closure[0]
    async with await DaemonStore.connect(daemon.store_url) as store:
        with pytest.raises(StoreError, match="lacks a valid signature"):
            await store.add_to_store_nar(first.info, stream_file(first.nar))
        assert not await store.is_valid_path(first.info.store_path)


@pytest.mark.nix
@pytest.mark.daemon
async def test_wrong_nar_hash_is_refused(
    nix: Nix, nix_daemon_factory: Callable[..., PrivateDaemon], closure: list[DumpedPath]
) -> None:
    daemon = nix_daemon_factory(trusted=True)
    first = closure[0]
    wrong = replace(first.info, nar_hash="sha256:" + hashlib.sha256(b"other").hexdigest())
    async with await DaemonStore.connect(daemon.store_url) as store:
        with pytest.raises(StoreError, match="hash mismatch"):
            await store.add_to_store_nar(wrong, stream_file(first.nar), dont_check_sigs=True)
        assert not await store.is_valid_path(first.info.store_path)
        # the right one still goes in on the same store
        await store.add_to_store_nar(first.info, stream_file(first.nar), dont_check_sigs=True)
    assert private_store_check(nix, daemon, [first.info.store_path]) == {first.info.store_path}


async def failing_after(path: Path, fraction: float) -> AsyncIterator[bytes]:
    """Yield the first ``fraction`` of the file (1.0: all of it), then fail like a verifier."""
    data = path.read_bytes()
    cut = int(len(data) * fraction)
    for start in range(0, cut, 64):
        yield data[start : min(start + 64, cut)]
    raise RuntimeError("source failed mid-stream")


@pytest.mark.nix
@pytest.mark.daemon
@pytest.mark.parametrize("fraction", [0.5, 1.0])
async def test_producer_failure_leaves_no_partial_path(
    nix: Nix,
    nix_daemon_factory: Callable[..., PrivateDaemon],
    closure: list[DumpedPath],
    fraction: float,
) -> None:
    daemon = nix_daemon_factory(trusted=True)
    first = closure[0]
    async with await DaemonStore.connect(daemon.store_url) as store:
        with pytest.raises(RuntimeError, match="mid-stream"):
            await store.add_to_store_nar(
                first.info, failing_after(first.nar, fraction), dont_check_sigs=True
            )
        # the store reconnects and the daemon still serves
        assert not await store.is_valid_path(first.info.store_path)
        assert store.connection_count == 2
        await store.add_to_store_nar(first.info, stream_file(first.nar), dont_check_sigs=True)
        assert await store.is_valid_path(first.info.store_path)
    assert daemon.alive()
    assert private_store_check(nix, daemon, [first.info.store_path]) == {first.info.store_path}


@pytest.mark.nix
@pytest.mark.daemon
async def test_add_multiple_failure_never_registers_the_failing_path(
    nix: Nix, nix_daemon_factory: Callable[..., PrivateDaemon], closure: list[DumpedPath]
) -> None:
    daemon = nix_daemon_factory(trusted=True)
    first, second = closure[0], closure[1]
    items = [(first.info, stream_file(first.nar)), (second.info, failing_after(second.nar, 1.0))]
    async with await DaemonStore.connect(daemon.store_url) as store:
        with pytest.raises(RuntimeError, match="mid-stream"):
            await store.add_multiple_to_store(items, dont_check_sigs=True)
        # The first path may or may not have been registered before the hang-up.
        assert not await store.is_valid_path(second.info.store_path)
        await store.add_multiple_to_store(
            [(d.info, stream_file(d.nar)) for d in closure], dont_check_sigs=True
        )
    assert_landed_intact(nix, daemon, closure)


@pytest.mark.nix
@pytest.mark.daemon
async def test_cancellation_mid_stream_leaves_no_partial_path(
    nix: Nix, nix_daemon_factory: Callable[..., PrivateDaemon], closure: list[DumpedPath]
) -> None:
    daemon = nix_daemon_factory(trusted=True)
    first = closure[0]
    started = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        data = first.nar.read_bytes()
        yield data[:100]
        yield data[100:200]
        started.set()
        await asyncio.Event().wait()  # never finishes
        yield data[200:]

    async with await DaemonStore.connect(daemon.store_url) as store:
        task = asyncio.create_task(
            store.add_to_store_nar(first.info, stalls(), dont_check_sigs=True)
        )
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not await store.is_valid_path(first.info.store_path)
    assert private_store_check(nix, daemon, [first.info.store_path]) == set()


@pytest.mark.nix
@pytest.mark.daemon
def test_private_daemon_serves_nix_clients(
    nix: Nix, nix_daemon_factory: Callable[..., PrivateDaemon]
) -> None:
    daemon = nix_daemon_factory(trusted=True)
    assert daemon.alive()
    ping = subprocess.run(
        ["nix", "store", "ping", "--store", daemon.store_url],
        capture_output=True,
        check=False,
        env=daemon.client_env(nix.env),
    )
    assert ping.returncode == 0, ping.stderr


# ------------------------------------------------ our own nix-daemon --stdio for a chroot


def chroot_valid(nix: Nix, root: Path, paths: list[str]) -> set[str]:
    out = nix.text("nix-store", "--store", str(root), "--check-validity", "--print-invalid", *paths)
    return set(paths) - set(out.split())


@pytest.mark.nix
async def test_spawned_daemon_writes_a_chroot_store_keeping_signatures(
    nix: Nix, tmp_path: Path, signed_closure: list[DumpedPath]
) -> None:
    """`nix-daemon --stdio --store DIR` as our child: one process for queries and the import,
    signatures kept (the key is trusted by nobody but the caller, hence dont_check_sigs), a
    producer failing mid-NAR leaves that path absent and the next call starts a new child."""
    root = tmp_path / "chroot"
    paths = [d.info.store_path for d in signed_closure]
    store = await DaemonStore.spawn(root, env=nix.env)
    children = [store._conn.child.process if store._conn is not None and store._conn.child else None]
    try:
        assert store.private and store.root == str(root)
        assert await store.query_valid_paths(paths) == set()
        first, rest = signed_closure[0], signed_closure[1:]
        with pytest.raises(RuntimeError, match="mid-stream"):
            await store.add_multiple_to_store([(first.info, failing_after(first.nar, 0.5))],
                                              dont_check_sigs=True)
        assert not await store.is_valid_path(first.info.store_path)
        assert store.connection_count == 2  # a new child after the dropped connection
        children.append(store._conn.child.process if store._conn is not None and store._conn.child else None)
        await store.add_multiple_to_store([(d.info, stream_file(d.nar)) for d in [first, *rest]],
                                          dont_check_sigs=True)
        got = await store.query_path_info(first.info.store_path)
        assert got is not None and got.sigs == first.info.sigs and got.sigs
    finally:
        await store.close()
    assert all(child is not None and child.returncode is not None for child in children), "reaped"
    assert chroot_valid(nix, root, paths) == set(paths)


@pytest.mark.nix
async def test_spawned_daemon_that_cannot_open_the_store_says_why(nix: Nix, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StoreError, match="nix-daemon --stdio --store"):
        await DaemonStore.spawn(not_a_dir / "store", env=nix.env)
