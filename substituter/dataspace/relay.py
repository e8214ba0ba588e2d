"""Serving the dataspace to other processes: a unix socket (and TCP, if asked) relay listener.

Every connection gets its own actor running a ``ServerConnection``, a syndicate-py
``TunnelRelay`` whose oid 0 is that connection's gatekeeper. A client resolves its sturdy ref
there and receives the dataspace ref; nothing else is reachable. A connection that presents no
valid capability, sends bytes that do not decode, records the protocol does not know, events
for oids it was never given, or values over the size limit is logged on
``substituter.dataspace`` and closed; its assertions are retracted, and the server carries on.

Create a ``RelayListener`` (or call ``serve_dataspace``) inside a turn; the listener lives as
long as the facet it was created in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import preserves
from syndicate import Decoder, actor, encode, relay, turn
from syndicate.schema import protocol, sturdy

from substituter.dataspace import wire
from substituter.dataspace.gatekeeper import Gatekeeper, GatekeeperEntity
from substituter.dataspace.tunnel import PlainTunnel
from substituter.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_PACKET_BYTES",
    "DEFAULT_OID",
    "RelayListener",
    "ServerConnection",
    "serve_dataspace",
]

log = logging.getLogger("substituter.dataspace")

DEFAULT_OID = "substituter"
DEFAULT_MAX_PACKET_BYTES = 4 * 1024 * 1024
# A client that stops reading while we keep writing is cut off rather than buffered forever.
MAX_UNSENT_BYTES = 64 * 1024 * 1024
READ_CHUNK = 64 * 1024
#: Seconds a new connection has to present a valid capability before it is closed.
AUTH_TIMEOUT = 10.0


class ServerConnection(PlainTunnel, relay.TunnelRelay):
    """The server side of one accepted stream; construct inside the connection's actor."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str,
        gatekeeper: Gatekeeper,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
        on_closed: Callable[[ServerConnection], None] | None = None,
    ) -> None:
        self.peer = peer
        self._on_closed = on_closed
        self._reader = reader
        self._writer = writer
        self._max_packet_bytes = max_packet_bytes
        self._closing = False
        self._gatekeeper_entity = GatekeeperEntity(gatekeeper, self.refuse)
        gatekeeper_ref = turn.ref(self._gatekeeper_entity)
        super().__init__(peer, publish_service=gatekeeper_ref, on_disconnected=_serve_once)
        facet = turn.active_facet()

        def demand_capability() -> None:
            if not self._gatekeeper_entity.granted and not self._closing:
                turn.run(facet, lambda: self.refuse(f"no valid capability within {AUTH_TIMEOUT:g} s"))

        # A connection that never presents a capability would hold an actor forever.
        facet.loop.call_later(AUTH_TIMEOUT, demand_capability)

    def refuse(self, reason: str) -> None:
        """Tell the client why, close the connection; its assertions are then retracted."""
        self._close(f"refused connection from {self.peer}: {reason}")

    @property
    def closing(self) -> bool:
        return self._closing

    async def main(self, system: actor.System, on_connected: Any = None) -> bool:
        self._on_connected()
        decoder = Decoder(decode_embedded=_decode_wire_ref)
        try:
            while not self._closing:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    break
                decoder.extend(chunk)
                self._dispatch_complete_values(decoder)
        except OSError as exc:
            log.info("connection from %s lost: %s", self.peer, exc)
        finally:
            self._on_disconnected()
            # Told from here, not from a facet stop hook: syndicate-py 0.19.3 skips the hook
            # after a linked task's self-removing cleanup when a facet stops.
            if self._on_closed is not None:
                self._on_closed(self)
        return True

    def _dispatch_complete_values(self, decoder: Decoder) -> None:
        while not self._closing:
            start = decoder.index
            try:
                value = wire.next_value(decoder, _decode_wire_ref)
                if value is None:
                    if len(decoder.packet) - decoder.index > self._max_packet_bytes:
                        self._close_oversized()
                    return
            except Exception as exc:  # noqa: BLE001 - DecodeError, RecursionError on deep nesting, bad embedded
                self._close(f"malformed packet from {self.peer}: {type(exc).__name__}: {exc}")
                return
            if decoder.index - start > self._max_packet_bytes:
                self._close_oversized()
                return
            turn.run(self.facet, lambda v=value: self._handle_guarded(v))

    def _close_oversized(self) -> None:
        self._close(f"packet from {self.peer} exceeds {self._max_packet_bytes} bytes")

    def _handle_guarded(self, value: Any) -> None:
        # Any failure here is the peer's fault; it must close this connection, not crash the actor.
        try:
            self._handle_packet(value)
        except Exception as exc:  # noqa: BLE001
            self._close(f"invalid packet from {self.peer}: {type(exc).__name__}: {exc}")

    def _handle_packet(self, value: Any) -> None:
        events = wire.parse_turn(value)
        if events is not None:
            self._handle_parsed_turn(events)
            return
        # Anything the fast parse does not recognise goes through the schema (same verdicts).
        try:
            packet = protocol.Packet.decode(value)
        except preserves.schema.SchemaDecodeFailed:
            self._close(f"not a protocol packet from {self.peer}: {_show(value)}")
            return
        variant = packet.VARIANT.name
        if variant == "Turn":
            for event in packet.value.value:
                if self._closing:
                    return
                problem = self._event_problem(event)
                if problem is not None:
                    self._close(f"{problem} from {self.peer}")
                    return
                self._handle_turn_events([event])
        elif variant == "Error":
            error = packet.value
            log.info("%s reported an error and is closed: %r %s", self.peer, error.message,
                     _show(error.detail))
            self._close(None)
        elif variant == "Extension":
            self._close(f"unknown packet record from {self.peer}: {_show(value)}")
        # Nop: nothing to do.

    def _handle_parsed_turn(self, events: list[tuple[int, str, Any, Any]]) -> None:
        """The events of a Turn packet ``wire.parse_turn`` took apart, checked and applied one by
        one as the base class would (its ``_handle_turn_events``), without schema objects."""
        inbound = self.inbound_assertions
        oid_map = self.exported_references.oid_map
        for oid, kind, first, second in events:
            if self._closing:
                return
            if kind == "R":
                if first not in inbound:
                    self._close(f"retraction of unknown handle {first} from {self.peer}")
                    return
            elif oid not in oid_map:
                self._close(f"{wire.EVENT_NAMES[kind]} to oid {oid}, which this connection was "
                            f"never given from {self.peer}")
                return
            elif kind == "A" and second in inbound:
                self._close(f"assertion reusing live handle {second} from {self.peer}")
                return
            pins: list[Any] = []
            ref = self._lookup_exported_oid(oid, pins)
            if kind == "A":
                self._handle_publish(pins, ref, first, second)
            elif kind == "R":
                self._handle_retract(pins, ref, first)
            elif kind == "M":
                self._handle_message(pins, ref, first)
            else:
                self._handle_sync(pins, ref, first)

    def _event_problem(self, event: Any) -> str | None:
        """Why ``event`` may not be applied, or None. The base class would crash or leak on these."""
        kind = event.event.VARIANT.name
        oid = event.oid.value
        if kind == "Retract":
            if event.event.value.handle.value not in self.inbound_assertions:
                return f"retraction of unknown handle {event.event.value.handle.value}"
            return None
        if oid not in self.exported_references.oid_map:
            return f"{kind.lower()} to oid {oid}, which this connection was never given"
        if kind == "Assert" and event.event.value.handle.value in self.inbound_assertions:
            return f"assertion reusing live handle {event.event.value.handle.value}"
        return None

    def _close(self, reason: str | None) -> None:
        if self._closing:
            return
        self._closing = True
        if reason is not None:
            log.warning("%s", reason)
            error = protocol.Packet.Error(protocol.Error(reason, False))
            self._writer.write(encode(error))
        self._writer.close()

    def _send_bytes(self, bs: bytes) -> None:
        if self._closing:
            return
        self._writer.write(bs)
        if self._writer.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self._close(f"{self.peer} does not read its replies; over {MAX_UNSENT_BYTES} unsent")

    def close(self) -> None:
        """Close without complaint (shutdown); the reader loop then retracts everything."""
        self._close(None)

    def _disconnect(self) -> None:
        self.close()


def _decode_wire_ref(value: Any) -> Any:
    # Stock syndicate-py 0.19.3 clients write a Sync's peer embedded twice (<S #:#:[0 n]>);
    # syndicate-server refuses that, we accept it (connect() sends it once). The inner
    # embedded value arrives already decoded.
    if isinstance(value, preserves.Embedded) and isinstance(
        value.embeddedValue, sturdy.WireRef.mine | sturdy.WireRef.yours
    ):
        return value.embeddedValue
    return wire.decode_wire_ref(value)


async def _serve_once(_relay: relay.TunnelRelay, _did_connect: bool) -> bool:
    return False  # a server-side connection is never re-established by us


def _show(value: Any) -> str:
    text: str = preserves.stringify(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_loopback(host: str, allow_non_loopback: bool) -> None:
    if allow_non_loopback:
        return
    try:
        # An IP literal: a name such as "localhost" could resolve elsewhere (/etc/hosts, DNS).
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError as exc:
        raise ConfigError(f"relay TCP host {host!r} is not an IP address (use 127.0.0.1 or ::1)") from exc
    if not loopback:
        raise ConfigError(
            f"relay TCP host {host} is not a loopback address; the dataspace would be reachable "
            "from the network (bind 127.0.0.1 or ::1, or set allow-non-loopback explicitly)"
        )


class RelayListener:
    """Accepts relay connections on a unix socket and/or TCP, each served through ``gatekeeper``.

    Construct inside a turn. ``await listener.ready`` before connecting; it carries the bind
    error, if any. Stopping the facet closes the listeners and every connection.
    """

    def __init__(
        self,
        gatekeeper: Gatekeeper,
        *,
        unix_path: Path | None = None,
        unix_mode: int = 0o600,
        tcp: tuple[str, int] | None = None,
        allow_non_loopback: bool = False,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
    ) -> None:
        if unix_path is None and tcp is None:
            raise ConfigError("relay listener needs a unix socket path or a TCP address")
        if unix_mode & ~0o660:
            raise ConfigError(f"relay socket mode {unix_mode:04o} is too open (use 0600 or 0660)")
        if tcp is not None:
            _check_loopback(tcp[0], allow_non_loopback)
        self._gatekeeper = gatekeeper
        self._unix_path = unix_path
        self._unix_mode = unix_mode
        self._tcp = tcp
        self._max_packet_bytes = max_packet_bytes
        self._connections: set[ServerConnection] = set()
        self._tcp_address: tuple[str, int] | None = None
        self._facet = turn.active_facet()
        self.ready: asyncio.Future[None] = self._facet.loop.create_future()
        self._facet.linked_task(self._run)

    @property
    def unix_path(self) -> Path | None:
        return self._unix_path

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The bound (host, port), once ready; the port is real even if 0 was asked for."""
        return self._tcp_address

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def _run(self, _facet: actor.Facet) -> None:
        servers: list[asyncio.Server] = []
        try:
            try:
                if self._unix_path is not None:
                    servers.append(await self._start_unix(self._unix_path))
                if self._tcp is not None:
                    server = await asyncio.start_server(self._accept, self._tcp[0], self._tcp[1])
                    self._tcp_address = server.sockets[0].getsockname()[:2]
                    servers.append(server)
            except Exception as exc:
                self.ready.set_exception(exc)
                raise
            log.info("dataspace relay listening on %s", self._describe_addresses())
            self.ready.set_result(None)
            await asyncio.Event().wait()  # until the facet stops and cancels us
        finally:
            for server in servers:
                server.close()
            for connection in list(self._connections):
                connection.close()
            if self._unix_path is not None and servers:
                self._unix_path.unlink(missing_ok=True)

    async def _start_unix(self, path: Path) -> asyncio.Server:
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(f"relay socket path {path} exists and is not a socket")
            path.unlink()  # a stale socket from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # On Linux the socket inode's mode is used at bind time, so no window of wider access.
            os.fchmod(sock.fileno(), self._unix_mode)
            sock.bind(str(path))
            os.chmod(path, self._unix_mode)
            return await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            raise

    def _describe_addresses(self) -> str:
        parts = []
        if self._unix_path is not None:
            parts.append(f'<unix "{self._unix_path}">')
        if self._tcp_address is not None:
            parts.append(f'<tcp "{self._tcp_address[0]}" {self._tcp_address[1]}>')
        return " ".join(parts)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer_name(writer)
        if not self._facet.alive:
            writer.close()
            return

        def boot() -> None:
            connection = ServerConnection(
                reader, writer, peer=peer, gatekeeper=self._gatekeeper,
                max_packet_bytes=self._max_packet_bytes, on_closed=self._connections.discard,
            )
            self._connections.add(connection)

        log.debug("relay connection from %s", peer)
        turn.run(self._facet, lambda: turn.spawn(boot, name=f"relay {peer}"))


def _peer_name(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid = int.from_bytes(creds[:4], "little")
            return f"unix-peer(pid {pid})"
        except OSError:
            return "unix-peer"
    peer = writer.get_extra_info("peername")
    return f"tcp-peer({peer[0]}:{peer[1]})" if peer else "peer"


def serve_dataspace(
    dataspace: actor.Ref,
    key: bytes,
    *,
    oid: Any = DEFAULT_OID,
    unix_path: Path | None = None,
    unix_mode: int = 0o600,
    tcp: tuple[str, int] | None = None,
    allow_non_loopback: bool = False,
    extra_bindings: Mapping[Any, actor.Ref] | None = None,
) -> RelayListener:
    """Serve ``dataspace`` to holders of ``mint(key, oid)``; call inside a turn."""
    bindings: dict[Any, actor.Ref] = dict(extra_bindings or {})
    bindings[oid] = dataspace
    return RelayListener(
        Gatekeeper(key, bindings), unix_path=unix_path, unix_mode=unix_mode, tcp=tcp,
        allow_non_loopback=allow_non_loopback,
    )
