"""The .prs translator, checked against the compiled bundle syndicate-py ships."""

from __future__ import annotations

from pathlib import Path

import preserves
import pytest
import syndicate
from preserves import Record, Symbol, parse

from substituter.errors import ProtocolError, SchemaError
from substituter.protocol import schemac

SYNDICATE_PROTOCOLS = Path(syndicate.__file__).parent / "protocols"
SHIPPED_SCHEMAS = sorted((SYNDICATE_PROTOCOLS / "schemas").glob("*.prs"))


@pytest.fixture(scope="module")
def shipped_bundle() -> dict[str, object]:
    """The schemas inside syndicate-py's schema-bundle.bin, by module name."""
    value = preserves.decode((SYNDICATE_PROTOCOLS / "schema-bundle.bin").read_bytes())
    assert value.key == Symbol("bundle")
    return {path[0].name: schema for path, schema in value[0].items()}


def test_every_shipped_module_has_its_source(shipped_bundle: dict[str, object]) -> None:
    assert {p.stem for p in SHIPPED_SCHEMAS} == set(shipped_bundle)
    assert len(SHIPPED_SCHEMAS) >= 10


@pytest.mark.parametrize("source", SHIPPED_SCHEMAS, ids=lambda p: p.stem)
def test_translation_equals_shipped_compiled_schema(
    source: Path, shipped_bundle: dict[str, object]
) -> None:
    assert schemac.translate(source.read_text()) == shipped_bundle[source.stem]


def test_bundle_of_all_sources_equals_shipped_bundle() -> None:
    shipped = preserves.decode((SYNDICATE_PROTOCOLS / "schema-bundle.bin").read_bytes())
    ours = schemac.bundle({p.stem: p.read_text() for p in SHIPPED_SCHEMAS})
    assert ours == shipped


def test_main_writes_a_binary_bundle(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    sources = [SYNDICATE_PROTOCOLS / "schemas" / n for n in ("stream.prs", "timer.prs")]
    assert schemac.main([str(p) for p in sources]) == 0
    written = preserves.decode(capsysbinary.readouterr().out)
    assert written == schemac.bundle({p.stem: p.read_text() for p in sources})


def test_main_reports_a_bad_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.prs"
    bad.write_text("version 1 .\nBroken = a b .\n")
    assert schemac.main([str(bad)]) == 1
    assert "module bad: line 2, definition Broken" in capsys.readouterr().err


def test_load_text_gives_working_classes() -> None:
    ns = schemac.load("version 1 .\nPing = <ping @seq int @tags #{symbol}> .\n", "demo")
    ping = ns.Ping(7, {Symbol("a")})
    assert preserves.stringify(ping) == "<ping 7 #{a}>"
    assert ns.Ping.decode(preserves.preserve(ping)) == ping
    assert ns.Ping.try_decode(parse("<ping seven #{a}>")) is None


def test_load_path_names_module_after_file(tmp_path: Path) -> None:
    path = tmp_path / "mod.prs"
    path.write_text("version 1 .\nX = <x @v string> .\n")
    ns = schemac.load(path)
    assert ns.X.MODULE_PATH == (Symbol("mod"),)
    assert ns.X("hi").v == "hi"


def test_load_text_needs_a_name() -> None:
    with pytest.raises(TypeError, match="module name"):
        schemac.load("version 1 .")


def _definitions(text: str) -> dict[str, str]:
    """Translate and render each definition as Preserves text, for compact assertions."""
    schema = schemac.translate("version 1 .\n" + text)
    return {
        name.name: preserves.stringify(d)
        for name, d in schema[0][Symbol("definitions")].items()
    }


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("A = any .", "any"),
        ("A = double .", "<atom Double>"),
        ("A = =x .", "<lit x>"),
        ('A = "s" .', '<lit "s">'),
        ("A = 12 .", "<lit 12>"),
        ("A = #t .", "<lit #t>"),
        ('A = #x"0a" .', "<lit #[Cg==]>"),
        ("A = mod.sub.B .", "<ref [mod sub] B>"),
        ("A = #:B .", "<embedded <ref [] B>>"),
        ("A = #{int} .", "<setof <atom SignedInteger>>"),
        ("A = [bytes ...] .", "<seqof <atom ByteString>>"),
        ("A = {string: any ...:...} .", "<dictof <atom String> any>"),
        ("A = [int @s string] .", "<tuple [<atom SignedInteger> <named s <atom String>>]>"),
        (
            "A = [=a @rest int ...] .",
            "<tuplePrefix [<lit a>] <named rest <seqof <atom SignedInteger>>>>",
        ),
        ("A = <a> .", "<rec <lit a> <tuple []>>"),
        (
            "A = <<rec> @l symbol @f [any ...]> .",
            "<rec <named l <atom Symbol>> <named f <seqof any>>>",
        ),
        (
            "A = { k: int, 'v': @other string } .",
            "<dict {k: <named k <atom SignedInteger>> v: <named other <atom String>>}>",
        ),
        (
            "A = @x B & { k: int } .",
            "<and [<named x <ref [] B>> <dict {k: <named k <atom SignedInteger>>}>]>",
        ),
    ],
)
def test_pattern_forms(source: str, expected: str) -> None:
    assert _definitions(source) == {"A": expected}


def test_alternatives_take_labels_from_names_records_refs_and_literals() -> None:
    rendered = _definitions('A = / <p @v int> / @two [any any] / B / =c / "d" .')["A"]
    assert rendered == (
        '<or [["p" <rec <lit p> <tuple [<named v <atom SignedInteger>>]>>] '
        '["two" <tuple [any any]>] ["B" <ref [] B>] ["c" <lit c>] ["d" <lit "d">]]>'
    )


def test_comments_and_doc_annotations_are_not_names() -> None:
    text = '# about A\nA = <a @"docs" @x # why\n int> .\nB = @"Lowercase" symbol .'
    assert _definitions(text) == {
        "A": "<rec <lit a> <tuple [<named x <atom SignedInteger>>]>>",
        "B": "<atom Symbol>",
    }


def test_embedded_type_and_missing_final_dot() -> None:
    schema = schemac.translate("version 1 .\nembeddedType EntityRef.Cap .\nA = any")
    assert schema[0][Symbol("embeddedType")] == Record(
        Symbol("ref"), [(Symbol("EntityRef"),), Symbol("Cap")]
    )
    assert Symbol("A") in schema[0][Symbol("definitions")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A = any .", "missing `version 1 .`"),
        ("version 2 .", "line 1: only `version 1`"),
        ("version 1 .\n\nA = a b .", "line 3, definition A: expected one pattern, found 2 values"),
        ("version 1 .\nA = .", "line 2, definition A: expected one pattern, found nothing"),
        ("version 1 .\nA = <a @x <b>> .", "line 2, definition A: @x names a compound pattern"),
        ("version 1 .\nA = =x / .", "definition A: piece 2 around `/` must be one pattern"),
        ("version 1 .\nA = =x / =x .", "definition A: two alternatives are labelled 'x'"),
        ("version 1 .\nA = [any ...] / =b .", "alternative 1 (`[any ...]`) needs a @name"),
        ("version 1 .\nA = / =x .", "at least two alternatives"),
        ("version 1 .\nA = any .\nA = int .", "line 3, definition A: defined twice"),
        ("version 1 .\nA = = .", "unexpected `=`"),
        ("version 1 .\nA = ... .", "unexpected `...`"),
        ("version 1 .\nA = <a ...> .", "`...` must follow the pattern it repeats"),
        ("version 1 .\nA = #{a b} .", "exactly one element pattern"),
        ("version 1 .\nA = [<x> ...] .", "a sequence element must be a simple pattern"),
        ("version 1 .\nA = {a: b c: d ...:...} .", "a dictionary-of pattern is"),
        ("version 1 .\nA = a..b .", "`a..b` is not a reference"),
        ("version 1 .\nembeddedType any .", "embeddedType must name a definition"),
        ("version 1 .\nx.y = any .", "`x.y` is not a definition name"),
        ("version 1 .\nhello world .", "line 2: expected `Name = pattern .`"),
        ("version 1 .\n\nA = <a @x int", "line 3: unexpected end of input"),
        ("version 1 .\nA = <a ] .", "line 2: Unexpected ]"),
    ],
)
def test_errors_name_the_line_and_definition(text: str, message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        schemac.translate(text)
    assert message in str(caught.value)
    assert isinstance(caught.value, ProtocolError)


def test_trailing_comment_is_not_an_error() -> None:
    assert _definitions("A = any .\n# the end\n") == {"A": "any"}
