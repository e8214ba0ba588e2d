"""The embedded dataspace, driven through real syndicate-py actors, turns and helpers.

Most tests run a *script*: phases of actions, each in its own turn, with the dataspace and
every recorder synced between phases, so each recorder's events are grouped by phase.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import syndicate.patterns as P
from preserves import Annotated, Embedded, ImmutableDict, Record, Symbol
from syndicate import actor, turn
from syndicate import dataspace as syndicate_dataspace
from syndicate.schema import dataspace as dataspace_schema
from syndicate.schema import dataspacePatterns as patterns_schema

from substituter.dataspace import Dataspace
from substituter.dataspace.index import Index, analyse, freeze, thaw
from substituter.errors import ProtocolError

HANG_GUARD_SECONDS = 10.0  # only stops a broken test from hanging; never asserts on time


def rec(label: str, *fields: Any) -> Record:
    return Record(Symbol(label), fields)


_tracked: list[actor.Actor] = []


def track_actor() -> None:
    """Call inside an actor's boot: ``run_actors`` then fails if that actor crashes."""
    _tracked.append(turn.active_facet().actor)


def run_actors(boot: Callable[[], None]) -> None:
    """Run a fresh actor system until its non-daemon actors stop.

    Fails when the system hangs or a tracked actor (the boot actor always is) crashed.
    """
    loop = asyncio.new_event_loop()
    system = actor.System(loop=loop)
    _tracked.clear()
    hung: list[bool] = []

    def guard() -> None:
        hung.append(True)
        system.exit_signal.put_nowait(())

    loop.call_later(HANG_GUARD_SECONDS, guard)

    def tracked_boot() -> None:
        track_actor()
        boot()

    system.run(tracked_boot, configure_logging=False)
    assert not hung, "the actor system never finished (a phase did not settle)"
    # None: a daemon actor still running when the system ended; True: stopped cleanly.
    crashed = [(a, a.exit_reason) for a in _tracked if a.exit_reason not in (None, True)]
    assert not crashed, f"actors crashed: {crashed}"


class Recorder(actor.Entity):
    """Records what an observer is told, phase by phase: ('+'|'-'|'!', captures)."""

    def __init__(self, phase: int) -> None:
        self.phases: list[list[tuple[str, Any]]] = [[] for _ in range(phase + 1)]
        self._live: dict[Any, Any] = {}

    def on_publish(self, v: Any, handle: Any) -> None:
        self._live[handle] = v
        self.phases[-1].append(("+", v))

    def on_retract(self, handle: Any) -> None:
        self.phases[-1].append(("-", self._live.pop(handle)))

    def on_message(self, v: Any) -> None:
        self.phases[-1].append(("!", v))

    def in_phase(self, phase: int) -> Counter[tuple[str, Any]]:
        return Counter(self.phases[phase])

    @property
    def visible(self) -> Counter[Any]:
        """Captures currently asserted to this observer (a multiset: must be all 1s)."""
        return Counter(self._live.values())

    @property
    def all_events(self) -> Counter[tuple[str, Any]]:
        return Counter(event for phase in self.phases for event in phase)


@dataclass
class Script:
    """What a phase can use: the dataspace ref and helpers acting in the current turn."""

    ds: Any = None
    phase: int = 0
    recorders: list[tuple[Any, Recorder]] = field(default_factory=list)
    names: dict[str, Any] = field(default_factory=dict)

    def observe(self, pattern: Any) -> Recorder:
        recorder = Recorder(self.phase)
        ref = turn.ref(recorder)
        self.recorders.append((ref, recorder))
        self.names[f"observe{len(self.recorders)}"] = turn.publish(
            self.ds, dataspace_schema.Observe(pattern, ref)
        )
        return recorder

    def publish(self, value: Any) -> Any:
        return turn.publish(self.ds, value)


Phase = Callable[[Script], Any]


def run_script(*phases: Phase, dataspace_actor: bool = False) -> Script:
    """Run ``phases`` one turn each, syncing everything between them.

    With ``dataspace_actor`` the dataspace lives in an actor of its own.
    """
    script = Script()

    def begin(index: int) -> None:
        script.phase = index
        for _ref, recorder in script.recorders:
            while len(recorder.phases) <= index:
                recorder.phases.append([])
        if index == len(phases):
            turn.stop_actor()
            return
        phases[index](script)
        settle([script.ds] + [ref for ref, _ in script.recorders], lambda: begin(index + 1))

    class Receiver(actor.Entity):
        def on_message(self, v: Any) -> None:
            script.ds = v.embeddedValue
            begin(0)

    def dataspace_boot(receiver: Any) -> None:
        track_actor()
        turn.prevent_inert_check()  # a ref alone does not keep an actor alive
        turn.send(receiver, Embedded(turn.ref(Dataspace())))

    def boot() -> None:
        turn.prevent_inert_check()  # alive until the last phase stops the actor
        if dataspace_actor:
            receiver = turn.ref(Receiver())
            turn.spawn(lambda: dataspace_boot(receiver), name="dataspace", daemon=True)
        else:
            script.ds = turn.ref(Dataspace())
            begin(0)

    run_actors(boot)
    return script


def settle(refs: list[Any], then: Callable[[], None]) -> None:
    """Sync with each ref in turn, then call ``then`` (everything sent before has landed)."""
    if not refs:
        then()
        return
    turn.sync(refs[0], lambda: settle(refs[1:], then))


# --------------------------------------------------------------------------- the semantic table


@dataclass(frozen=True)
class Case:
    name: str
    pattern: Any
    assertions: tuple[Any, ...]
    expected: frozenset[tuple[Any, ...]]


WANT = P.rec("want", P.CAPTURE, P._)

CASES = [
    Case("discard matches anything, captures nothing", P._,
         (rec("want", "a"), "x"), frozenset({()})),
    Case("bind at the root captures the whole assertion", P.CAPTURE,
         (rec("want", "a"), 7), frozenset({(rec("want", "a"),), (7,)})),
    Case("record by label; extra fields ignored; missing field does not match", WANT,
         (rec("want", "a", Symbol("fetch")), rec("want", "d", Symbol("fetch"), "extra"),
          rec("want", "short"), rec("available", "a", Symbol("fetch")), ["want", "a", 1]),
         frozenset({("a",), ("d",)})),
    Case("literal symbol", P.rec("want", P.CAPTURE, P.lit(Symbol("fetch"))),
         (rec("want", "a", Symbol("fetch")), rec("want", "b", Symbol("query")),
          rec("want", "c", "fetch")),
         frozenset({("a",)})),
    Case("literal #t is not 1 and not 1.0", P.rec("n", P.CAPTURE, P.lit(True)),
         (rec("n", "bool", True), rec("n", "int", 1), rec("n", "double", 1.0)),
         frozenset({("bool",)})),
    Case("literal 1 is not #t and not 1.0", P.rec("n", P.CAPTURE, P.lit(1)),
         (rec("n", "bool", True), rec("n", "int", 1), rec("n", "double", 1.0)),
         frozenset({("int",)})),
    Case("literal double, bytes", P.rec("n", P.lit(1.5), P.lit(b"\x00"), P.CAPTURE),
         (rec("n", 1.5, b"\x00", "yes"), rec("n", 1.5, "\x00", "str"), rec("n", 2.5, b"\x00", "no")),
         frozenset({("yes",)})),
    Case("sequence: positions must exist, more may follow", P.arr(P.CAPTURE, P._),
         ((1, 2), [3], (4, 5, 6), "x", rec("r", 7, 8)),
         frozenset({(1,), (4,)})),
    Case("empty sequence group matches any sequence", P.arr(),
         ((), (1, 2), "x"), frozenset({()})),
    Case("dictionary: captures in Preserves key order, extra keys ignored",
         P.dict((Symbol("a"), P.CAPTURE), ("b", P.CAPTURE), (1, P.CAPTURE)),
         (ImmutableDict({Symbol("a"): "sym", "b": "str", 1: "int", "z": 0}),
          ImmutableDict({"b": "str", 1: "int"})),
         frozenset({("int", "str", "sym")})),
    Case("dictionary keys compare the Preserves way (#t is not 1)",
         P.dict((True, P.CAPTURE)),
         (ImmutableDict({1: "int"}), ImmutableDict({True: "bool"})),
         frozenset({("bool",)})),
    Case("nested bind: depth-first pre-order",
         P.bind(P.rec("pair", P.CAPTURE, P.rec("inner", P.CAPTURE))),
         (rec("pair", 1, rec("inner", 2)), rec("pair", 1, rec("other", 2))),
         frozenset({(rec("pair", 1, rec("inner", 2)), 1, 2)})),
    Case("captured compound values come back as Preserves values",
         P.rec("box", P.CAPTURE),
         (rec("box", [1, [2]]), rec("box", {"k": (True, 2.5)})),
         frozenset({(((1, (2,))),), (ImmutableDict({"k": (True, 2.5)}),)})),
    Case("records with equal fields dedupe whatever the Python sequence type",
         P.rec("box", P.CAPTURE),
         (rec("box", [1, 2]), rec("box", (1, 2))),
         frozenset({((1, 2),)})),
    Case("record group with a non-index key never matches",
         patterns_schema.Pattern.group(patterns_schema.GroupType.rec(Symbol("want")), {"x": P._}),
         (rec("want", "a"),), frozenset()),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("order", ["observer first", "observer late"])
def test_semantic_table(case: Case, order: str) -> None:
    recorders: list[Recorder] = []

    def observe(s: Script) -> None:
        recorders.append(s.observe(case.pattern))

    def assert_all(s: Script) -> None:
        for value in case.assertions:
            s.publish(value)

    phases = (observe, assert_all) if order == "observer first" else (assert_all, observe)
    run_script(*phases)
    (recorder,) = recorders
    # A pattern that matches anything also matches the observer's own Observe assertion.
    seen = {c for c in recorder.visible if not _mentions_observe(c)}
    assert seen == case.expected
    assert all(count == 1 for count in recorder.visible.values())
    assert all(kind == "+" for kind, _ in recorder.all_events), "nothing retracted or sent"


def _mentions_observe(captures: tuple[Any, ...]) -> bool:
    return any(isinstance(c, Record) and c.key == Symbol("Observe") for c in captures)


def test_assertions_arrive_as_tuples_that_during_unpacks() -> None:
    seen: list[tuple[Any, Any]] = []

    def observe(s: Script) -> None:
        @syndicate_dataspace.during(s.ds, P.rec("available", P.CAPTURE, P.CAPTURE, P._))
        def _(hash_part: Any, fetcher: Any) -> None:
            seen.append((hash_part, fetcher))

    run_script(observe, lambda s: s.publish(rec("available", "h1", "cache", 3)))
    assert seen == [("h1", "cache")]


def test_embedded_values_compare_by_identity() -> None:
    recorders: list[Recorder] = []
    refs: list[Any] = []

    def phase(s: Script) -> None:
        first, second = turn.ref(actor.Entity()), turn.ref(actor.Entity())
        refs.extend([first, second])
        recorders.append(s.observe(P.rec("owner", P.lit(Embedded(first)), P.CAPTURE)))
        s.publish(rec("owner", Embedded(first), "mine"))
        s.publish(rec("owner", Embedded(second), "theirs"))
        recorders.append(s.observe(P.rec("owner", P.CAPTURE, P._)))

    run_script(phase)
    mine, everyone = recorders
    assert set(mine.visible) == {("mine",)}
    assert set(everyone.visible) == {(Embedded(refs[0]),), (Embedded(refs[1]),)}


# --------------------------------------------------------------------------- bag semantics


def test_equal_assertions_from_two_handles_count_once() -> None:
    handles: list[Any] = []
    recorders: list[Recorder] = []
    value = rec("want", "h", Symbol("fetch"))
    run_script(
        lambda s: recorders.append(s.observe(WANT)),
        lambda s: handles.extend([s.publish(value), s.publish(value)]),
        lambda s: turn.retract(handles[0]),
        lambda s: turn.retract(handles[1]),
        lambda s: handles.append(s.publish(value)),
    )
    (r,) = recorders
    assert r.in_phase(1) == Counter({("+", ("h",)): 1})
    assert r.in_phase(2) == Counter(), "one copy is still asserted"
    assert r.in_phase(3) == Counter({("-", ("h",)): 1})
    assert r.in_phase(4) == Counter({("+", ("h",)): 1}), "reasserting after the last retract"


def test_equal_captures_from_different_assertions_count_once() -> None:
    handles: list[Any] = []
    recorders: list[Recorder] = []
    run_script(
        lambda s: recorders.append(s.observe(WANT)),
        lambda s: handles.extend([s.publish(rec("want", "h", Symbol("fetch"))),
                                  s.publish(rec("want", "h", Symbol("query")))]),
        lambda s: turn.retract(handles[1]),
        lambda s: turn.retract(handles[0]),
    )
    (r,) = recorders
    assert r.in_phase(1) == Counter({("+", ("h",)): 1})
    assert r.in_phase(2) == Counter()
    assert r.in_phase(3) == Counter({("-", ("h",)): 1})


def test_retracting_the_observe_retracts_everything_it_was_told() -> None:
    recorders: list[Recorder] = []
    run_script(
        lambda s: [s.publish(rec("want", h, Symbol("fetch"))) for h in ("a", "b")],
        lambda s: recorders.append(s.observe(WANT)),
        lambda s: turn.retract(s.names["observe1"]),
        lambda s: s.publish(rec("want", "c", Symbol("fetch"))),
    )
    (r,) = recorders
    assert r.in_phase(1) == Counter({("+", ("a",)): 1, ("+", ("b",)): 1})
    assert r.in_phase(2) == Counter({("-", ("a",)): 1, ("-", ("b",)): 1})
    assert r.in_phase(3) == Counter(), "a retracted observer hears nothing more"


def test_during_facets_stop_when_the_match_goes_and_when_the_observer_goes() -> None:
    log: list[str] = []
    holder: dict[str, Any] = {}

    def observe(s: Script) -> None:
        @turn.facet
        def observer_facet() -> None:
            @syndicate_dataspace.during(s.ds, WANT)
            def _(h: str) -> Callable[[], None]:
                log.append(f"+{h}")
                return lambda: log.append(f"-{h}")

        holder["facet"] = observer_facet

    run_script(
        observe,
        lambda s: holder.update(a=s.publish(rec("want", "a", 1)), b=s.publish(rec("want", "b", 1))),
        lambda s: turn.retract(holder["a"]),
        lambda s: turn.stop(holder["facet"]),
    )
    assert log[:2] in (["+a", "+b"], ["+b", "+a"])
    assert log[2:] == ["-a", "-b"]


# --------------------------------------------------------------------------- interest is data


def test_observers_of_observe_see_interest_come_and_go() -> None:
    recorders: list[Recorder] = []
    interest = P.rec("want", P.CAPTURE, P._)
    script = run_script(
        lambda s: recorders.append(s.observe(P.rec("Observe", P.quote(interest), P.CAPTURE))),
        lambda s: recorders.append(s.observe(interest)),
        lambda s: turn.retract(s.names["observe2"]),
    )
    meta = recorders[0]
    want_observer_ref = script.recorders[1][0]
    assert meta.in_phase(0) == Counter(), "no interest in want yet"
    assert meta.in_phase(1) == Counter({("+", (Embedded(want_observer_ref),)): 1})
    assert meta.in_phase(2) == Counter({("-", (Embedded(want_observer_ref),)): 1})


def test_an_observer_of_all_observes_sees_itself() -> None:
    recorders: list[Recorder] = []
    run_script(lambda s: recorders.append(s.observe(P.rec("Observe", P._, P.CAPTURE))))
    (r,) = recorders
    ((captured,),) = r.visible
    assert isinstance(captured, Embedded) and captured.embeddedValue.entity is r


# --------------------------------------------------------------------------- messages


def test_messages_are_routed_by_pattern_and_not_deduplicated() -> None:
    recorders: list[Recorder] = []
    run_script(
        lambda s: recorders.extend([s.observe(P.rec("ping", P.CAPTURE)),
                                    s.observe(P.rec("pong", P.CAPTURE))]),
        lambda s: [turn.send(s.ds, rec("ping", 1)) for _ in range(2)],
        lambda s: recorders.append(s.observe(P.rec("ping", P.CAPTURE))),
    )
    ping, pong, late = recorders
    assert ping.all_events == Counter({("!", (1,)): 2})
    assert pong.all_events == Counter()
    assert late.all_events == Counter(), "a message leaves nothing behind for late observers"


def test_on_message_helper_receives_unpacked_captures() -> None:
    got: list[tuple[Any, Any]] = []

    def observe(s: Script) -> None:
        @syndicate_dataspace.on_message(s.ds, P.rec("progress", P.CAPTURE, P.CAPTURE))
        def _(h: str, n: int) -> None:
            got.append((h, n))

    run_script(observe, lambda s: turn.send(s.ds, rec("progress", "h", 10)))
    assert got == [("h", 10)]


# --------------------------------------------------------------------------- across actors


@pytest.mark.parametrize("dataspace_actor", [False, True], ids=["shared", "own actor"])
def test_bag_semantics_hold_with_the_dataspace_in_its_own_actor(dataspace_actor: bool) -> None:
    recorders: list[Recorder] = []
    handles: list[Any] = []
    run_script(
        lambda s: recorders.append(s.observe(WANT)),
        lambda s: handles.append(s.publish(rec("want", "h", Symbol("fetch")))),
        lambda s: turn.retract(handles[0]),
        dataspace_actor=dataspace_actor,
    )
    (r,) = recorders
    assert [r.in_phase(i) for i in range(3)] == [
        Counter(), Counter({("+", ("h",)): 1}), Counter({("-", ("h",)): 1})]


def test_publishers_observers_and_dataspace_in_separate_actors() -> None:
    """A requester asserts want; a fetcher in another actor answers with available."""
    events: list[str] = []

    class Coordinator(actor.Entity):
        def on_message(self, v: Any) -> None:
            if v == "done":
                turn.stop_actor()
                return
            ds, me = v.embeddedValue, turn.ref(self)

            def fetcher() -> None:
                track_actor()

                @syndicate_dataspace.during(ds, P.rec("want", P.CAPTURE, P._))
                def _(h: str) -> None:
                    turn.publish(ds, rec("available", h, "fetcher"))

            def requester() -> None:
                track_actor()
                turn.publish(ds, rec("want", "h1", Symbol("fetch")))

                @syndicate_dataspace.during(ds, P.rec("available", P.CAPTURE, P.CAPTURE))
                def _(h: str, who: str) -> None:
                    events.append(f"{h} from {who}")
                    turn.send(me, "done")
                    turn.stop_actor()  # its want (and so the fetcher's answer) goes with it

            turn.spawn(fetcher, name="fetcher", daemon=True)
            turn.spawn(requester, name="requester")

    def boot() -> None:
        turn.prevent_inert_check()
        coordinator = turn.ref(Coordinator())

        def dataspace_boot() -> None:
            track_actor()
            turn.prevent_inert_check()
            turn.send(coordinator, Embedded(turn.ref(Dataspace())))

        turn.spawn(dataspace_boot, name="dataspace", daemon=True)

    run_actors(boot)
    assert events == ["h1 from fetcher"]


# --------------------------------------------------------------------------- the index itself


def test_an_assertion_meets_only_observers_of_its_shape_and_constants() -> None:
    class Quiet:
        def assert_captures(self, observer: Any, captures: tuple[Any, ...]) -> Any:
            return None

        def retract_captures(self, handle: Any) -> None:
            pass

        def send_captures(self, observer: Any, captures: tuple[Any, ...]) -> None:
            pass

    index = Index(Quiet())
    for i in range(500):
        pattern = P.rec("available", P.lit(f"h{i}"), P.CAPTURE)
        index.add_observer(("available", i), analyse(pattern), object())
    index.add_observer("want", analyse(P.rec("want", P.CAPTURE, P._)), object())
    assert index.observers_examined(freeze(rec("want", "x", Symbol("fetch")))) == 1
    assert index.observers_examined(freeze(rec("available", "h7", "u"))) == 1
    assert index.observers_examined(freeze(rec("other", 1))) == 0
    index.remove_observer(("available", 7), analyse(P.rec("available", P.lit("h7"), P.CAPTURE)))
    assert index.observers_examined(freeze(rec("available", "h7", "u"))) == 0
    assert index.observer_count == 500


def test_freeze_follows_preserves_equality() -> None:
    ref = object()
    assert freeze(True) != freeze(1) and freeze(1.0) != freeze(1)
    assert freeze([1, "a"]) == freeze((1, "a"))
    assert freeze({"a": 1, "b": 2}) == freeze(ImmutableDict({"b": 2, "a": 1}))
    assert freeze(Embedded(ref)) == freeze(Embedded(ref))
    assert freeze(Embedded(ref)) != freeze(Embedded(object()))
    assert freeze(Annotated(5)) == freeze(5)
    assert freeze(Symbol("a")) != freeze("a")
    assert freeze(float("nan")) == freeze(float("nan")), "Preserves compares doubles bitwise"
    value = rec("r", [1, True, 2.5, b"x", Symbol("s"), frozenset({1}), {"k": Embedded(ref)}])
    assert thaw(freeze(value)) == value
    with pytest.raises(ProtocolError, match="not a Preserves value"):
        freeze(object())


def test_malformed_observe_is_kept_as_plain_data() -> None:
    recorders: list[Recorder] = []
    run_script(
        lambda s: recorders.append(s.observe(P.rec("Observe", P.CAPTURE, P._))),
        lambda s: s.publish(rec("Observe", "not a pattern", Embedded(turn.ref(actor.Entity())))),
    )
    (r,) = recorders
    assert ("not a pattern",) in r.visible


@pytest.mark.parametrize("bad", [
    "x",
    rec("lit", rec("want", 1)),  # a literal holds an atom; compounds are groups
    rec("group", rec("set"), ImmutableDict({})),
    rec("bind"),
])
def test_analyse_names_what_is_not_a_pattern(bad: Any) -> None:
    with pytest.raises(ProtocolError, match="not a dataspace pattern|holds an atom"):
        analyse(bad)
