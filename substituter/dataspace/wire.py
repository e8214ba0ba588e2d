"""The relay protocol's packets read and written by hand, for both ends of a connection.

syndicate-py goes through the generic Preserves codec and the protocol schema for every
packet, which costs more than everything else a round trip does. This module reads and writes
the shapes that actually occur (turns of assert / retract / message / sync events over plain
values) directly, and hands anything else to preserves and the schema, so every value read
and every byte written is exactly what the generic path would give, and anything malformed
gets the generic path's verdict.
"""

from __future__ import annotations

import struct
from typing import Any

import preserves
from preserves import Embedded, ImmutableDict, Record, Symbol
from preserves.binary import Decoder
from preserves.fold import map_embeddeds as _generic_map_embeddeds
from syndicate.schema import sturdy

__all__ = [
    "EVENT_NAMES",
    "decode_wire_ref",
    "encode",
    "event_value",
    "map_embeddeds",
    "next_value",
    "parse_turn",
    "sync_value",
    "turn_packet",
    "wire_ref_value",
]

_ASSERT = Symbol("A")
_RETRACT = Symbol("R")
_MESSAGE = Symbol("M")
_SYNC = Symbol("S")
EVENT_NAMES = {"A": "assert", "R": "retract", "M": "message", "S": "sync"}

_WIRE_MINE = sturdy.WireRef.mine
_OID = sturdy.Oid
_pack_double = struct.Struct(">d").pack
_unpack_double = struct.Struct(">d").unpack


# --------------------------------------------------------------------------- reading


class _Unusual(Exception):
    """The fast reader gives up (a rare form, or an error): preserves decides."""


# Symbols repeat on every packet (labels); sharing them saves an allocation per use. Bounded
# in count and name length, so what peers send cannot make it hold more than ~256 KiB.
_SYMBOLS: dict[str, Symbol] = {}
_MAX_SYMBOLS = 4096
_MAX_SHARED_NAME = 64


def _symbol(name: str) -> Symbol:
    sym = _SYMBOLS.get(name)
    if sym is None:
        sym = Symbol(name)
        if len(_SYMBOLS) < _MAX_SYMBOLS and len(name) <= _MAX_SHARED_NAME:
            _SYMBOLS[name] = sym
    return sym


def _read(buf: bytearray, i: int, embedded: Any) -> tuple[Any, int]:
    """The value starting at ``buf[i]`` and the index after it; as preserves' ``Decoder.next``
    with annotations dropped.

    IndexError only when ``buf`` ends before the value does, and then everything before was
    well-formed in a way preserves' ``skip_value`` accepts too (this accepts fewer tags than
    it), so preserves would also find the value incomplete.
    """
    tag = buf[i]
    i += 1
    if tag == 0xB5 or tag == 0xB4 or tag == 0xB6 or tag == 0xB7:
        items = []
        while buf[i] != 0x84:
            item, i = _read(buf, i, embedded)
            items.append(item)
        i += 1
        if tag == 0xB5:
            return tuple(items), i
        if tag == 0xB4:
            if not items:
                raise _Unusual
            return Record(items[0], items[1:]), i
        if tag == 0xB7:
            return ImmutableDict.from_kvs(items), i  # raises on odd count or duplicate keys
        members = frozenset(items)
        if len(members) != len(items):
            raise _Unusual
        return members, i
    if tag == 0xB0 or tag == 0xB1 or tag == 0xB2 or tag == 0xB3:
        n = buf[i]
        i += 1
        if n & 0x80:  # little-endian base-128 length
            n &= 0x7F
            shift = 7
            while True:
                b = buf[i]
                i += 1
                n |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
        end = i + n
        if end > len(buf):
            raise IndexError
        if tag == 0xB0:
            return int.from_bytes(buf[i:end], "big", signed=True), end
        if tag == 0xB1:
            return buf[i:end].decode("utf-8"), end
        if tag == 0xB3:
            return _symbol(buf[i:end].decode("utf-8")), end
        return bytes(buf[i:end]), end
    if tag == 0x86:
        inner, i = _read(buf, i, embedded)
        try:
            ref = embedded(inner)
        except Exception as exc:  # noqa: BLE001 - never mistaken for short input
            raise _Unusual from exc
        return Embedded(ref), i
    if tag == 0x80:
        return False, i
    if tag == 0x81:
        return True, i
    if tag == 0x87 and buf[i] == 8 and i + 9 <= len(buf):
        return _unpack_double(buf[i + 1:i + 9])[0], i + 9
    raise _Unusual  # annotations, end markers, unknown tags


def next_value(decoder: Decoder, embedded: Any = None) -> Any:
    """The next complete value in ``decoder``'s buffer (advancing past it), or None when it
    holds no complete value yet; raises what ``decoder.next()`` raises on malformed input.

    ``embedded`` decodes embedded values on the fast path (it must give what the decoder's own
    ``decode_embedded`` gives); preserves' decoder itself handles every case the fast reader
    does not, from the same position.
    """
    start = decoder.index
    try:
        value, end = _read(decoder.packet, start, embedded or decoder.decode_embedded)
    except IndexError:  # incomplete (see _read); not scanned a second time
        return None
    except Exception:  # noqa: BLE001 - unusual or malformed: the generic reader decides
        decoder.index = start
        if not decoder.complete_value_available():
            return None
        return decoder.next()
    decoder.index = end
    return value


def decode_wire_ref(value: Any) -> Any:
    """As ``sturdy.WireRef.decode``, with ``[0 oid]`` (a reference the peer exports) done
    directly."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and value[0] == 0 \
            and type(value[1]) is int:
        return _WIRE_MINE(_OID(value[1]))
    return sturdy.WireRef.decode(value)


def parse_turn(value: Any) -> list[tuple[int, str, Any, Any]] | None:
    """A Turn packet's events as (oid, "A"|"R"|"M"|"S", first, second) tuples, or None when
    ``value`` is anything else or anything about it is unusual: the caller then decodes it
    with the protocol schema, so this only ever accepts what the schema accepts.

    The fields are what the schema would give: A: (assertion, handle), R: (handle, None),
    M: (body, None), S: (the peer's wire ref, None).
    """
    if type(value) is not tuple:
        return None
    events: list[tuple[int, str, Any, Any]] = []
    append = events.append
    for item in value:
        if type(item) is not tuple or len(item) < 2:
            return None
        oid, event = item[0], item[1]
        if type(oid) is not int or type(event) is not Record:
            return None
        label, fields = event.key, event.fields
        if type(label) is not Symbol:
            return None
        name = label.name
        if name == "A":
            if len(fields) < 2 or type(fields[1]) is not int:
                return None
            append((oid, "A", fields[0], fields[1]))
        elif name == "R":
            if not fields or type(fields[0]) is not int:
                return None
            append((oid, "R", fields[0], None))
        elif name == "M":
            if not fields:
                return None
            append((oid, "M", fields[0], None))
        elif name == "S":
            if not fields or type(fields[0]) is not Embedded:
                return None
            append((oid, "S", fields[0].embeddedValue, None))
        else:
            return None
    return events


# --------------------------------------------------------------------------- embedded refs


def map_embeddeds(f: Any, v: Any) -> Any:
    """As ``preserves.fold.map_embeddeds`` (what a relay rewrites every value with), with the
    common types dispatched directly."""
    t = type(v)
    if t is str or t is Symbol or t is int or t is bytes or t is bool or t is float:
        return v
    if t is Record:
        return Record(map_embeddeds(f, v.key), tuple([map_embeddeds(f, w) for w in v.fields]))
    if t is tuple:
        return tuple([map_embeddeds(f, w) for w in v])
    if t is Embedded:
        return f(v.embeddedValue)
    if t is ImmutableDict:
        return ImmutableDict.from_kvs([map_embeddeds(f, w) for kv in v.items() for w in kv])
    return _generic_map_embeddeds(f, v)


# --------------------------------------------------------------------------- writing


def event_value(event: Any) -> Any:
    """The Preserves value of a ``protocol.Event``, as its schema encodes it."""
    variant = event.VARIANT.name
    body = event.value
    if variant == "Assert":
        return Record(_ASSERT, (body.assertion.value, body.handle.value))
    if variant == "Retract":
        return Record(_RETRACT, (body.handle.value,))
    if variant == "Message":
        return Record(_MESSAGE, (body.body.value,))
    return preserves.preserve(event)


def sync_value(peer: Any) -> Any:
    """``<S #:peer>``: a Sync event with its peer (a wire ref) embedded once.

    syndicate-py 0.19.3 embeds a Sync's peer twice (``<S #:#:[0 n]>``), which syndicate-server
    rejects ("Embedded values not supported here").
    """
    if isinstance(peer, Embedded):
        peer = peer.embeddedValue
    return Record(_SYNC, (Embedded(peer),))


def wire_ref_value(ref: Any) -> Any:
    """A ``sturdy.WireRef`` as the plain value its schema encodes it to."""
    if type(ref) is _WIRE_MINE:
        return (0, ref.oid.value)
    return preserves.preserve(ref)


def _varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write(out: bytearray, v: Any) -> None:
    """Append the encoding of ``v``, as preserves' ``Encoder.append`` (no canonical ordering,
    embedded values written as themselves)."""
    t = type(v)
    if t is tuple or t is list:
        out.append(0xB5)
        for item in v:
            _write(out, item)
        out.append(0x84)
    elif t is Record:
        out.append(0xB4)
        _write(out, v.key)
        for item in v.fields:
            _write(out, item)
        out.append(0x84)
    elif t is int:
        if v == 0:
            out += b"\xb0\x00"
        else:
            size = ((~v if v < 0 else v).bit_length() + 8) // 8
            out.append(0xB0)
            _varint(out, size)
            out += v.to_bytes(size, "big", signed=True)
    elif t is str or t is Symbol:
        bs = (v if t is str else v.name).encode("utf-8")
        out.append(0xB1 if t is str else 0xB3)
        _varint(out, len(bs))
        out += bs
    elif t is Embedded:
        out.append(0x86)
        _write(out, v.embeddedValue)
    elif t is bool:
        out.append(0x81 if v else 0x80)
    elif t is bytes:
        out.append(0xB2)
        _varint(out, len(v))
        out += v
    elif t is _WIRE_MINE:
        _write(out, (0, v.oid.value))
    elif t is ImmutableDict or t is dict:  # patterns hold these; not canonically ordered
        out.append(0xB7)
        for key, item in v.items():
            _write(out, key)
            _write(out, item)
        out.append(0x84)
    elif t is float:
        out += b"\x87\x08"
        out += _pack_double(v)
    else:  # sets, annotations, schema objects: rare here
        out += preserves.encode(v)


def encode(value: Any) -> bytes:
    """``value`` in Preserves binary, the same bytes as ``preserves.encode(value)``."""
    out = bytearray()
    _write(out, value)
    return bytes(out)


def turn_packet(events: list[tuple[int, Any]]) -> bytes:
    """A Turn packet of (oid, event value) pairs."""
    out = bytearray(b"\xb5")
    for oid, event in events:
        out.append(0xB5)
        _write(out, oid)
        _write(out, event)
        out.append(0x84)
    out.append(0x84)
    return bytes(out)


