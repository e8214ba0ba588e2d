"""The import order `substituter fetch` builds while the closure is still being resolved."""

from __future__ import annotations

import random

from substituter.fetch import ImportOrder


def test_paths_come_after_their_references_whatever_order_they_arrive_in() -> None:
    # p_i references p_{i//2} and p_{i//3} (p0 references itself), like the benchmark's closure.
    refs = {i: {i // 2, i // 3} for i in range(200)}
    for seed in range(5):
        arrivals = list(range(200))
        random.Random(seed).shuffle(arrivals)
        order = ImportOrder()
        taken: list[int] = []
        for n, i in enumerate(arrivals):
            order.add(str(i), [str(r) for r in refs[i]])
            if n % 7 == 0:  # the importer takes what is ready now and then
                taken += [int(h) for h in order.take()]
        taken += [int(h) for h in order.take()]
        assert sorted(taken) == list(range(200)) and not order.blocked()
        position = {p: k for k, p in enumerate(taken)}
        assert all(position[r] < position[i] for i in range(200) for r in refs[i] if r != i)


def test_a_path_waits_for_a_reference_until_it_is_present_or_taken() -> None:
    order = ImportOrder()
    order.add("top", ["top", "dep", "lib"])
    order.add("dep", ["lib"])
    assert order.take() == []
    order.mark_done("lib")  # e.g. found valid in the store
    assert order.take() == ["dep", "top"]
    assert order.blocked() == []


def test_missing_references_and_cycles_stay_blocked() -> None:
    order = ImportOrder()
    order.add("a", ["b"])
    order.add("b", ["a"])
    order.add("c", ["never-resolved"])
    order.add("d", [])
    assert order.take() == ["d"]
    assert order.blocked() == ["a", "b", "c"]
