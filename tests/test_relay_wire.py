"""The hand-written packet codec gives exactly preserves' values, bytes and errors."""

from __future__ import annotations

import math
import random
from typing import Any

import preserves
import pytest
from preserves import Annotated, Embedded, ImmutableDict, Record, Symbol
from preserves.binary import Decoder
from syndicate.schema import protocol, sturdy

from substituter.dataspace import wire


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "bigint", "str", "longstr", "bytes", "sym", "bool", "float"]
    if depth < 4:
        kinds += ["tuple", "record", "dict", "set", "embedded"] * 2
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-300, 300)
    if kind == "bigint":
        return rng.randint(-(1 << 200), 1 << 200)
    if kind == "str":
        return "".join(rng.choice("ab\u00e9\u4e2d\U0001f600") for _ in range(rng.randint(0, 6)))
    if kind == "longstr":
        return "x" * rng.choice([127, 128, 200, 16384, 20000])
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 300))
    if kind == "sym":
        return Symbol(rng.choice(["A", "R", "want", "available", "x" * 130]))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.choice([0.0, -0.0, 1.5, -2.25e300, math.inf, 1e-310])
    if kind == "tuple":
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4)))
    if kind == "record":
        return Record(Symbol(rng.choice(["A", "rec"])),
                      [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))])
    if kind == "dict":
        return ImmutableDict({rng.randint(0, 1000): _random_value(rng, depth + 1)
                              for _ in range(rng.randint(0, 3))})
    if kind == "set":
        return frozenset(rng.randint(0, 1000) for _ in range(rng.randint(0, 3)))
    return Embedded((0, rng.randint(0, 1 << 40)))


def _values() -> list[Any]:
    rng = random.Random(7)
    fixed = [
        0, 1, -1, 127, 128, -128, -129, 255, 256, 1 << 63, -(1 << 63), True, False, "", b"",
        (), [1, [2, "three"]], Record(Symbol("S"), (Embedded(sturdy.WireRef.mine(sturdy.Oid(3))),)),
        sturdy.WireRef.mine(sturdy.Oid(5)), sturdy.WireRef.yours(sturdy.Oid(9), ()),
        Embedded(sturdy.WireRef.mine(sturdy.Oid(300))), {"a": 1, "b": (2,)}, {3, 1, 2},
        Annotated(5), protocol.Packet.Error(protocol.Error("no", False)),
    ]
    return fixed + [_random_value(rng) for _ in range(400)]


def test_encode_is_preserves_encode() -> None:
    for value in _values():
        assert wire.encode(value) == preserves.encode(value), value


def _stock_values(data: bytes) -> list[Any] | Exception:
    decoder = Decoder(decode_embedded=sturdy.WireRef.decode)
    decoder.extend(data)
    out = []
    try:
        while decoder.complete_value_available():
            out.append(decoder.next())
    except Exception as exc:  # noqa: BLE001
        return exc
    return out


def _fast_values(data: bytes, chunk: int) -> list[Any] | Exception:
    decoder = Decoder(decode_embedded=sturdy.WireRef.decode)
    out = []
    try:
        for i in range(0, len(data), chunk):
            decoder.extend(data[i:i + chunk])
            while (value := wire.next_value(decoder, wire.decode_wire_ref)) is not None:
                out.append(value)
    except Exception as exc:  # noqa: BLE001
        return exc
    return out


def _same(a: list[Any] | Exception, b: list[Any] | Exception) -> bool:
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    # repr tells 1 from True and 0.0 from -0.0, which == does not
    return [repr(x) for x in a] == [repr(x) for x in b]


def test_decode_is_preserves_decode_whole_and_in_pieces() -> None:
    values = [v for v in _values() if not isinstance(v, sturdy.WireRef.mine | sturdy.WireRef.yours)]
    stream = b"".join(preserves.encode(v) for v in values)
    stock = _stock_values(stream)
    assert not isinstance(stock, Exception)
    assert len(stock) == len(values)
    for chunk in (len(stream), 4096, 7, 1):
        assert _same(_fast_values(stream, chunk), stock), chunk


def test_embedded_wire_refs_decode_to_schema_objects() -> None:
    got = _fast_values(preserves.encode((Embedded((0, 4)), Embedded((1, 5)))), 100)
    assert not isinstance(got, Exception)
    mine, yours = got[0]
    assert mine.embeddedValue == sturdy.WireRef.mine(sturdy.Oid(4))
    assert yours.embeddedValue == sturdy.WireRef.decode((1, 5))


def test_hostile_bytes_get_the_same_verdict() -> None:
    verdicts = set()
    for seed in range(400):
        rng = random.Random(seed)
        # corrupt: insert tags (invalid, end markers, annotations, containers), overwrite
        # bytes, cut short
        data = bytearray(preserves.encode(_random_value(rng)))
        for _ in range(rng.randint(1, 5)):
            pos = rng.randrange(len(data) + 1)
            if rng.random() < 0.6:
                data[pos:pos] = bytes([rng.choice(
                    [0x84, 0x85, 0x86, 0x87, 0xB0, 0xB1, 0xB4, 0xB6, 0xB7, 0xFF, 0x00])])
            elif pos < len(data):
                data[pos] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)):]
        stock = _stock_values(bytes(data))
        verdicts.add(type(stock).__name__)
        for chunk in (len(data) or 1, 3):
            assert _same(_fast_values(bytes(data), chunk), stock), bytes(data).hex()
    assert {"list", "DecodeError"} <= verdicts  # both outcomes were exercised


@pytest.mark.parametrize("data", [
    b"\xb4\x84",  # a record without a label
    b"\xb7\xb0\x01\x01\x84",  # a dictionary with a key and no value
    b"\xb7\xb0\x01\x01\xb0\x00\xb0\x01\x01\xb0\x00\x84",  # a duplicate key
    b"\xb6\xb0\x01\x01\xb0\x01\x01\x84",  # a duplicate set member
    b"\xb1\x02\xff\xfe",  # not UTF-8
    b"\x87\x04\x00\x00\x00\x00",  # a 4-byte float
    b"\x84",  # an end marker where a value belongs
    b"\xb5" * 5000 + b"\x84" * 5000,  # nesting deeper than the interpreter allows
])
def test_malformed_input_raises_what_preserves_raises(data: bytes) -> None:
    stock = _stock_values(data)
    assert isinstance(stock, Exception)
    assert _same(_fast_values(data, len(data)), stock)


def test_turn_packet_and_events_as_the_schema_writes_them() -> None:
    events = [
        (1, protocol.Event.Assert(protocol.Assert(protocol.Assertion(Record(Symbol("want"), ("h",))),
                                                  protocol.Handle(7)))),
        (1, protocol.Event.Retract(protocol.Retract(protocol.Handle(7)))),
        (2, protocol.Event.Message(protocol.Message(protocol.Assertion((1, "x"))))),
    ]
    stock = preserves.encode(protocol.Packet.Turn(protocol.Turn(
        [protocol.TurnEvent(protocol.Oid(oid), event) for oid, event in events])))
    assert wire.turn_packet([(oid, wire.event_value(event)) for oid, event in events]) == stock
    parsed = wire.parse_turn(preserves.decode(stock))
    assert parsed == [(1, "A", Record(Symbol("want"), ("h",)), 7), (1, "R", 7, None),
                      (2, "M", (1, "x"), None)]


def test_sync_peer_is_embedded_once() -> None:
    peer = sturdy.WireRef.mine(sturdy.Oid(12))
    packet = wire.turn_packet([(0, wire.sync_value(Embedded(peer)))])
    assert packet == preserves.encode(((0, Record(Symbol("S"), (Embedded((0, 12)),))),))
    assert b"\x86\x86" not in packet


def test_map_embeddeds_is_preserves_map_embeddeds() -> None:
    from preserves.fold import map_embeddeds

    def rewrite(inner: Any) -> Any:
        return Embedded(("rewritten", repr(inner)))

    for value in _values():
        ours, theirs = wire.map_embeddeds(rewrite, value), map_embeddeds(rewrite, value)
        assert repr(ours) == repr(theirs)
        assert type(ours) is type(theirs)
        assert preserves.encode(ours) == preserves.encode(theirs)


def test_symbols_shared_only_within_bounds() -> None:
    long_name = "s" * 10_000
    decoder = Decoder()
    decoder.extend(preserves.encode((Symbol(long_name), Symbol("want"), Symbol("want"))))
    value = wire.next_value(decoder)
    assert value == (Symbol(long_name), Symbol("want"), Symbol("want"))
    assert long_name not in wire._SYMBOLS
    assert value[1] is value[2]  # short labels are shared
    assert len(wire._SYMBOLS) <= wire._MAX_SYMBOLS
