"""The substitution protocol's Python classes: encoding, decoding, patterns."""

from __future__ import annotations

from typing import Any

import preserves
import pytest
from preserves import Record, Symbol, parse, stringify
from preserves.compare import sorted_items
from syndicate import patterns as P
from syndicate.schema import dataspacePatterns

import substituter.protocol as protocol
from substituter.errors import ProtocolError, SubstituterError
from substituter.protocol import (
    RECORDS,
    SCHEMA_PATH,
    Available,
    ErisChunk,
    Failed,
    Fetcher,
    Intent,
    NarInfo,
    Realised,
    Transfer,
    Unavailable,
    Want,
    decode_any,
    record_pattern,
)

HASH = "0c6kzph7l0dcbfmjap64f0czdafn3b7x"
STORE_PATH = f"/nix/store/{HASH}-hello-2.12.1"


def narinfo() -> Any:
    return NarInfo(
        STORE_PATH,
        "sha256:1bxrdbfapq1ad1pqrz1lsgc8x8hc6s38bs4qn1jfwmpjva3x8v7b",
        226560,
        [f"{HASH}-hello-2.12.1", "5mh7kaj2fyv8mk4sfq1brwxgc02884wi-glibc-2.37-8"],
        "a2ik4c8j9q2h4ihvl8hxs3ykbiyz9ws6-hello-2.12.1.drv",
        "",
        ["cache.nixos.org-1:abc=="],
    )


SAMPLES = [
    Want(HASH, Intent.fetch()),
    Want(HASH, Intent.query()),
    Fetcher("cache.nixos.org", "binary-cache", 40, "builder-1"),
    Available(HASH, "cache.nixos.org", "https://c/nar/x.nar.xz", "xz", 50000, "", narinfo(), 3),
    narinfo(),
    Unavailable(HASH, "mirror", "404"),
    Transfer(HASH, "mirror", 4096, 226560),
    Failed(HASH, "mirror", "NarHash mismatch", False),
    Realised(STORE_PATH, "daemon"),
    ErisChunk(1024, bytes(range(32)), b"\x00" * 1024),
]


def test_every_record_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(RECORDS)


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip_through_binary_and_text(record: Any) -> None:
    cls = type(record)
    binary = preserves.encode(record)
    assert cls.decode(preserves.decode(binary)) == record
    assert cls.decode(parse(stringify(record))) == record
    assert preserves.canonicalize(cls.decode(preserves.decode(binary))) == binary


def test_wire_form_is_the_documented_record() -> None:
    assert stringify(Want(HASH, Intent.fetch())) == f'<want "{HASH}" fetch>'
    assert stringify(Failed(HASH, "m", "why", True)) == f'<failed "{HASH}" "m" "why" #t>'
    encoded = preserves.preserve(SAMPLES[3])
    assert encoded.key == Symbol("available")
    assert encoded.fields[6].key == Symbol("narinfo")
    assert encoded.fields[6].fields[3] == (f"{HASH}-hello-2.12.1", narinfo().references[1])


def test_fields_by_name() -> None:
    offer = Available(
        hash=HASH, fetcher="f", uri="file:///x", compression="none",
        fileSize=0, fileHash="", info=narinfo(), cost=1,
    )
    assert offer.info.narSize == 226560
    assert offer.info.deriver.endswith(".drv")
    assert offer == Available(HASH, "f", "file:///x", "none", 0, "", narinfo(), 1)
    assert offer != Available(HASH, "g", "file:///x", "none", 0, "", narinfo(), 1)
    assert Want(hash="a", intent=Intent.fetch()) != Want(hash="b", intent=Intent.fetch())


def test_records_hash_by_value_whatever_the_sequence_type() -> None:
    as_lists = NarInfo(STORE_PATH, "sha256:x", 1, ["a", "b"], "", "", ["k:s"])
    as_tuples = NarInfo(STORE_PATH, "sha256:x", 1, ("a", "b"), "", "", ("k:s",))
    decoded = NarInfo.decode(preserves.preserve(as_lists))
    assert as_lists == as_tuples == decoded
    assert len({as_lists, as_tuples, decoded}) == 1
    assert decoded.references == ("a", "b")
    assert as_lists != NarInfo(STORE_PATH, "sha256:x", 1, ("b", "a"), "", "", ("k:s",))


@pytest.mark.parametrize(
    ("cls", "text", "reason"),
    [
        (Want, "<want 12 fetch>", "<atom String> didn't match 12"),
        (Want, f'<want "{HASH}" maybe>', "<lit fetch> didn't match maybe"),
        (Want, '<wants "x" fetch>', "<lit want> didn't match wants"),
        (Want, "[1 2]", "didn't match [1 2]"),
        (Failed, '<failed "h" "f" "r" "yes">', "<atom Boolean> didn't match \"yes\""),
        (ErisChunk, '<eris-chunk 1024 "ref" #"c">', "<atom ByteString> didn't match \"ref\""),
        (
            Available,
            '<available "h" "f" "u" "xz" 0 "" <narinfo "p" "h" 1 ["r" 2] "" "" []> 1>',
            "<atom String> didn't match 2",
        ),
    ],
)
def test_decode_errors_name_the_record_and_the_reason(cls: Any, text: str, reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        cls.decode(parse(text))
    message = str(caught.value)
    assert message.startswith(f"not a valid {cls.NAME.name}: ")
    assert reason in message.splitlines()[0]
    assert isinstance(caught.value, SubstituterError)
    assert cls.try_decode(parse(text)) is None


def test_nested_decode_failure_names_the_inner_record() -> None:
    bad = '<available "h" "f" "u" "xz" 0 "" <narinfo "p"> 1>'
    with pytest.raises(ProtocolError, match=r"not a valid Available: in substitution\.NarInfo"):
        Available.decode(parse(bad))


def test_decode_any_dispatches_on_label() -> None:
    for record in SAMPLES:
        assert decode_any(preserves.preserve(record)) == record
    assert decode_any(Record(Symbol("Observe"), [1, 2])) is None
    assert decode_any("not a record") is None
    with pytest.raises(ProtocolError, match="not a valid Transfer"):
        decode_any(parse('<transfer "h" "f" "lots" 1>'))


# --- dataspace patterns ------------------------------------------------------------------------


def match(pattern: Any, value: Any) -> list[Any] | None:
    """Match a dataspacePatterns value the way a dataspace does (groups ignore extra members,
    captures in depth-first pre-order with entries in Preserves key order). None: no match."""
    captures: list[Any] = []
    return captures if _match(preserves.preserve(pattern), value, captures) else None


def _match(p: Record, v: Any, captures: list[Any]) -> bool:
    kind = p.key.name
    if kind == "_":
        return True
    if kind == "bind":
        captures.append(v)
        return _match(p.fields[0], v, captures)
    if kind == "lit":
        return bool(v == p.fields[0])
    assert kind == "group", p
    group_type, entries = p.fields
    if group_type.key == Symbol("rec"):
        if not (isinstance(v, Record) and v.key == group_type.fields[0]):
            return False
        members: Any = dict(enumerate(v.fields))
    elif group_type.key == Symbol("arr"):
        if not isinstance(v, (tuple, list)):
            return False
        members = dict(enumerate(v))
    else:
        if not isinstance(v, dict):
            return False
        members = v
    return all(
        k in members and _match(sub, members[k], captures) for k, sub in sorted_items(entries)
    )


def test_pattern_from_schema_class_with_quote_unquote() -> None:
    pattern = P.quote(Want(P.unquote(P.CAPTURE), Intent.fetch()))
    assert dataspacePatterns.Pattern.decode(preserves.preserve(pattern)) == pattern
    assert match(pattern, preserves.preserve(Want(HASH, Intent.fetch()))) == [HASH]
    assert match(pattern, preserves.preserve(Want(HASH, Intent.query()))) is None
    assert match(pattern, preserves.preserve(Unavailable(HASH, "f", "r"))) is None


def test_record_pattern_captures_in_field_order() -> None:
    offer = preserves.preserve(SAMPLES[3])
    pattern = record_pattern(Available, hash=HASH, info=P.CAPTURE, fetcher=P.CAPTURE)
    captured = match(pattern, offer)
    assert captured is not None
    assert captured[0] == "cache.nixos.org"
    assert NarInfo.decode(captured[1]) == narinfo()
    assert match(record_pattern(Available, hash="1" * 32), offer) is None


def test_record_pattern_matches_nested_literals_and_schema_values() -> None:
    fetch_wants = record_pattern(Want, intent=Intent.fetch(), hash=P.bind(P._))
    assert match(fetch_wants, preserves.preserve(Want(HASH, Intent.fetch()))) == [HASH]
    assert match(fetch_wants, preserves.preserve(Want(HASH, Intent.query()))) is None
    any_want = record_pattern(Want)
    assert match(any_want, preserves.preserve(Want(HASH, Intent.query()))) == []
    eris = record_pattern(ErisChunk, blockSize=1024, ref=bytes(range(32)), content=P.CAPTURE)
    assert match(eris, preserves.preserve(SAMPLES[-1])) == [b"\x00" * 1024]


def test_record_pattern_rejects_unknown_fields_and_classes() -> None:
    with pytest.raises(TypeError, match=r"Want has no field\(s\) \['hsh'\]"):
        record_pattern(Want, hsh=HASH)
    with pytest.raises(TypeError, match="protocol record class"):
        record_pattern(Intent)


# --- the package itself ------------------------------------------------------------------------


def test_public_names() -> None:
    for name in protocol.__all__:
        assert getattr(protocol, name) is not None, name
    for cls in RECORDS:
        assert cls.NAME.name in protocol.__all__


def test_every_definition_in_the_schema_is_documented() -> None:
    values = list(preserves.Parser(SCHEMA_PATH.read_text(), include_annotations=True))
    names = [v for v, nxt in zip(values, values[1:], strict=False) if nxt == Symbol("=")]
    assert {n.item.name for n in names} == {c.NAME.name for c in RECORDS} | {"Intent"}
    for name in names:
        docs = [preserves.strip_annotations(a) for a in name.annotations]
        assert any(isinstance(d, str) and d.strip() for d in docs), name.item
