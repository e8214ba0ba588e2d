"""Connecting to a dataspace in another process: the embedded relay or a real syndicate-server.

Both speak the Syndicate relay protocol with a gatekeeper at oid 0, so one client serves
both::

    @connect('<unix "/run/substituter/ds.sock">', '<ref {oid: "substituter" sig: #x"..."}>')
    def on_dataspace(ds):
        turn.publish(ds, ...)   # retracted when the connection drops; re-run after reconnecting

Call it inside a turn. The handler runs in a fresh facet each time the capability is
accepted; that facet stops when the connection is lost. Connection failures are retried every
``retry_delay`` seconds; a refused capability is logged on ``substituter.dataspace``, reported
to ``on_refused`` and not retried (it would be refused again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import preserves
from preserves import Embedded, Record, Symbol
from syndicate import actor, relay, turn
from syndicate.during import During
from syndicate.schema import gatekeeper as gatekeeper_schema
from syndicate.schema import transportAddress

from substituter.dataspace import wire
from substituter.dataspace.tunnel import PlainTunnel
from substituter.errors import ConfigError

__all__ = ["DataspaceHandler", "connect", "parse_address", "parse_capability"]

log = logging.getLogger("substituter.dataspace")

DataspaceHandler = Callable[[actor.Ref], Any]

_REF = Symbol("ref")
# 0.50.1 answers <accepted #:ref>; 0.51 answers <ok #:ref>; both mean the same to us.
_ACCEPTED_LABELS = (Symbol("accepted"), Symbol("ok"))
_REJECTED = Symbol("rejected")


def parse_address(addr: str) -> Any:
    """A transport address: ``<unix "/p">``, ``<tcp "h" 9001>``, ``unix:/p``, ``/p``, ``h:9001``."""
    text = addr.strip()
    if text.startswith("<"):
        try:
            value = preserves.parse(text)
        except Exception as exc:  # noqa: BLE001 - preserves raises several kinds on bad text
            raise ConfigError(f"dataspace address {addr!r} does not parse: {exc}") from exc
        for kind in (transportAddress.Unix, transportAddress.Tcp):
            decoded = kind.try_decode(value)
            if decoded is not None:
                return decoded
        raise ConfigError(f'dataspace address {addr!r} is neither <unix "PATH"> nor <tcp "HOST" PORT>')
    if text.startswith("unix:"):
        return transportAddress.Unix(text[len("unix:"):])
    if text.startswith(("/", "./")):
        return transportAddress.Unix(text)
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit():
        return transportAddress.Tcp(host.strip("[]"), int(port))
    raise ConfigError(
        f"dataspace address {addr!r} not understood: use <unix \"/path\">, unix:/path, /path, "
        '<tcp "127.0.0.1" 9001> or 127.0.0.1:9001'
    )


def parse_capability(cap: str) -> Any:
    """The sturdy ref value from its text ``<ref {oid: ... sig: #x"..."}>``."""
    try:
        value = preserves.parse(cap.strip())
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"dataspace capability does not parse: {exc}") from exc
    if not (isinstance(value, Record) and value.key == _REF and len(value.fields) == 1):
        raise ConfigError('dataspace capability must look like <ref {oid: ... sig: #x"..."}>')
    return value


class _ClientRelay(PlainTunnel):
    """Mixin for syndicate-py's client relays: remembers why the server turned us away, sends
    syncs that syndicate-server accepts, and reads and writes packets with ``wire`` rather than
    the generic codec and protocol schema (same values, same bytes)."""

    refusal: str | None = None
    address: Any
    decoder: Any
    facet: Any

    def data_received(self, chunk: bytes) -> None:
        decoder = self.decoder
        decoder.extend(chunk)
        while True:
            value = wire.next_value(decoder, wire.decode_wire_ref)
            if value is None:
                return
            self._on_event(value)  # type: ignore[attr-defined]

    def _handle_event(self, value: Any) -> None:
        events = wire.parse_turn(value)
        if events is None:  # errors, extensions, anything unusual: as syndicate-py does
            super()._handle_event(value)  # type: ignore[misc]
            return
        # As syndicate-py's _handle_turn_events, without building schema objects.
        for oid, kind, first, second in events:
            pins: list[Any] = []
            ref = self._lookup_exported_oid(oid, pins)  # type: ignore[attr-defined]
            if kind == "A":
                self._handle_publish(pins, ref, first, second)  # type: ignore[attr-defined]
            elif kind == "R":
                self._handle_retract(pins, ref, first)  # type: ignore[attr-defined]
            elif kind == "M":
                self._handle_message(pins, ref, first)  # type: ignore[attr-defined]
            else:
                self._handle_sync(pins, ref, first)  # type: ignore[attr-defined]

    def _event_value(self, turn_event: Any) -> Any:
        if turn_event.VARIANT.name == "Sync":  # its peer embedded once (see wire.sync_value)
            return wire.sync_value(turn_event.value.peer)
        return wire.event_value(turn_event)

    def _on_error(self, message: str, detail: Any) -> None:
        self.refusal = message
        log.error("dataspace %s closed the connection: %s", preserves.stringify(self.address), message)
        self._disconnect()  # type: ignore[attr-defined]


class _UnixClient(_ClientRelay, relay.UnixSocketTunnelRelay):
    pass


class _TcpClient(_ClientRelay, relay.TcpTunnelRelay):
    pass


def connect(
    addr: str,
    cap: str,
    *,
    retry_delay: float = 1.0,
    on_refused: Callable[[str], None] | None = None,
) -> Callable[[DataspaceHandler], relay.TunnelRelay]:
    """Decorator: run the handler with the dataspace ref each time ``cap`` is accepted at ``addr``.

    Returns the underlying relay (its ``refusal`` says why it gave up, if it did).
    """
    address = parse_address(addr)
    step = parse_capability(cap)

    def decorate(handler: DataspaceHandler) -> relay.TunnelRelay:
        connection: relay.TunnelRelay

        def refused(reason: str) -> None:
            connection.refusal = reason
            log.error("dataspace %s refused the capability: %s", addr, reason)
            connection._disconnect()

        def on_resolved(answer: Any) -> Any:
            if isinstance(answer, Record) and answer.key in _ACCEPTED_LABELS and answer.fields:
                target = answer.fields[0]
                if isinstance(target, Embedded):
                    return handler(target.embeddedValue)
            if isinstance(answer, Record) and answer.key == _REJECTED:
                refused(preserves.stringify(answer.fields[0] if answer.fields else answer))
            else:
                refused(f"unexpected gatekeeper answer {preserves.stringify(answer)[:200]}")
            return None

        def on_gatekeeper(gatekeeper: Embedded) -> None:
            observer = turn.ref(During().add_handler(on_resolved))
            turn.publish(gatekeeper.embeddedValue, gatekeeper_schema.Resolve(step, observer))

        async def on_disconnected(tunnel: relay.TunnelRelay, did_connect: bool) -> bool:
            refusal = getattr(tunnel, "refusal", None)
            if refusal is not None:
                if on_refused is not None:
                    on_refused(refusal)
                return False
            if did_connect:
                log.info("dataspace %s disconnected; reconnecting", addr)
            await asyncio.sleep(retry_delay)
            return True

        client_class = _UnixClient if isinstance(address, transportAddress.Unix) else _TcpClient
        connection = client_class(
            address,
            gatekeeper_peer=turn.ref(During().add_handler(on_gatekeeper)),
            on_disconnected=on_disconnected,
        )
        return connection

    return decorate
