"""Translate Preserves Schema source (``.prs``) into its metaschema value.

``preserves-schemac``, the reference compiler, is a JavaScript program; preserves-py can only
*load* a schema that is already in metaschema form (``<schema {version: 1, definitions: {...},
embeddedType: ...}>``). This module closes that gap, so that the human-readable ``.prs`` stays
the source of truth. It covers the schema language as used by this project and by
syndicate-py's own protocols; its output is checked against the bundle syndicate-py ships.

The ``.prs`` text is first read as ordinary Preserves text with annotations kept: ``@name``
bindings are symbol annotations, and ``# comments`` and ``@"docs"`` are string annotations
(ignored here). Clauses are separated by the symbol ``.``.

Run ``python -m substituter.protocol.schemac FILE.prs... > bundle.prb`` to write a binary
schema bundle for tools in other languages.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import preserves
from preserves import (
    Annotated,
    DecodeError,
    Embedded,
    ImmutableDict,
    Parser,
    Record,
    ShortPacket,
    Symbol,
    stringify,
    strip_annotations,
)
from preserves.schema import Compiler, Namespace

from substituter.errors import SchemaError

__all__ = ["translate", "bundle", "load", "main"]

Value = Any  # a Preserves value: preserves-py has no static type for it

# Metaschema vocabulary (see preserves/schema.prb).
_AND, _ANY, _ATOM, _DICT, _DICTOF = (Symbol(s) for s in ("and", "any", "atom", "dict", "dictof"))
_EMBEDDED, _LIT, _NAMED, _OR, _REC = (Symbol(s) for s in ("embedded", "lit", "named", "or", "rec"))
_REF, _SEQOF, _SETOF, _TUPLE = (Symbol(s) for s in ("ref", "seqof", "setof", "tuple"))
_TUPLE_PREFIX = Symbol("tuplePrefix")

# Punctuation of the schema language: ordinary Preserves symbols.
_END, _DEFINES, _ALT, _INTERSECT = Symbol("."), Symbol("="), Symbol("/"), Symbol("&")
_ELLIPSIS = Symbol("...")  # `[x ...]`; and `{k: v ...:...}` reads as the entry `...: ...`
_RESERVED = {_END, _DEFINES, _ALT, _INTERSECT, _ELLIPSIS}

_ATOM_KINDS = {
    "bool": "Boolean",
    "double": "Double",
    "int": "SignedInteger",
    "string": "String",
    "bytes": "ByteString",
    "symbol": "Symbol",
}


class _Invalid(Exception):
    """A problem inside one clause; ``translate`` adds the definition name and line."""


def translate(text: str) -> Value:
    """Translate ``.prs`` source text into a ``<schema {...}>`` metaschema value.

    Raises :class:`~substituter.errors.SchemaError` naming the line and definition at fault.
    """
    version: int | None = None
    embedded_type: Value = False
    definitions: dict[Symbol, Value] = {}
    for line, clause in _clauses(text):
        head = _item(clause[0])
        where = f"line {line}"
        try:
            if head == Symbol("version"):
                version = _version(clause)
            elif head == Symbol("embeddedType"):
                embedded_type = _embedded_type(clause)
            elif len(clause) >= 2 and _item(clause[1]) == _DEFINES:
                name = _definition_name(head)
                where = f"line {line}, definition {name.name}"
                if name in definitions:
                    raise _Invalid("defined twice")
                definitions[name] = _definition(clause[2:])
            else:
                raise _Invalid(
                    "expected `Name = pattern .`, `version 1 .` or `embeddedType Ref .`, "
                    f"got `{_show(clause)}`"
                )
        except _Invalid as exc:
            raise SchemaError(f"{where}: {exc}") from None
    if version is None:
        raise SchemaError("missing `version 1 .` clause")
    return Record(
        Symbol("schema"),
        [
            ImmutableDict(
                {
                    Symbol("version"): version,
                    Symbol("definitions"): ImmutableDict(definitions),
                    Symbol("embeddedType"): embedded_type,
                }
            )
        ],
    )


def bundle(modules: Mapping[str, str]) -> Value:
    """Translate several modules (name -> ``.prs`` text) into one ``<bundle {...}>`` value."""
    translated = {}
    for name, text in modules.items():
        try:
            translated[(Symbol(name),)] = translate(text)
        except SchemaError as exc:
            raise SchemaError(f"module {name}: {exc}") from None
    return Record(Symbol("bundle"), [ImmutableDict(translated)])


def load(source: str | os.PathLike[str], name: str | None = None) -> Namespace:
    """Translate one schema module and compile it into preserves-py classes.

    ``source`` is ``.prs`` text when it is a ``str``, and a file to read when it is a path
    object (then ``name`` defaults to the file's stem). Returns the module's namespace: one
    class per definition, e.g. ``load(Path("x.prs")).Want``.
    """
    if isinstance(source, str):
        text = source
        if name is None:
            raise TypeError("load(text) needs a module name")
    else:
        path = Path(source)
        text = path.read_text(encoding="utf-8")
        name = name or path.stem
    compiler = Compiler()
    compiler.load_schema((Symbol(name),), translate(text))
    namespace: Namespace = compiler.root[name]
    return namespace


# --- reading clauses -------------------------------------------------------------------------


def _clauses(text: str) -> Iterable[tuple[int, list[Value]]]:
    """Yield (line, values) for each `.`-terminated clause; line is where the clause starts."""
    parser = Parser(text, include_annotations=True)
    clause: list[Value] = []
    line = 1
    while True:
        start = parser.index
        try:
            value = parser.next()
        except ShortPacket:
            _check_only_comments_remain(text, start)
            break
        except DecodeError as exc:
            raise SchemaError(f"line {_line_at(text, parser.index)}: {exc}") from None
        if _item(value) == _END:
            if clause:
                yield line, clause
            clause = []
            continue
        if not clause:
            line = _line_at(text, parser.index)
        clause.append(value)
    if clause:  # the last clause may omit its `.`
        yield line, clause


def _check_only_comments_remain(text: str, start: int) -> None:
    """At end of input the parser stops short after a trailing comment; anything else is an
    unterminated value."""
    for offset, raw in enumerate(text[start:].splitlines()):
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            line = _line_at(text, start) + offset
            raise SchemaError(f"line {line}: unexpected end of input (unclosed bracket or string?)")


def _line_at(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _version(clause: list[Value]) -> int:
    if len(clause) != 2 or _item(clause[1]) != 1 or isinstance(_item(clause[1]), bool):
        raise _Invalid(f"only `version 1` is supported, got `{_show(clause)}`")
    return 1


def _embedded_type(clause: list[Value]) -> Value:
    if len(clause) != 2:
        raise _Invalid(
            f"expected `embeddedType Module.Name` or `embeddedType #f`, got `{_show(clause)}`"
        )
    target = _item(clause[1])
    if target is False:
        return False
    if isinstance(target, Symbol) and target not in _RESERVED:
        pattern = _symbol_pattern(target)
        if isinstance(pattern, Record) and pattern.key == _REF:
            return pattern
    raise _Invalid(f"embeddedType must name a definition or be #f, got `{stringify(target)}`")


def _definition_name(head: Value) -> Symbol:
    if not isinstance(head, Symbol) or head in _RESERVED or "." in head.name:
        raise _Invalid(f"`{stringify(head)}` is not a definition name")
    return head


# --- definitions ---------------------------------------------------------------------------


def _definition(body: list[Value]) -> Value:
    if any(_item(v) == _ALT for v in body):
        return _alternatives(body)
    if any(_item(v) == _INTERSECT for v in body):
        pieces = _split(body, _INTERSECT, "&")
        if len(pieces) < 2:
            raise _Invalid("an intersection needs at least two patterns")
        return Record(_AND, [tuple(_named(piece) for piece in pieces)])
    if len(body) != 1:
        what = "nothing" if not body else f"{len(body)} values: `{_show(body)}`"
        raise _Invalid(f"expected one pattern, found {what} (missing `/` or `.`?)")
    return _pattern(body[0])


def _alternatives(body: list[Value]) -> Value:
    if body and _item(body[0]) == _ALT:  # a leading `/` is allowed, for layout
        body = body[1:]
    alternatives = []
    labels: set[str] = set()
    for index, piece in enumerate(_split(body, _ALT, "/")):
        pattern = _pattern(piece)
        label = _binding_name(piece) or _implicit_label(pattern)
        if label is None:
            raise _Invalid(f"alternative {index + 1} (`{_show([piece])}`) needs a @name label")
        if label in labels:
            raise _Invalid(f"two alternatives are labelled {label!r}")
        labels.add(label)
        alternatives.append((label, pattern))
    if len(alternatives) < 2:
        raise _Invalid("an alternation needs at least two alternatives")
    return Record(_OR, [tuple(alternatives)])


def _split(body: list[Value], separator: Symbol, shown: str) -> list[Value]:
    """Split on ``separator``; every piece must be exactly one pattern."""
    pieces: list[list[Value]] = [[]]
    for value in body:
        if _item(value) == separator:
            pieces.append([])
        else:
            pieces[-1].append(value)
    for index, piece in enumerate(pieces):
        if len(piece) != 1:
            found = "nothing" if not piece else f"`{_show(piece)}`"
            raise _Invalid(f"piece {index + 1} around `{shown}` must be one pattern, found {found}")
    return [piece[0] for piece in pieces]


def _implicit_label(pattern: Value) -> str | None:
    """Unlabelled alternatives are named after their record label, reference or literal."""
    if pattern.key == _REC and _is_record(pattern[0], _LIT):
        return _namelike(pattern[0][0])
    if pattern.key == _REF:
        return str(pattern[1].name)
    if pattern.key == _LIT:
        return _namelike(pattern[0])
    return None


# --- patterns ------------------------------------------------------------------------------


def _pattern(value: Value) -> Value:
    simple = _simple(value)
    return simple if simple is not None else _compound(value)


def _simple(value: Value) -> Value | None:
    """The SimplePattern that ``value`` denotes, or None when it is compound."""
    item = _item(value)
    if isinstance(item, Symbol):
        return _symbol_pattern(item)
    if isinstance(item, Embedded):
        return Record(_EMBEDDED, [_require_simple(item.embeddedValue, "an embedded interface")])
    if isinstance(item, (bool, int, float, str, bytes)):
        return Record(_LIT, [item])
    if isinstance(item, tuple) and len(item) == 2 and _item(item[1]) == _ELLIPSIS:
        return Record(_SEQOF, [_require_simple(item[0], "a sequence element")])
    if isinstance(item, frozenset):
        if len(item) != 1:
            raise _Invalid(f"a set pattern has exactly one element pattern: `{_show([item])}`")
        (element,) = item
        return Record(_SETOF, [_require_simple(element, "a set element")])
    if isinstance(item, dict) and _ELLIPSIS in item:
        return _dictof(item)
    return None


def _symbol_pattern(symbol: Symbol) -> Value:
    name = symbol.name
    if symbol in _RESERVED:
        raise _Invalid(f"unexpected `{name}`")
    if name == "any":
        return _ANY
    if name in _ATOM_KINDS:
        return Record(_ATOM, [Symbol(_ATOM_KINDS[name])])
    if name.startswith("="):  # a bare `=` is reserved, so a name follows
        return Record(_LIT, [Symbol(name[1:])])
    parts = name.split(".")
    if any(not part for part in parts):
        raise _Invalid(f"`{name}` is not a reference (Name or module.Name)")
    return Record(_REF, [tuple(Symbol(p) for p in parts[:-1]), Symbol(parts[-1])])


def _dictof(item: dict[Value, Value]) -> Value:
    entries = [(k, v) for k, v in item.items() if _item(k) != _ELLIPSIS]
    if len(item) != 2 or _item(item[_ELLIPSIS]) != _ELLIPSIS:
        raise _Invalid(f"a dictionary-of pattern is `{{K: V ...:...}}`, got `{_show([item])}`")
    ((key, value),) = entries
    return Record(
        _DICTOF,
        [_require_simple(key, "a dictionary key"), _require_simple(value, "a dictionary value")],
    )


def _compound(value: Value) -> Value:
    item = _item(value)
    if isinstance(item, Record):
        label = _item(item.key)
        if _is_record(label, _REC) and not label.fields:  # <<rec> label fields>
            if len(item.fields) != 2:
                raise _Invalid("`<<rec> label fields>` takes exactly a label and a fields pattern")
            return Record(_REC, [_named(item.fields[0]), _named(item.fields[1])])
        return Record(_REC, [Record(_LIT, [strip_annotations(item.key)]), _fields(item.fields)])
    if isinstance(item, tuple):
        return _fields(item)
    if isinstance(item, dict):
        entries = {
            strip_annotations(k): _named_simple(v, default_name=_namelike(strip_annotations(k)))
            for k, v in item.items()
        }
        return Record(_DICT, [ImmutableDict(entries)])
    raise _Invalid(f"`{_show([value])}` is not a pattern")


def _fields(items: Sequence[Value]) -> Value:
    """Record fields or a sequence: a tuple, or a tuple prefix when it ends in `x ...`."""
    if items and _item(items[-1]) == _ELLIPSIS:
        if len(items) < 2:
            raise _Invalid("`...` must follow the pattern it repeats")
        fixed = tuple(_named(v) for v in items[:-2])
        repeated = Record(_SEQOF, [_require_simple(items[-2], "a repeated pattern")])
        return Record(_TUPLE_PREFIX, [fixed, _bind(_binding_name(items[-2]), repeated)])
    return Record(_TUPLE, [tuple(_named(v) for v in items)])


def _named(value: Value) -> Value:
    """A NamedPattern: ``@name simple`` binds; an unnamed pattern stays anonymous."""
    name = _binding_name(value)
    if name is None:
        return _pattern(value)
    simple = _simple(value)
    if simple is None:
        raise _Invalid(
            f"@{name} names a compound pattern; only simple patterns can be named "
            "(give the compound pattern its own definition and refer to it)"
        )
    return _bind(name, simple)


def _named_simple(value: Value, default_name: str | None) -> Value:
    return _bind(_binding_name(value) or default_name, _require_simple(value, "a dictionary value"))


def _require_simple(value: Value, role: str) -> Value:
    simple = _simple(value)
    if simple is None:
        raise _Invalid(
            f"{role} must be a simple pattern (atom, reference, literal, [x ...], #{{x}}, "
            f"{{k: v ...:...}}), got `{_show([value])}`"
        )
    return simple


def _bind(name: str | None, pattern: Value) -> Value:
    return pattern if name is None else Record(_NAMED, [Symbol(name), pattern])


# --- annotations and small helpers -----------------------------------------------------------


def _item(value: Value) -> Value:
    return value.item if isinstance(value, Annotated) else value


def _binding_name(value: Value) -> str | None:
    """``@name`` is a symbol annotation; string annotations (docs, comments) are not names."""
    if isinstance(value, Annotated):
        for annotation in value.annotations:
            annotation = _item(annotation)
            if isinstance(annotation, Symbol):
                return str(annotation.name)
    return None


def _namelike(value: Value) -> str | None:
    if isinstance(value, Symbol):
        return str(value.name)
    if isinstance(value, str):
        return value
    return None


def _is_record(value: Value, label: Symbol) -> bool:
    return isinstance(value, Record) and _item(value.key) == label


def _show(values: Iterable[Value]) -> str:
    return " ".join(stringify(strip_annotations(v)) for v in values)


def main(argv: list[str] | None = None) -> int:
    """``schemac FILE.prs...``: write the canonical binary bundle of the modules to stdout."""
    paths = [Path(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        usage = "usage: python -m substituter.protocol.schemac FILE.prs... > bundle.prb"
        print(usage, file=sys.stderr)
        return 2
    try:
        value = bundle({p.stem: p.read_text(encoding="utf-8") for p in paths})
    except SchemaError as exc:
        print(f"schemac: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(preserves.canonicalize(value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
