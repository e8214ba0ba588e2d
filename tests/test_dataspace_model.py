"""The dataspace against a naive reference model, on random operation sequences.

The model is a plain scan: a list of (value, count), each observer's visible captures
recomputed from scratch after every operation with a straightforward matcher, and the
difference turned into assert/retract events. The real ``Dataspace`` runs in a real actor
system, one operation per turn. Every observer (recorder) must see the same multiset of
events in every phase.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import syndicate.patterns as P
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from preserves import Embedded, ImmutableDict, Record, Symbol, canonicalize
from preserves.compare import eq, sorted_items
from syndicate import turn
from syndicate.schema import dataspace as dataspace_schema
from syndicate.schema import dataspacePatterns as patterns_schema

from tests.test_dataspace import Recorder, Script, run_script

RECORDERS = 3

# --------------------------------------------------------------------------- random values

atoms = st.sampled_from(["a", "b", 1, 2, True, 1.0, b"a", Symbol("a")])
values = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.builds(lambda label, fields: Record(label, fields),
                  st.sampled_from([Symbol("x"), Symbol("y")]), st.lists(inner, max_size=3)),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["k", 1, True, Symbol("k")]), inner, max_size=2)
        .map(ImmutableDict),
    ),
    max_leaves=6,
)


@st.composite
def positions(draw: st.DrawFn, length: int) -> list[int]:
    """Indexes for a group pattern, in any order; now and then one past the end."""
    kept = draw(st.lists(st.integers(0, length - 1), unique=True)) if length else []
    if draw(st.integers(0, 9)) == 0:
        kept.append(length)
    return kept


@st.composite
def patterns_like(draw: st.DrawFn, value: Any) -> Any:
    """A pattern that abstracts ``value`` (so it often matches it, or values like it)."""
    def bound(p: Any) -> Any:
        return P.bind(p) if draw(st.booleans()) else p

    choice = draw(st.integers(0, 9))
    if choice == 0:
        return P._
    if choice <= 2:
        return P.CAPTURE
    if isinstance(value, Record):
        kept = draw(positions(len(value.fields)))
        entries = {i: draw(patterns_like(value.fields[i] if i < len(value.fields) else "a"))
                   for i in kept}
        return bound(patterns_schema.Pattern.group(patterns_schema.GroupType.rec(value.key),
                                                   entries))
    if isinstance(value, tuple):
        kept = draw(positions(len(value)))
        entries = {i: draw(patterns_like(value[i] if i < len(value) else "a")) for i in kept}
        return bound(patterns_schema.Pattern.group(patterns_schema.GroupType.arr(), entries))
    if isinstance(value, dict):
        keys = draw(st.lists(st.sampled_from(list(value.keys()) + ["k", 2]), unique=True))
        entries = {k: draw(patterns_like(value.get(k, "a"))) for k in keys}
        return bound(patterns_schema.Pattern.group(patterns_schema.GroupType.dict(), entries))
    return bound(P.lit(value if draw(st.integers(0, 3)) else draw(st.sampled_from(["a", 1, True]))))


# Observers of interest itself: these match the Observe assertions of the others.
META_PATTERNS = [
    P.rec("Observe", P.CAPTURE, P._),
    P.rec("Observe", P._, P.CAPTURE),
]


@dataclass(frozen=True)
class World:
    values: list[Any]
    patterns: list[Any]
    ops: list[tuple[str, int, int]]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    pool = draw(st.lists(values, min_size=1, max_size=5))
    own = [draw(patterns_like(draw(st.sampled_from(pool)))) for _ in range(draw(st.integers(1, 4)))]
    pats = own + draw(st.lists(st.sampled_from(META_PATTERNS), max_size=1))
    op = st.tuples(
        st.sampled_from(["assert"] * 3 + ["observe"] * 2 + ["retract", "unobserve", "message"]),
        st.integers(0, 99),
        st.integers(0, RECORDERS - 1),
    )
    return World(pool, pats, draw(st.lists(op, min_size=4, max_size=30)))


# --------------------------------------------------------------------------- the reference model


class Token:
    """Stands in for a recorder's ref inside the model."""

    def __init__(self, index: int) -> None:
        self.index = index


def naive_match(pattern: Any, value: Any) -> tuple[Any, ...] | None:
    """Match by walking pattern and value together; captures in pre-order."""
    captures: list[Any] = []

    def go(p: Any, v: Any) -> bool:
        if p.VARIANT == patterns_schema.Pattern.discard.VARIANT:
            return True
        if p.VARIANT == patterns_schema.Pattern.bind.VARIANT:
            captures.append(v)
            return go(p.pattern, v)
        if p.VARIANT == patterns_schema.Pattern.lit.VARIANT:
            atom = p.value
            expected = (Embedded(atom.value)
                        if atom.VARIANT == patterns_schema.AnyAtom.embedded.VARIANT
                        else atom.value)
            return eq(expected, v)
        kind = p.type.VARIANT
        if kind == patterns_schema.GroupType.dict.VARIANT:
            if not isinstance(v, dict):
                return False
            for key, sub in sorted_items(p.entries):
                found = [item for k, item in v.items() if eq(k, key)]
                if not found or not go(sub, found[0]):
                    return False
            return True
        if kind == patterns_schema.GroupType.rec.VARIANT:
            if not isinstance(v, Record) or not eq(v.key, p.type.label):
                return False
            items = list(v.fields)
        else:
            if not isinstance(v, (list, tuple)):
                return False
            items = list(v)
        for key, sub in sorted_items(p.entries):
            if type(key) is not int or not 0 <= key < len(items) or not go(sub, items[key]):
                return False
        return True

    return tuple(captures) if go(pattern, value) else None


def canonical(value: Any) -> bytes:
    """Bytes equal exactly when Preserves says the values are equal; refs by recorder index."""
    def encode_ref(obj: Any) -> int:
        return obj.index if isinstance(obj, Token) else obj.entity.index

    return canonicalize(value, encode_embedded=encode_ref)


Event = tuple[str, bytes]


def model_phases(world: World) -> list[list[Counter[Event]]]:
    """Per phase (one per op), per recorder: the events a correct dataspace produces."""
    bag: list[list[Any]] = []  # [value, count], values distinct by Preserves equality
    handles: list[tuple[str, Any]] = []  # ("assert"|"observe", value), None once retracted
    visible: dict[bytes, set[bytes]] = {}  # observer (canonical Observe) -> captures
    phases = []
    for kind, n, r in world.ops:
        events = [Counter[Event]() for _ in range(RECORDERS)]
        target = _apply(world, bag, handles, kind, n, r)
        observers = {canonical(v): v for v, _ in bag if _is_observe(v)}
        if kind == "message" and target is not None:
            for observer in observers.values():
                captures = naive_match(_pattern_of(observer), target)
                if captures is not None:
                    events[observer.fields[1].embeddedValue.index][("!", canonical(captures))] += 1
        for key in set(visible) | set(observers):
            before = visible.pop(key, set())
            after = set()
            if key in observers:
                pattern = _pattern_of(observers[key])
                for v, _ in bag:
                    captures = naive_match(pattern, v)
                    if captures is not None:
                        after.add(canonical(captures))
                visible[key] = after
            owner = (observers.get(key) or _observe_for(world, key)).fields[1].embeddedValue
            for c in after - before:
                events[owner.index][("+", c)] += 1
            for c in before - after:
                events[owner.index][("-", c)] += 1
        phases.append(events)
    return phases


def _apply(world: World, bag: list[list[Any]], handles: list[Any], kind: str, n: int,
           r: int) -> Any:
    """Apply one op to the model bag; return the message for a message op."""
    if kind == "message":
        return world.values[n % len(world.values)]
    if kind in ("assert", "observe"):
        value = _op_value(world, kind, n, r)
        for entry in bag:
            if eq(entry[0], value):
                entry[1] += 1
                break
        else:
            bag.append([value, 1])
        handles.append((kind, value))
        return None
    wanted = "assert" if kind == "retract" else "observe"
    live = [i for i, h in enumerate(handles) if h is not None and h[0] == wanted]
    if live:
        i = live[n % len(live)]
        value = handles[i][1]
        handles[i] = None
        for entry in bag:
            if eq(entry[0], value):
                entry[1] -= 1
                if entry[1] == 0:
                    bag.remove(entry)
                break
    return None


_TOKENS = [Token(i) for i in range(RECORDERS)]


def _op_value(world: World, kind: str, n: int, recorder: int) -> Any:
    if kind == "assert":
        return world.values[n % len(world.values)]
    pattern = world.patterns[n % len(world.patterns)]
    return Record(Symbol("Observe"), [pattern.__preserve__(), Embedded(_TOKENS[recorder])])


def _observe_for(world: World, key: bytes) -> Any:
    """The Observe value behind a canonical key (for an observer that just went away)."""
    for n in range(len(world.patterns)):
        for recorder in range(RECORDERS):
            candidate = _op_value(world, "observe", n, recorder)
            if canonical(candidate) == key:
                return candidate
    raise AssertionError("unknown observer")


def _is_observe(value: Any) -> bool:
    return isinstance(value, Record) and value.key == Symbol("Observe")


def _pattern_of(observe: Any) -> Any:
    return patterns_schema.Pattern.decode(observe.fields[0])


# --------------------------------------------------------------------------- the real thing


def real_phases(world: World) -> list[list[Counter[Event]]]:
    recorders: list[Recorder] = []
    handles: list[tuple[str, Any] | None] = []

    def setup(s: Script) -> None:
        for index in range(RECORDERS):
            recorder = Recorder(s.phase)
            recorder.index = index  # type: ignore[attr-defined]
            recorders.append(recorder)
            s.recorders.append((turn.ref(recorder), recorder))

    def op_phase(kind: str, n: int, r: int) -> Any:
        def run(s: Script) -> None:
            if kind == "message":
                turn.send(s.ds, world.values[n % len(world.values)])
            elif kind == "assert":
                handles.append((kind, s.publish(world.values[n % len(world.values)])))
            elif kind == "observe":
                pattern = world.patterns[n % len(world.patterns)]
                ref = s.recorders[r][0]
                handles.append((kind, s.publish(dataspace_schema.Observe(pattern, ref))))
            else:
                wanted = "assert" if kind == "retract" else "observe"
                live = [i for i, h in enumerate(handles) if h is not None and h[0] == wanted]
                if live:
                    i = live[n % len(live)]
                    turn.retract(handles[i][1])  # type: ignore[index]
                    handles[i] = None
        return run

    run_script(setup, *(op_phase(*op) for op in world.ops))
    return [
        [Counter((kind, canonical(captures)) for kind, captures in rec.phases[phase])
         for rec in recorders]
        for phase in range(1, len(world.ops) + 1)
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_dataspace_agrees_with_the_naive_model(world: World) -> None:
    expected = model_phases(world)
    actual = real_phases(world)
    for phase, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert got == want, f"phase {phase} ({world.ops[phase]}) differs"


def test_model_sees_a_simple_match() -> None:
    """The model itself is right on a hand-checked case (so agreement means something)."""
    world = World([Record(Symbol("x"), ["a", 1])],
                  [P.rec("x", P.CAPTURE, P.lit(1))],
                  [("observe", 0, 0), ("assert", 0, 0), ("message", 0, 1), ("retract", 0, 0)])
    phases = model_phases(world)
    a = canonical(("a",))
    assert [p[0] for p in phases] == [Counter(), Counter({("+", a): 1}),
                                      Counter({("!", a): 1}), Counter({("-", a): 1})]
    assert phases == real_phases(world)
