"""What both ends of our relay connections change in syndicate-py's ``TunnelRelay``.

Events leave as plain Preserves values written by ``wire`` (syndicate-py builds protocol
schema objects per event and encodes them generically at flush time), references are
rewritten with ``wire.map_embeddeds``, and a flush is a plain loop callback rather than a
task. The bytes on the wire are the same.
"""

from __future__ import annotations

from typing import Any

from preserves import Embedded, Record, Symbol
from syndicate import actor, relay, turn

from substituter.dataspace import wire

__all__ = ["PlainTunnel"]

_ASSERT = Symbol("A")
_RETRACT = Symbol("R")
_MESSAGE = Symbol("M")


class _PlainRelayEntity(relay.RelayEntity):
    """A reference the peer exported: events to it go straight into the pending turn."""

    relay: PlainTunnel

    def on_publish(self, assertion: Any, handle: Any) -> None:
        tunnel = self.relay
        tunnel.send_value(self.oid, Record(_ASSERT, (tunnel.register(self.oid, assertion, handle),
                                                     handle)))

    def on_retract(self, handle: Any) -> None:
        tunnel = self.relay
        tunnel.deregister(handle)  # type: ignore[attr-defined]
        tunnel.send_value(self.oid, Record(_RETRACT, (handle,)))

    def on_message(self, message: Any) -> None:
        tunnel = self.relay
        tunnel.send_value(self.oid, Record(_MESSAGE, (tunnel.register(self.oid, message, None),)))


class PlainTunnel:
    """Mixin, before syndicate-py's ``TunnelRelay`` (or a subclass) in the bases."""

    facet: Any
    pending_turn: list[tuple[int, Any]]  # (oid, event value); reset by TunnelRelay._reset
    outbound_assertions: dict[Any, Any]
    imported_references: Any

    # ---- out

    def _send(self, remote_oid: int, turn_event: Any) -> None:
        # Only syncs still come here as schema objects (RelayEntity.on_sync).
        self.send_value(remote_oid, self._event_value(turn_event))

    def _event_value(self, turn_event: Any) -> Any:
        return wire.event_value(turn_event)

    def send_value(self, remote_oid: int, event: Any) -> None:
        """Queue one event for the peer; everything queued in one loop pass is one write."""
        pending = self.pending_turn
        if not pending:
            self.facet.loop.call_soon(actor.Turn.run, self.facet, self._flush_pending)
        pending.append((remote_oid, event))

    def _flush_pending(self) -> None:
        pending = self.pending_turn
        self.pending_turn = []
        self._send_bytes(wire.turn_packet(pending))  # type: ignore[attr-defined]

    def register(self, target_oid: int, assertion: Any, maybe_handle: Any) -> Any:
        pins: list[Any] = []
        self.register_imported_oid(target_oid, pins)  # type: ignore[attr-defined]
        transient = maybe_handle is None
        rewrite = self.rewrite_ref_out  # type: ignore[attr-defined]
        rewritten = wire.map_embeddeds(lambda r: Embedded(rewrite(r, transient, pins)), assertion)
        if maybe_handle is not None:
            self.outbound_assertions[maybe_handle] = pins
        return rewritten

    # ---- in

    def rewrite_in(self, assertion: Any, pins: list[Any]) -> Any:
        rewrite = self.rewrite_ref_in
        return wire.map_embeddeds(lambda wire_ref: Embedded(rewrite(wire_ref, pins)), assertion)

    def rewrite_ref_in(self, wire_ref: Any, pins: list[Any]) -> Any:
        if wire_ref.VARIANT.name != "mine":
            return super().rewrite_ref_in(wire_ref, pins)  # type: ignore[misc]
        oid = wire_ref.oid.value
        imported = self.imported_references
        ws = imported.get_oid(pins, oid, lambda: relay.WireSymbol(
            oid, turn.ref(_PlainRelayEntity(self, oid)), imported))
        return ws.ref
