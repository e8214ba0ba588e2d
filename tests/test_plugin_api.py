"""The plugin API (substituter.plugin): options from config and --option strings, discovery of
plugins through entry points, and the function-backed fetcher."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fetchers.binary_cache import BinaryCacheFetcher
from substituter.errors import ConfigError, PluginError
from substituter.nix.hashes import Hash
from substituter.nix.narinfo import NarInfo
from substituter.plugin import (
    BLOCK_ENV,
    BUILTIN_FETCHERS,
    ENTRY_POINT_GROUP,
    Answer,
    Fetcher,
    FetcherContext,
    FunctionFetcher,
    NoOptions,
    Offer,
    Unavailable,
    available_fetcher_types,
    describe_options,
    load_fetcher_type,
    parse_options,
)

HASH = "0" * 32


@dataclass(frozen=True)
class AllTypes:
    url: str = field(metadata={"help": "where to fetch from"})
    retries: int = 3
    timeout: float = 2.5
    enabled: bool = True
    root: Path = Path("/srv/cache")
    mirrors: list[str] = field(default_factory=list)
    ports: tuple[int, ...] = (80,)
    limit: int | None = None
    token_file: Path | None = field(default=None, metadata={"help": "a secret"})

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"option 'retries' must be 0 or more, got {self.retries}")


def parse(raw: dict[str, Any]) -> AllTypes:
    result: AllTypes = parse_options(AllTypes, raw, "fetchers[0]")
    return result


# --- parse_options ---------------------------------------------------------------------------


def test_defaults_fill_everything_but_required() -> None:
    assert parse({"url": "http://x"}) == AllTypes(url="http://x")


def test_every_type_from_command_line_strings() -> None:
    options = parse({
        "url": "http://x", "retries": "7", "timeout": "0.25", "enabled": "no", "root": "/tmp/r",
        "mirrors": "a,b,,c", "ports": "1,2", "limit": "9", "token-file": "/run/t",
    })
    assert options == AllTypes(
        url="http://x", retries=7, timeout=0.25, enabled=False, root=Path("/tmp/r"),
        mirrors=["a", "b", "c"], ports=(1, 2), limit=9, token_file=Path("/run/t"),
    )
    assert isinstance(options.root, Path) and isinstance(options.ports, tuple)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True),
     ("false", False), ("0", False), ("No", False)],
)
def test_bool_strings(text: str, value: bool) -> None:
    assert parse({"url": "u", "enabled": text}).enabled is value


def test_native_toml_values() -> None:
    options = parse({"url": "u", "retries": 0, "timeout": 3, "enabled": False,
                     "mirrors": ["m"], "ports": [8080], "limit": None})
    assert (options.retries, options.timeout, options.enabled) == (0, 3.0, False)
    assert isinstance(options.timeout, float)
    assert (options.mirrors, options.ports, options.limit) == (["m"], (8080,), None)


def test_snake_case_keys_are_accepted_too() -> None:
    assert parse({"url": "u", "token_file": "/t"}).token_file == Path("/t")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("retries", "many", r"fetchers\[0\]\.retries: expected an integer, got 'many'"),
        ("retries", True, r"fetchers\[0\]\.retries: expected an integer, got True"),
        ("timeout", "soon", r"fetchers\[0\]\.timeout: expected a number, got 'soon'"),
        ("enabled", "maybe", r"fetchers\[0\]\.enabled: expected true or false, got 'maybe'"),
        ("enabled", 1, r"fetchers\[0\]\.enabled: expected true or false, got 1"),
        ("root", 5, r"fetchers\[0\]\.root: expected a path, got 5"),
        ("mirrors", 5, r"fetchers\[0\]\.mirrors: expected a list, got int"),
        ("ports", ["80", "x"], r"fetchers\[0\]\.ports\[1\]: expected an integer, got 'x'"),
        ("limit", "lots", r"fetchers\[0\]\.limit: expected an integer, got 'lots'"),
    ],
)
def test_wrong_types_name_the_option(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse({"url": "u", key: value})


def test_url_must_be_a_string() -> None:
    with pytest.raises(ConfigError, match=r"fetchers\[0\]\.url: expected a string, got 5"):
        parse({"url": 5})


def test_unknown_option_is_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"url": "u", "retires": 3})
    message = str(info.value)
    assert "fetchers[0]: unknown option 'retires'" in message
    assert "known options: enabled, limit, mirrors, ports, retries, root, timeout, token-file, url" \
        in message


def test_missing_required_option() -> None:
    with pytest.raises(ConfigError, match=r"fetchers\[0\]: option 'url' is required"):
        parse({"retries": 1})


def test_validation_in_the_dataclass_becomes_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"fetchers\[0\]: option 'retries' must be 0 or more, got -1"):
        parse({"url": "u", "retries": "-1"})


def test_no_options_accepts_nothing() -> None:
    assert parse_options(NoOptions, {}, "x") == NoOptions()
    with pytest.raises(ConfigError, match="unknown option 'url' .known options: none"):
        parse_options(NoOptions, {"url": "u"}, "x")


def test_options_must_be_a_dataclass() -> None:
    class NotADataclass:
        url: str

    with pytest.raises(PluginError, match="x: the plugin's Options is not a dataclass"):
        parse_options(NotADataclass, {}, "x")


# --- describe_options ------------------------------------------------------------------------


def test_describe_options() -> None:
    docs = {doc.name: doc for doc in describe_options(AllTypes)}
    assert list(docs) == ["url", "retries", "timeout", "enabled", "root", "mirrors", "ports",
                          "limit", "token-file"]
    assert (docs["url"].type, docs["url"].default, docs["url"].help) == \
        ("str", "(required)", "where to fetch from")
    assert (docs["retries"].type, docs["retries"].default, docs["retries"].help) == ("int", "3", "")
    assert (docs["enabled"].type, docs["enabled"].default) == ("bool", "True")
    assert docs["root"].default == repr(Path("/srv/cache"))
    assert docs["mirrors"].default == "[]"  # from the default factory
    assert docs["mirrors"].type == "list[str]"
    assert docs["limit"].type == "int | None" and docs["limit"].default == "None"
    assert docs["token-file"].help == "a secret"


def test_describe_a_builtin_plugin() -> None:
    docs = {doc.name: doc for doc in describe_options(BinaryCacheFetcher.Options)}
    assert docs["url"].default == "(required)" and docs["url"].help
    assert all(doc.help for doc in docs.values()), "every built-in option documents itself"


# --- discovery ---------------------------------------------------------------------------------


def test_builtins_load_through_the_entry_point_group() -> None:
    assert load_fetcher_type("binary-cache") is BinaryCacheFetcher
    installed = available_fetcher_types()
    assert {"binary-cache", "local-mirror"} <= set(installed)
    assert all(ep.group == ENTRY_POINT_GROUP for ep in installed.values())


def test_builtin_table_is_what_the_package_registers() -> None:
    installed = available_fetcher_types()
    assert {kind: installed[kind].value for kind in BUILTIN_FETCHERS} == BUILTIN_FETCHERS


def test_a_builtin_loads_without_scanning_installed_plugins() -> None:
    # A fresh interpreter: importlib.metadata (and the scan) stays out of a one-off fetch.
    code = ("import sys; from substituter.plugin import load_fetcher_type; "
            "cls = load_fetcher_type('local-mirror'); "
            "print(cls.__module__, 'importlib.metadata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["fetchers.local_mirror", "False"]


def test_a_builtin_kind_registered_by_another_plugin_loads_the_builtin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_entry_points(monkeypatch, ("binary-cache", f"{__name__}:MislabelledFetcher"))
    assert load_fetcher_type("binary-cache") is BinaryCacheFetcher
    # the listing (`substituter plugins`) still shows what is registered
    assert available_fetcher_types()["binary-cache"].value == f"{__name__}:MislabelledFetcher"


def test_unknown_kind_lists_the_installed_ones() -> None:
    with pytest.raises(PluginError) as info:
        load_fetcher_type("gopher")
    message = str(info.value)
    assert "no fetcher plugin of type 'gopher' is installed" in message
    assert "binary-cache" in message and "local-mirror" in message


def test_blocked_plugin_is_neither_listed_nor_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BLOCK_ENV, " local-mirror , other")
    assert "local-mirror" not in available_fetcher_types()
    assert "binary-cache" in available_fetcher_types()
    with pytest.raises(PluginError, match="no fetcher plugin of type 'local-mirror' is installed"):
        load_fetcher_type("local-mirror")
    monkeypatch.delenv(BLOCK_ENV)
    assert "local-mirror" in available_fetcher_types()


class NotAFetcher:
    kind = "not-a-fetcher"


class MislabelledFetcher(FunctionFetcher):
    kind = "something-else"


def use_entry_points(monkeypatch: pytest.MonkeyPatch, *pairs: tuple[str, str]) -> None:
    eps = [importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in pairs]

    def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
        return [ep for ep in eps if ep.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_two_plugins_claiming_one_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, ("dup", "one.module:A"), ("dup", "other.module:B"))
    with pytest.raises(PluginError, match="two plugins claim fetcher type 'dup': one.module:A and other.module:B"):
        available_fetcher_types()


def test_the_same_registration_seen_twice_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. an editable install visible through two site directories
    use_entry_points(monkeypatch, ("binary-cache", "fetchers.binary_cache:BinaryCacheFetcher"),
                     ("binary-cache", "fetchers.binary_cache:BinaryCacheFetcher"))
    assert load_fetcher_type("binary-cache") is BinaryCacheFetcher


def test_plugin_that_fails_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, ("broken", "no_such_module_here:Fetcher"))
    with pytest.raises(PluginError, match=r"fetcher plugin 'broken' \(no_such_module_here:Fetcher\) failed to load"):
        load_fetcher_type("broken")


def test_entry_point_that_is_not_a_fetcher(monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, ("not-a-fetcher", f"{__name__}:NotAFetcher"))
    with pytest.raises(PluginError, match="is not a Fetcher subclass"):
        load_fetcher_type("not-a-fetcher")


def test_class_kind_must_match_its_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, ("registered-name", f"{__name__}:MislabelledFetcher"))
    with pytest.raises(PluginError, match="declares kind 'something-else', but is registered as 'registered-name'"):
        load_fetcher_type("registered-name")


# --- Fetcher and FunctionFetcher ---------------------------------------------------------------


def narinfo() -> NarInfo:
    return NarInfo(store_path=f"/nix/store/{HASH}-x", url="nar/x.nar",
                   nar_hash=Hash.of_bytes(b"nar"), nar_size=3, compression="none")


async def test_function_fetcher_delegates_to_its_functions() -> None:
    calls: list[tuple[str, Any]] = []
    offer = Offer(info=narinfo(), uri="mem:x")

    async def locate(hash_part: str) -> Answer:
        calls.append(("locate", hash_part))
        return offer if hash_part == HASH else Unavailable("only one path here")

    async def open_(o: Offer, offset: int) -> AsyncIterator[bytes]:
        calls.append(("open", offset))
        yield b"nar"[offset:]

    fetcher = FunctionFetcher("fn", locate, open_, priority=7)
    await fetcher.start()
    assert (fetcher.name, fetcher.kind, fetcher.priority, fetcher.options) == ("fn", "function", 7, NoOptions())
    assert await fetcher.locate(HASH) is offer
    assert await fetcher.locate("1" * 32) == Unavailable("only one path here")
    assert [chunk async for chunk in fetcher.open(offer, 1)] == [b"ar"]
    await fetcher.stop()
    assert calls == [("locate", HASH), ("locate", "1" * 32), ("open", 1)]
    assert fetcher.describe() == "function"


def test_offer_defaults_describe_an_uncompressed_unknown_file() -> None:
    offer = Offer(info=narinfo(), uri="mem:x")
    assert (offer.compression, offer.file_size, offer.file_hash, offer.cost) == ("none", None, None, 0)


def test_fetcher_is_abstract_and_takes_default_priority() -> None:
    class Half(Fetcher):
        kind = "half"

    with pytest.raises(TypeError, match="abstract"):
        Half("h", NoOptions())  # type: ignore[abstract]

    class Whole(Half):
        default_priority = 20

        async def locate(self, hash_part: str) -> Answer:
            return Unavailable("never")

        async def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
            yield b""

    whole = Whole("w", NoOptions())
    assert whole.priority == 20 and Whole("w", NoOptions(), priority=3).priority == 3
    assert whole.context == FetcherContext() and whole.context.store_dir == "/nix/store"
