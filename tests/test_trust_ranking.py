from __future__ import annotations

import dataclasses
from pathlib import Path

from substituter.nix.hashes import Hash
from substituter.nix.store_path import make_fixed_output_path
from substituter.plugin import Offer
from substituter.ranking import Demand, FetcherStats
from substituter.trust import TrustPolicy, Verdict

from .helpers import KEY, OTHER_KEY, make_info, make_nar

POLICY = TrustPolicy([str(KEY.public_key())])


def test_signed_by_trusted_key(tmp_path: Path) -> None:
    v = POLICY.judge(make_info(make_nar(tmp_path)))
    assert v.trusted and "test-key-1" in v.reason


def test_signed_by_other_key_is_refused(tmp_path: Path) -> None:
    v = POLICY.judge(make_info(make_nar(tmp_path), key=OTHER_KEY))
    assert not v.trusted and "other-key-1" in v.reason


def test_unsigned_is_refused(tmp_path: Path) -> None:
    v = POLICY.judge(make_info(make_nar(tmp_path), key=None))
    assert not v.trusted and "unsigned" in v.reason


def test_tampered_narinfo_is_refused(tmp_path: Path) -> None:
    info = make_info(make_nar(tmp_path))
    tampered = dataclasses.replace(info, nar_size=info.nar_size + 1)
    assert not POLICY.judge(tampered).trusted


def test_content_addressed_recursive_is_trusted_unsigned(tmp_path: Path) -> None:
    nar = make_nar(tmp_path)
    nar_hash = Hash.of_bytes(nar)
    path = make_fixed_output_path("tree", "recursive", nar_hash)
    info = make_info(nar, hash_part=path.hash_part, key=None)
    info = dataclasses.replace(info, ca=f"fixed:r:{nar_hash}")
    v = POLICY.judge(info)
    assert v.trusted and v.content_hash is None
    # a CA that does not give the path
    wrong = dataclasses.replace(info, ca=f"fixed:r:{Hash.of_bytes(b'x')}")
    assert not POLICY.judge(wrong).trusted


def test_content_addressed_flat_needs_content_check(tmp_path: Path) -> None:
    content = Hash.of_bytes(b"content")
    path = make_fixed_output_path("file", "flat", content)
    info = dataclasses.replace(make_info(b"x" * 8, hash_part=path.hash_part, name="file", key=None),
                               ca=f"fixed:{content}")
    v = POLICY.judge(info)
    assert v.trusted and v.content_hash == content


def _offer(tmp_path: Path) -> Offer:
    return Offer(make_info(make_nar(tmp_path)), "x://")


TRUSTED = Verdict(True, "ok")
UNTRUSTED = Verdict(False, "bad sig")


def test_demand_decides_when_better_fetchers_answered(tmp_path: Path) -> None:
    offer = _offer(tmp_path)
    d = Demand("h", {"fast": 10, "slow": 50, "worse": 60})
    d.offered("slow", offer, TRUSTED)
    assert not d.decided  # "fast" could still beat it
    d.declined("fast", "404")
    assert d.decided  # "worse" cannot beat priority 50
    assert [c.fetcher for c in d.ranked()] == ["slow"]


def test_demand_best_offer_decides_at_once(tmp_path: Path) -> None:
    d = Demand("h", {"a": 10, "b": 50})
    d.offered("a", _offer(tmp_path), TRUSTED)
    assert d.decided


def test_demand_not_found_only_when_all_answered(tmp_path: Path) -> None:
    d = Demand("h", {"a": 10, "b": 50})
    d.declined("a", "404")
    assert not d.decided
    d.offered("b", _offer(tmp_path), UNTRUSTED)
    assert d.decided and d.ranked() == []
    assert "a: 404" in d.explain_missing() and "bad sig" in d.explain_missing()


def test_demand_deadline(tmp_path: Path) -> None:
    d = Demand("h", {"a": 10})
    assert not d.decided
    d.deadline_passed()
    assert d.decided and "deadline" in d.explain_missing()


def test_demand_late_fetcher_and_withdrawal(tmp_path: Path) -> None:
    d = Demand("h", {})
    assert not d.decided  # nobody to ask yet: one may be attaching
    d.fetcher_joined("late", 5)
    assert not d.decided
    d.offered("late", _offer(tmp_path), TRUSTED)
    assert d.decided and d.ranked()
    d.withdrawn("late")
    assert d.ranked() == []


def test_ranking_uses_priority_then_throughput(tmp_path: Path) -> None:
    stats = FetcherStats()
    stats.record("b", 10_000_000, 1.0)
    stats.record("c", 1_000_000, 1.0)
    d = Demand("h", {"a": 10, "b": 40, "c": 40}, stats)
    offer = _offer(tmp_path)
    for name in ("c", "b", "a"):
        d.offered(name, offer, TRUSTED)
    assert [c.fetcher for c in d.ranked()] == ["a", "b", "c"]


def test_demand_without_fetchers_is_not_found_at_the_deadline() -> None:
    d = Demand("h", {})
    d.deadline_passed()
    assert d.decided and d.ranked() == [] and "no fetchers" in d.explain_missing()


def test_a_best_offer_found_bad_reopens_the_demand_for_those_still_to_answer(tmp_path: Path) -> None:
    offer = _offer(tmp_path)
    d = Demand("h", {"evil": 10, "good": 50})
    d.offered("evil", offer, TRUSTED)
    assert d.decided  # the best was certain...
    d.excluded("evil", "sent bad bytes")
    assert not d.decided and d.ranked() == []  # ...until its bytes were wrong: wait for "good"
    d.offered("good", offer, TRUSTED)
    assert d.decided and [c.fetcher for c in d.ranked()] == ["good"]
    assert "sent bad bytes" in d.unavailable["evil"]
