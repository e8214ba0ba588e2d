"""The dataspace index: which observers does an assertion concern, found without a scan.

Values are first *frozen* (``freeze``): turned into hashable tuples that compare the way
Preserves compares (``#t`` is not ``1``, ``1.0`` is not ``1``, embedded values by identity).
Every observer's pattern is *analysed* (``analyse``) into

- its shape: the groups (record label, sequence, dictionary) it requires and where;
- its constant positions: paths that must hold given literals, and paths that must exist;
- its capture paths, in depth-first pre-order with group entries in Preserves key order.

Shapes form a trie. An assertion walks only the trie branches its own shape allows, and at
each node does one hash lookup per set of constant positions. So ``<want "x" fetch>`` never
meets an observer of ``<available ...>``: they hang off different record-label edges.

Every node remembers the assertions that reached it, so an observer that arrives late is
answered from that cache, not from a scan of everything.

The index does no I/O: it reports to a ``Delivery`` (the dataspace entity turns those calls
into Syndicate publish / retract / send).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Protocol

from preserves import Annotated, Embedded, ImmutableDict, Record, Symbol, preserve
from preserves.compare import sorted_items

from substituter.errors import ProtocolError

__all__ = [
    "Delivery",
    "Index",
    "PatternAnalysis",
    "analyse",
    "freeze",
    "thaw",
]

Frozen = Hashable
"""A frozen Preserves value: hashable, compared by Preserves equality."""

Captures = tuple[Frozen, ...]


# --------------------------------------------------------------------------- frozen values


class _Tag:
    """Marks the kind of a frozen compound; compares by identity."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_RECORD = _Tag("record")  # (_RECORD, label, field0, field1, ...)
_SEQUENCE = _Tag("sequence")  # (_SEQUENCE, item0, item1, ...)
_DICTIONARY = _Tag("dictionary")  # (_DICTIONARY, _FrozenMap)
_SET = _Tag("set")  # (_SET, frozenset)
_BOOL = _Tag("bool")  # (_BOOL, True | False)  -- Python thinks True == 1
_DOUBLE = _Tag("double")  # (_DOUBLE, IEEE bits) -- Preserves equality is bitwise
_EMBEDDED = _Tag("embedded")  # (_EMBEDDED, _Identity)
_SYMBOL = _Tag("symbol")  # (_SYMBOL, name) -- Symbol's own __hash__ is slow Python code

# Where field/item 0 sits inside the frozen tuple.
_RECORD_FIELD_OFFSET = 2
_SEQUENCE_ITEM_OFFSET = 1


class _Identity:
    """Wraps an embedded object so that it hashes and compares by identity."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __repr__(self) -> str:
        return f"#:{self.obj!r}"


class _FrozenMap(dict):  # type: ignore[type-arg]
    """A dictionary of frozen keys to frozen values, hashable because nobody mutates it."""

    __slots__ = ("_hash",)

    def __hash__(self) -> int:  # type: ignore[override]
        try:
            return self._hash
        except AttributeError:
            self._hash: int = hash(frozenset(self.items()))
            return self._hash


def _double_bits(value: float) -> int:
    return int(struct.unpack(">Q", struct.pack(">d", value))[0])


def _bits_double(bits: int) -> float:
    return float(struct.unpack(">d", struct.pack(">Q", bits))[0])


_PLAIN_ATOMS = frozenset({str, int, bytes})  # frozen as themselves


def freeze(value: Any) -> Frozen:
    """Return the hashable twin of a Preserves value (annotations dropped).

    Raises ``ProtocolError`` for something that is not a Preserves value.
    """
    kind = type(value)
    if kind is str or kind is int or kind is bytes:
        return value  # type: ignore[no-any-return]
    if kind is Symbol:
        return (_SYMBOL, value.name)
    if kind is Record:
        key = value.key
        return (
            _RECORD,
            (_SYMBOL, key.name) if type(key) is Symbol else freeze(key),
            *[item if type(item) in _PLAIN_ATOMS else freeze(item) for item in value.fields],
        )
    if kind is tuple or kind is list:
        return (_SEQUENCE, *map(freeze, value))
    if kind is bool:
        return (_BOOL, value)
    if kind is float:
        return (_DOUBLE, _double_bits(value))
    if isinstance(value, dict):
        return (_DICTIONARY, _FrozenMap((freeze(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (_SET, frozenset(map(freeze, value)))
    if kind is Embedded:
        return (_EMBEDDED, _Identity(value.embeddedValue))
    if kind is Annotated:
        return freeze(value.item)
    if hasattr(value, "__preserve__"):
        return freeze(value.__preserve__())
    # Subclasses of the atoms (an IntEnum, a str subclass) are still those atoms.
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, float):
        return (_DOUBLE, _double_bits(value))
    raise ProtocolError(f"not a Preserves value: {value!r} (of type {kind.__name__})")


def thaw(frozen: Frozen) -> Any:
    """Return the ordinary Preserves value for a frozen one (sequences become tuples)."""
    if type(frozen) is not tuple:
        return frozen
    tag = frozen[0]
    if tag is _RECORD:
        return Record(thaw(frozen[1]), [thaw(f) for f in frozen[2:]])
    if tag is _SEQUENCE:
        return tuple(thaw(item) for item in frozen[1:])
    if tag is _SYMBOL:
        return Symbol(frozen[1])
    if tag is _BOOL:
        return frozen[1]
    if tag is _DOUBLE:
        return _bits_double(frozen[1])
    if tag is _DICTIONARY:
        return ImmutableDict((thaw(k), thaw(v)) for k, v in frozen[1].items())
    if tag is _SET:
        return frozenset(thaw(item) for item in frozen[1])
    if tag is _EMBEDDED:
        return Embedded(frozen[1].obj)
    raise AssertionError(f"unknown frozen form {frozen!r}")


# --------------------------------------------------------------------------- paths and shapes

# A path step is an int (an offset into a frozen record/sequence tuple), a _DictKey, or
# _NOWHERE (a record/sequence pattern keyed by something that is not an index: never exists).


class _DictKey:
    __slots__ = ("key",)

    def __init__(self, key: Frozen) -> None:
        self.key = key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DictKey) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"[{self.key!r}]"


_NOWHERE = _Tag("nowhere")

Step = int | _DictKey | _Tag
Path = tuple[Step, ...]
Guard = Hashable  # (_RECORD, label) | _SEQUENCE | _DICTIONARY


def _project(value: Frozen, path: Path) -> Frozen | None:
    """The sub-value at ``path``, or None when it does not exist.

    Callers only use a path once the trie has checked the kind of every group along it.
    """
    for step in path:
        if type(step) is int:
            if step >= len(value):  # type: ignore[arg-type]
                return None
            value = value[step]  # type: ignore[index]
        elif step is _NOWHERE:
            return None
        else:
            found = value[1].get(step.key)  # type: ignore[index, union-attr]
            if found is None:
                return None
            value = found
    return value


def _project_all(value: Frozen, paths: tuple[Path, ...]) -> tuple[Frozen, ...] | None:
    projected = []
    for path in paths:
        sub = _project(value, path)
        if sub is None:
            return None
        projected.append(sub)
    return tuple(projected)


Projector = Callable[[Frozen], "tuple[Frozen, ...] | None"]


def _compile_projection(const_paths: tuple[Path, ...], exist_paths: tuple[Path, ...] = ()) -> Projector:
    """A function giving what ``_project_all(value, const_paths)`` gives when every one of
    ``exist_paths`` exists too, else None, for values of the trie node the paths belong to.

    The usual case (every path one field/item deep) becomes one length check and one
    ``itemgetter``; anything else goes through ``_project``.
    """
    simple = [_one_index(path) for path in const_paths + exist_paths]
    if simple and None not in simple:
        # The node's shape guarantees the value is a record/sequence tuple; only its length
        # (arity) is still unchecked.
        need = max(index for index in simple if index is not None)
        indices = simple[: len(const_paths)]
        if not indices:
            empty: tuple[Frozen, ...] = ()
            return lambda value: empty if len(value) > need else None  # type: ignore[arg-type]
        if len(indices) == 1:
            (index,) = indices
            return lambda value: (value[index],) if len(value) > need else None  # type: ignore[arg-type, index]
        getter = itemgetter(*indices)
        return lambda value: getter(value) if len(value) > need else None  # type: ignore[arg-type]
    if not exist_paths:
        return lambda value: _project_all(value, const_paths)
    return lambda value: _constants_at(value, (const_paths, exist_paths))


def _one_index(path: Path) -> int | None:
    """The offset when ``path`` is one record field / sequence item deep, else None."""
    if len(path) == 1 and isinstance(path[0], int):
        return path[0]
    return None


def _guard_of(value: Frozen) -> Guard | None:
    """The group kind of a frozen value, as the trie keys it; None for atoms."""
    if type(value) is not tuple:
        return None
    tag = value[0]
    if tag is _RECORD:
        return (_RECORD, value[1])
    if tag is _SEQUENCE or tag is _DICTIONARY:
        return tag
    return None


# --------------------------------------------------------------------------- pattern analysis


@dataclass(frozen=True)
class PatternAnalysis:
    """A dataspace pattern taken apart for the index (all paths into frozen values)."""

    shape: tuple[tuple[Path, Guard], ...]
    """Required groups in depth-first pre-order: the route through the trie."""
    positions: tuple[tuple[Path, ...], tuple[Path, ...]]
    """(paths that must equal a literal, paths that must merely exist)."""
    const_values: tuple[Frozen, ...]
    capture_paths: tuple[Path, ...]


_DISCARD = Symbol("_")
_BIND = Symbol("bind")
_LIT = Symbol("lit")
_GROUP = Symbol("group")
_REC = Symbol("rec")
_ARR = Symbol("arr")
_DICT = Symbol("dict")


def analyse(pattern: Any) -> PatternAnalysis:
    """Analyse a dataspace pattern (``dataspacePatterns.Pattern``, or its Preserves value).

    Walks the value directly (schema decoding is far slower). Raises ``ProtocolError``
    naming the part that is not a dataspace pattern.
    """
    shape: list[tuple[Path, Guard]] = []
    const_paths: list[Path] = []
    const_values: list[Frozen] = []
    exist_paths: list[Path] = []
    capture_paths: list[Path] = []

    def walk(p: Any, path: Path) -> None:
        p = _strip(p)
        if type(p) is not Record:
            raise ProtocolError(f"not a dataspace pattern: {p!r}")
        label, fields = p.key, p.fields
        if label == _DISCARD and not fields:
            exist_paths.append(path)
        elif label == _BIND and len(fields) == 1:
            capture_paths.append(path)
            walk(fields[0], path)
        elif label == _LIT and len(fields) == 1:
            const_paths.append(path)
            const_values.append(_freeze_atom(fields[0]))
        elif label == _GROUP and len(fields) == 2 and isinstance(_strip(fields[1]), dict):
            guard, offset = _group_guard(_strip(fields[0]))
            shape.append((path, guard))
            for key, member in sorted_items(_strip(fields[1])):
                walk(member, path + (_step_for(key, offset),))
        else:
            raise ProtocolError(f"not a dataspace pattern: {p!r}")

    walk(preserve(pattern), ())
    return PatternAnalysis(
        shape=tuple(shape),
        positions=(tuple(const_paths), tuple(exist_paths)),
        const_values=tuple(const_values),
        capture_paths=tuple(capture_paths),
    )


def _strip(value: Any) -> Any:
    return value.item if type(value) is Annotated else value


def _group_guard(group_type: Any) -> tuple[Guard, int]:
    """The trie guard of a group type, and the offset of its first member in a frozen tuple
    (-1: members are found by dictionary key)."""
    if type(group_type) is Record:
        if group_type.key == _REC and len(group_type.fields) == 1:
            return (_RECORD, freeze(group_type.fields[0])), _RECORD_FIELD_OFFSET
        if group_type.key == _ARR and not group_type.fields:
            return _SEQUENCE, _SEQUENCE_ITEM_OFFSET
        if group_type.key == _DICT and not group_type.fields:
            return _DICTIONARY, -1
    raise ProtocolError(f"not a dataspace pattern group type: {group_type!r}")


def _freeze_atom(atom: Any) -> Frozen:
    frozen = freeze(atom)
    if _guard_of(frozen) is not None or (type(frozen) is tuple and frozen[0] is _SET):
        raise ProtocolError(f"a <lit> pattern holds an atom, not {atom!r}")
    return frozen


def _step_for(key: Any, offset: int) -> Step:
    if offset < 0:
        return _DictKey(freeze(key))
    if type(key) is int and key >= 0:
        return key + offset
    return _NOWHERE


# --------------------------------------------------------------------------- the index


class Delivery(Protocol):
    """Where the index sends what observers must learn (captures are Python tuples)."""

    def assert_captures(self, observer: Any, captures: tuple[Any, ...]) -> Any:
        """Assert ``captures`` to ``observer``; return a handle for ``retract_captures``."""

    def retract_captures(self, handle: Any) -> None: ...

    def send_captures(self, observer: Any, captures: tuple[Any, ...]) -> None: ...


@dataclass(eq=False)
class _Subscription:
    """One Observe assertion registered at an endpoint set."""

    observer: Any
    handles: dict[Captures, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _Endpoints:
    """Observers sharing one capture-path list at one leaf, and the captures they see."""

    capture_counts: dict[Captures, int]
    captures_of: Projector
    subscriptions: dict[Frozen, _Subscription] = field(default_factory=dict)


@dataclass(eq=False)
class _Leaf:
    """Assertions with one combination of constant values, and the observers of it."""

    cached: set[Frozen] = field(default_factory=set)
    endpoints: dict[tuple[Path, ...], _Endpoints] = field(default_factory=dict)


@dataclass(eq=False)
class _LeafTable:
    """For one set of constant positions: leaves by constant values."""

    leaves: dict[tuple[Frozen, ...], _Leaf]
    constants_of: Projector
    observer_count: int = 0


@dataclass(eq=False)
class _Node:
    """A trie node: assertions whose shape reaches here, and observers of this shape."""

    cached: set[Frozen] = field(default_factory=set)
    tables: dict[tuple[tuple[Path, ...], tuple[Path, ...]], _LeafTable] = field(
        default_factory=dict
    )
    edges: dict[Path, dict[Guard, _Node]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.tables and not self.edges


def _constants_at(
    value: Frozen, positions: tuple[tuple[Path, ...], tuple[Path, ...]]
) -> tuple[Frozen, ...] | None:
    """The values at the constant positions, or None when a required position is missing."""
    const_paths, exist_paths = positions
    for path in exist_paths:
        if _project(value, path) is None:
            return None
    return _project_all(value, const_paths)


class Index:
    """A bag of frozen assertions and the observers of them (see the module docstring)."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self._counts: dict[Frozen, int] = {}
        self._root = _Node()
        self._observer_count = 0

    @property
    def assertion_count(self) -> int:
        """Distinct assertions present."""
        return len(self._counts)

    @property
    def observer_count(self) -> int:
        return self._observer_count

    def __contains__(self, value: Frozen) -> bool:
        return value in self._counts

    # -- assertions and messages

    def insert(self, value: Frozen) -> bool:
        """Add one copy of ``value``; True when it is new (the only case with effects)."""
        counts = self._counts
        count = counts.get(value, 0)
        counts[value] = count + 1
        if count:
            return False
        for node in self._nodes_reached(value):
            node.cached.add(value)
            for table in node.tables.values():
                constants = table.constants_of(value)
                if constants is None:
                    continue
                leaf = table.leaves.get(constants)
                if leaf is None:
                    leaf = table.leaves[constants] = _Leaf()
                leaf.cached.add(value)
                for endpoints in leaf.endpoints.values():
                    captures = endpoints.captures_of(value)
                    if captures is not None:
                        self._add_captures(endpoints, captures)
        return True

    def remove(self, value: Frozen) -> bool:
        """Remove one copy of ``value``; True when it was the last (the only case with effects).

        Raises ``KeyError`` when ``value`` is not present.
        """
        counts = self._counts
        count = counts[value]
        if count > 1:
            counts[value] = count - 1
            return False
        del counts[value]
        for node in self._nodes_reached(value):
            node.cached.discard(value)
            for table in node.tables.values():
                constants = table.constants_of(value)
                if constants is None:
                    continue
                leaf = table.leaves.get(constants)
                if leaf is None:
                    continue
                leaf.cached.discard(value)
                for endpoints in leaf.endpoints.values():
                    captures = endpoints.captures_of(value)
                    if captures is not None:
                        self._remove_captures(endpoints, captures)
                if not leaf.cached and not leaf.endpoints:
                    del table.leaves[constants]
        return True

    def send(self, value: Frozen) -> None:
        """Deliver a message to every observer whose pattern matches (no deduplication)."""
        for node in self._nodes_reached(value):
            for table in node.tables.values():
                constants = table.constants_of(value)
                if constants is None:
                    continue
                leaf = table.leaves.get(constants)
                if leaf is None:
                    continue
                for endpoints in leaf.endpoints.values():
                    captures = endpoints.captures_of(value)
                    if captures is None:
                        continue
                    thawed = tuple(map(thaw, captures))
                    for subscription in endpoints.subscriptions.values():
                        self._delivery.send_captures(subscription.observer, thawed)

    def observers_examined(self, value: Frozen) -> int:
        """How many observers an assertion of ``value`` would be checked against: those
        whose shape and constants it meets. (Observers of other shapes are never looked at.)"""
        examined = 0
        for node in self._nodes_reached(value):
            for table in node.tables.values():
                constants = table.constants_of(value)
                leaf = None if constants is None else table.leaves.get(constants)
                if leaf is not None:
                    examined += sum(len(e.subscriptions) for e in leaf.endpoints.values())
        return examined

    def _nodes_reached(self, value: Frozen) -> list[_Node]:
        """The trie nodes whose shape ``value`` has (depth first, root first)."""
        reached = []
        pending = [self._root]
        while pending:
            node = pending.pop()
            reached.append(node)
            if not node.edges:
                continue
            for path, by_guard in node.edges.items():
                sub = _project(value, path) if path else value
                if sub is None or type(sub) is not tuple:
                    continue
                tag = sub[0]
                if tag is _RECORD:
                    child = by_guard.get((_RECORD, sub[1]))
                elif tag is _SEQUENCE or tag is _DICTIONARY:
                    child = by_guard.get(tag)
                else:
                    continue
                if child is not None:
                    pending.append(child)
        return reached

    def _add_captures(self, endpoints: _Endpoints, captures: Captures) -> None:
        count = endpoints.capture_counts.get(captures, 0)
        endpoints.capture_counts[captures] = count + 1
        if count == 0 and endpoints.subscriptions:
            thawed = tuple(map(thaw, captures))
            for subscription in endpoints.subscriptions.values():
                subscription.handles[captures] = self._delivery.assert_captures(
                    subscription.observer, thawed
                )

    def _remove_captures(self, endpoints: _Endpoints, captures: Captures) -> None:
        count = endpoints.capture_counts[captures]
        if count > 1:
            endpoints.capture_counts[captures] = count - 1
            return
        del endpoints.capture_counts[captures]
        for subscription in endpoints.subscriptions.values():
            handle = subscription.handles.pop(captures, None)
            if handle is not None:
                self._delivery.retract_captures(handle)

    # -- observers

    def add_observer(self, key: Frozen, analysis: PatternAnalysis, observer: Any) -> None:
        """Register ``observer`` under ``key`` (its frozen Observe assertion) and tell it,
        at once, every capture tuple the current assertions give."""
        node = self._root
        for path, guard in analysis.shape:
            node = self._child(node, path, guard)
        table = node.tables.get(analysis.positions)
        if table is None:
            table = node.tables[analysis.positions] = _LeafTable(
                self._leaves_from(node.cached, analysis.positions),
                _compile_projection(*analysis.positions),
            )
        table.observer_count += 1
        leaf = table.leaves.get(analysis.const_values)
        if leaf is None:
            leaf = table.leaves[analysis.const_values] = _Leaf()
        endpoints = leaf.endpoints.get(analysis.capture_paths)
        if endpoints is None:
            endpoints = leaf.endpoints[analysis.capture_paths] = _Endpoints(
                _count_captures(leaf.cached, analysis.capture_paths),
                _compile_projection(analysis.capture_paths),
            )
        subscription = endpoints.subscriptions[key] = _Subscription(observer)
        for captures in endpoints.capture_counts:
            subscription.handles[captures] = self._delivery.assert_captures(
                observer, tuple(map(thaw, captures))
            )
        self._observer_count += 1

    def remove_observer(self, key: Frozen, analysis: PatternAnalysis) -> None:
        """Unregister the observer added under ``key``, retracting all it was told."""
        route: list[tuple[_Node, Path, Guard]] = []
        node = self._root
        for path, guard in analysis.shape:
            child = node.edges.get(path, {}).get(guard)
            if child is None:
                return
            route.append((node, path, guard))
            node = child
        table = node.tables.get(analysis.positions)
        leaf = table.leaves.get(analysis.const_values) if table else None
        endpoints = leaf.endpoints.get(analysis.capture_paths) if leaf else None
        subscription = endpoints.subscriptions.pop(key, None) if endpoints else None
        if subscription is None:
            return
        assert table is not None and leaf is not None and endpoints is not None
        self._observer_count -= 1
        for handle in subscription.handles.values():
            self._delivery.retract_captures(handle)
        if not endpoints.subscriptions:
            del leaf.endpoints[analysis.capture_paths]
            if not leaf.cached and not leaf.endpoints:
                del table.leaves[analysis.const_values]
        table.observer_count -= 1
        if table.observer_count == 0:
            del node.tables[analysis.positions]
        self._prune(node, route)

    def _child(self, node: _Node, path: Path, guard: Guard) -> _Node:
        by_guard = node.edges.get(path)
        if by_guard is None:
            by_guard = node.edges[path] = {}
        child = by_guard.get(guard)
        if child is None:
            child = by_guard[guard] = _Node(
                {v for v in node.cached if _guard_at(v, path) == guard}
            )
        return child

    @staticmethod
    def _prune(node: _Node, route: list[tuple[_Node, Path, Guard]]) -> None:
        """Drop trie nodes that no observer needs any more, bottom up."""
        for parent, path, guard in reversed(route):
            if not node.is_empty():
                return
            by_guard = parent.edges[path]
            del by_guard[guard]
            if not by_guard:
                del parent.edges[path]
            node = parent

    @staticmethod
    def _leaves_from(
        assertions: Iterable[Frozen], positions: tuple[tuple[Path, ...], tuple[Path, ...]]
    ) -> dict[tuple[Frozen, ...], _Leaf]:
        leaves: dict[tuple[Frozen, ...], _Leaf] = {}
        for value in assertions:
            constants = _constants_at(value, positions)
            if constants is not None:
                leaves.setdefault(constants, _Leaf()).cached.add(value)
        return leaves


def _guard_at(value: Frozen, path: Path) -> Guard | None:
    sub = _project(value, path)
    return None if sub is None else _guard_of(sub)


def _count_captures(
    assertions: Iterable[Frozen], capture_paths: tuple[Path, ...]
) -> dict[Captures, int]:
    counts: dict[Captures, int] = {}
    for value in assertions:
        captures = _project_all(value, capture_paths)
        if captures is not None:
            counts[captures] = counts.get(captures, 0) + 1
    return counts
