"""Python classes for the records of ``substitution.prs``.

The classes are built by preserves-py from the schema, translated at import (a few
milliseconds). Construct them positionally or by field name, encode with
``preserves.preserve(record)``, decode with ``Want.decode(value)``:

    >>> want = Want("0" * 32, Intent.fetch())
    >>> Want.decode(preserves.preserve(want)) == want
    True

Decoding differs from plain preserves-py in one way: a value that does not match raises
:class:`~substituter.errors.ProtocolError` naming the record and what was wrong
(``try_decode`` returns None instead). Sequence fields are kept as tuples, so records
compare equal and hash by their field values however they were built.

For dataspace patterns, :func:`record_pattern` builds a syndicate pattern from a record class
and the fields to constrain or capture; see its docstring.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

import preserves
from preserves.schema import SchemaDecodeFailed
from syndicate import patterns as P
from syndicate.schema import dataspacePatterns

from substituter.errors import ProtocolError
from substituter.protocol import schemac

__all__ = [
    "Want",
    "Intent",
    "Fetcher",
    "Available",
    "NarInfo",
    "Unavailable",
    "Transfer",
    "Failed",
    "Realised",
    "ErisChunk",
    "RECORDS",
    "SCHEMA_PATH",
    "decode_any",
    "record_pattern",
]

SCHEMA_PATH = Path(__file__).with_name("substitution.prs")

_namespace = schemac.load(SCHEMA_PATH)

# Nesting depth of decode calls in this context. preserves-py decodes a field that refers to
# another definition (Available.info -> NarInfo) by calling that class's decode and catching
# SchemaDecodeFailed, e.g. to try the next alternative; so only the outermost call may turn a
# failure into a ProtocolError.
_decode_depth: contextvars.ContextVar[int] = contextvars.ContextVar("decode_depth", default=0)


def _harden(cls: Any) -> Any:
    """Fix two rough edges of preserves-py's generated classes: equality, decode errors."""
    _compare_by_field_values(cls)
    return _translate_decode_errors(cls)


def _compare_by_field_values(cls: Any) -> None:
    """preserves-py compares and hashes records by their positional constructor arguments,
    so ``Want(hash=h, intent=i)`` would equal every other keyword-built Want, and a decoded
    sequence (a list) would never equal a constructed one (a tuple). Record the field values
    after construction instead, with sequences as tuples."""
    original_init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        for name in cls.SAFE_FIELD_NAMES:
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self._fields = tuple(getattr(self, name) for name in cls.SAFE_FIELD_NAMES)

    cls.__init__ = __init__


def _translate_decode_errors(cls: Any) -> Any:
    original = cls.decode.__func__

    def decode(cls: Any, value: Any) -> Any:
        depth = _decode_depth.get()
        token = _decode_depth.set(depth + 1)
        try:
            return original(cls, value)
        except SchemaDecodeFailed as exc:
            if depth:
                raise
            raise ProtocolError(_explain(cls.NAME.name, exc)) from exc
        finally:
            _decode_depth.reset(token)

    def try_decode(cls: Any, value: Any) -> Any:
        try:
            return cls.decode(value)
        except ProtocolError:
            return None

    cls.decode = classmethod(decode)
    cls.try_decode = classmethod(try_decode)
    return cls


def _explain(name: str, failure: SchemaDecodeFailed) -> str:
    """First line: the record and the most likely reason; then preserves-py's full tree."""
    text = str(failure)
    _, _, rest = text.partition("\nMost likely reason: ")
    reason, _, tree = rest.partition("\n")
    if not reason:
        return f"not a valid {name}: {text}"
    return f"not a valid {name}: {reason}\n{tree}"


# preserves-py creates these classes at run time, so static checkers see them as Any.
Want: Any = _harden(_namespace.Want)
Intent: Any = _translate_decode_errors(_namespace.Intent)  # an enumeration, not a record
Fetcher: Any = _harden(_namespace.Fetcher)
Available: Any = _harden(_namespace.Available)
NarInfo: Any = _harden(_namespace.NarInfo)
Unavailable: Any = _harden(_namespace.Unavailable)
Transfer: Any = _harden(_namespace.Transfer)
Failed: Any = _harden(_namespace.Failed)
Realised: Any = _harden(_namespace.Realised)
ErisChunk: Any = _harden(_namespace.ErisChunk)

RECORDS: tuple[Any, ...] = (
    Want, Fetcher, Available, NarInfo, Unavailable, Transfer, Failed, Realised, ErisChunk,
)
"""Every record class of the protocol (Intent is a field type, not a record)."""

_BY_LABEL = {cls.SCHEMA[0][0]: cls for cls in RECORDS}  # <rec <lit label> ...>


def decode_any(value: Any) -> Any:
    """Decode any protocol record by its label; None for a value of another protocol.

    A value with one of our labels but the wrong fields raises ProtocolError.
    """
    value = preserves.preserve(value)
    if not isinstance(value, preserves.Record):
        return None
    cls = _BY_LABEL.get(value.key)
    return None if cls is None else cls.decode(value)


def record_pattern(cls: Any, **fields: Any) -> Any:
    """A dataspace pattern matching records of ``cls``.

    Each keyword names a field: a syndicate pattern (``P.CAPTURE``, ``P._``, ``P.bind(...)``)
    is used as it is; any other value must match literally. Fields not named match anything.
    Captures come out in field order:

        record_pattern(Available, hash=h, fetcher=P.CAPTURE, info=P.CAPTURE)
    """
    if cls not in RECORDS:
        raise TypeError(f"record_pattern needs a protocol record class, got {cls!r}")
    unknown = set(fields) - set(cls.SAFE_FIELD_NAMES)
    if unknown:
        raise TypeError(
            f"{cls.NAME.name} has no field(s) {sorted(unknown)}; its fields are {cls.FIELD_NAMES}"
        )
    arguments = [_quasi(fields.get(name, P._)) for name in cls.SAFE_FIELD_NAMES]
    return P.quote(cls(*arguments))


def _quasi(field: Any) -> Any:
    """Inside P.quote, patterns must be unquoted; literal values are quoted as they are."""
    return P.unquote(field) if isinstance(field, dataspacePatterns.Pattern._ALL) else field
