"""The embedded dataspace: a Syndicate entity holding a bag of assertions and its observers.

Publish an assertion to it and every observer whose pattern matches learns the captures;
publish ``Observe(pattern, ref)`` (what ``syndicate.dataspace.during`` and ``on_message`` do)
to become an observer. Semantics are those of syndicate-rs's dataspace: only the first copy
of an assertion and the retraction of its last copy have effects; each distinct capture
tuple is asserted to an observer once; messages are routed the same way but not counted.
Matching is done by ``index.Index``.
"""

from __future__ import annotations

import logging
from typing import Any

from preserves import Embedded, Record, Symbol
from syndicate import actor, turn

from substituter.dataspace.index import Frozen, Index, PatternAnalysis, analyse, freeze
from substituter.errors import ProtocolError

__all__ = ["Dataspace"]

log = logging.getLogger("substituter.dataspace")

_OBSERVE_LABEL = Symbol("Observe")


class _TurnDelivery:
    """Tells observers what the index found, as publish / retract / send in the current turn."""

    def assert_captures(self, observer: Any, captures: tuple[Any, ...]) -> Any:
        return turn.publish(observer, captures)

    def retract_captures(self, handle: Any) -> None:
        turn.retract(handle)

    def send_captures(self, observer: Any, captures: tuple[Any, ...]) -> None:
        turn.send(observer, captures)


class Dataspace(actor.Entity):
    """An in-process dataspace. Create it inside a turn: ``ds = turn.ref(Dataspace())``."""

    def __init__(self, name: str = "dataspace") -> None:
        self.name = name
        self._index = Index(_TurnDelivery())
        self._by_handle: dict[Any, Frozen] = {}
        # Observe assertions present, with what their pattern was analysed into.
        self._observers: dict[Frozen, tuple[PatternAnalysis, Any]] = {}

    def __repr__(self) -> str:
        return f"<Dataspace {self.name}>"

    @property
    def index(self) -> Index:
        """The matching index (read it for statistics; do not modify it)."""
        return self._index

    @property
    def assertion_count(self) -> int:
        """Distinct assertions present (Observe assertions included)."""
        return self._index.assertion_count

    @property
    def observer_count(self) -> int:
        return self._index.observer_count

    def on_publish(self, v: Any, handle: Any) -> None:
        try:
            value = freeze(v)
        except ProtocolError:
            log.warning("%r: ignoring assertion that is not a Preserves value: %r", self, v)
            return
        self._by_handle[handle] = value
        if self._index.insert(value):
            observer = self._as_observer(v)
            if observer is not None:
                self._observers[value] = observer
                self._index.add_observer(value, *observer)

    def on_retract(self, handle: Any) -> None:
        value = self._by_handle.pop(handle, None)
        if value is None:
            log.debug("%r: retraction of unknown handle %r", self, handle)
            return
        if self._index.remove(value):
            observer = self._observers.pop(value, None)
            if observer is not None:
                self._index.remove_observer(value, observer[0])

    def on_message(self, v: Any) -> None:
        try:
            value = freeze(v)
        except ProtocolError:
            log.warning("%r: ignoring message that is not a Preserves value: %r", self, v)
            return
        self._index.send(value)

    def _as_observer(self, original: Any) -> tuple[PatternAnalysis, Any] | None:
        """(analysis, observer ref) when the assertion is a well-formed Observe."""
        if (
            type(original) is not Record
            or original.key != _OBSERVE_LABEL
            or len(original.fields) != 2
        ):
            return None
        pattern, observer = original.fields
        if not isinstance(observer, Embedded):
            log.warning("%r: Observe without an embedded observer kept as plain data: %r",
                        self, original)
            return None
        try:
            return analyse(pattern), observer.embeddedValue
        except ProtocolError as exc:
            log.warning("%r: Observe with a bad pattern kept as plain data: %s", self, exc)
            return None
