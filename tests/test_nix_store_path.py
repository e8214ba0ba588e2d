from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from substituter.errors import StorePathError
from substituter.nix import base32
from substituter.nix.hashes import Hash
from substituter.nix.store_path import (
    DEFAULT_STORE_DIR,
    ContentAddress,
    StorePath,
    ca_path,
    make_fixed_output_path,
    make_source_path,
    make_store_path,
    make_text_path,
    parse_content_address,
    validate_hash_part,
    validate_name,
)
from tests.conftest import Nix

HASH_PART = "xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c"


# -- parsing and rules --------------------------------------------------------------------


def test_parse_full_path_and_base_name() -> None:
    full = StorePath.parse(f"/nix/store/{HASH_PART}-hello-2.12")
    assert full == StorePath(HASH_PART, "hello-2.12")
    assert full.base_name == f"{HASH_PART}-hello-2.12"
    assert full.path() == f"/nix/store/{HASH_PART}-hello-2.12"
    assert full.path("/tmp/s") == f"/tmp/s/{HASH_PART}-hello-2.12"
    assert StorePath.parse(f"{HASH_PART}-hello-2.12") == full
    assert StorePath.parse(f"/tmp/s/{HASH_PART}-x", store_dir="/tmp/s").name == "x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"/other/store/{HASH_PART}-x", "not in the store directory"),
        (f"/nix/store/{HASH_PART}-x/bin/sh", "inside a store path"),
        (f"{HASH_PART}x", "not '<32 hash characters>-<name>'"),
        (f"{HASH_PART}-", "not '<32 hash characters>-<name>'"),
        (f"{HASH_PART[:31]}e-x", "outside nix32: 'e'"),
        (f"{HASH_PART[:-1]}-xy", "not '<32 hash characters>-<name>'"),
    ],
)
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(StorePathError, match=message):
        StorePath.parse(text)


def test_validate_hash_part() -> None:
    assert validate_hash_part(HASH_PART) == HASH_PART
    with pytest.raises(StorePathError, match="has 31 characters, expected 32"):
        validate_hash_part(HASH_PART[:31])
    with pytest.raises(StorePathError, match="outside nix32: 'Xu'"):
        validate_hash_part("X" + HASH_PART[1:-1] + "u")


@pytest.mark.parametrize(
    "name", ["a", "hello-2.12", "x+y_z?=.", "...", ".a", "..a", "a" * 211, "-", "a..-"]
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("a" * 212, "longer than 211"),
        ("a b", r"forbidden characters ' '"),
        ("caf\u00e9", "forbidden characters"),
        ("a/b", "forbidden characters '/'"),
        (".", "not allowed"),
        ("..", "not allowed"),
        (".-foo", "must not start with"),
        ("..-foo", "must not start with"),
    ],
)
def test_name_rejections(name: str, message: str) -> None:
    with pytest.raises(StorePathError, match=message):
        validate_name(name)
    with pytest.raises(StorePathError):
        StorePath(HASH_PART, name)


# -- computation against real Nix ----------------------------------------------------------


def nar_hash(nix: Nix, path: Path) -> Hash:
    return Hash("sha256", hashlib.sha256(nix.run("nix-store", "--dump", str(path))).digest())


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    stamp = str(time.time_ns())
    file = tmp_path / "payload.txt"
    file.write_text(f"payload {stamp}\n")
    directory = tmp_path / "tree"
    (directory / "sub").mkdir(parents=True)
    (directory / "sub" / "data").write_text(stamp)
    (directory / "run").write_text("#!/bin/sh\n")
    (directory / "run").chmod(0o755)
    (directory / "link").symlink_to("sub/data")
    return file, directory


@pytest.mark.nix
def test_source_paths_match_nix_store_add(nix: Nix, sources: tuple[Path, Path]) -> None:
    for source in sources:
        added = nix.text("nix-store", "--add", str(source))
        computed = make_source_path(nar_hash(nix, source), source.name)
        assert computed.path() == added
        recursive = nix.text("nix-store", "--add-fixed", "--recursive", "sha256", str(source))
        assert (
            make_fixed_output_path(source.name, "recursive", nar_hash(nix, source)).path()
            == recursive
        )
        assert recursive == added


@pytest.mark.nix
@pytest.mark.parametrize("algorithm", ["sha256", "sha1", "sha512", "md5"])
def test_flat_fixed_output_matches_nix(
    nix: Nix, sources: tuple[Path, Path], algorithm: str
) -> None:
    file, _ = sources
    added = nix.text("nix-store", "--add-fixed", algorithm, str(file))
    flat = Hash.of_bytes(file.read_bytes(), algorithm)
    assert make_fixed_output_path(file.name, "flat", flat).path() == added


@pytest.mark.nix
@pytest.mark.parametrize("algorithm", ["sha1", "sha512"])
def test_recursive_non_sha256_matches_nix(
    nix: Nix, sources: tuple[Path, Path], algorithm: str
) -> None:
    _, directory = sources
    added = nix.text("nix-store", "--add-fixed", "--recursive", algorithm, str(directory))
    nar = nix.run("nix-store", "--dump", str(directory))
    computed = make_fixed_output_path(directory.name, "recursive", Hash.of_bytes(nar, algorithm))
    assert computed.path() == added
    assert computed != make_source_path(Hash.of_bytes(nar), directory.name)


@pytest.mark.nix
def test_text_paths_match_builtins_to_file(nix: Nix) -> None:
    stamp = time.time_ns()
    printed = nix.text("nix-instantiate", "--eval", "-E", f'builtins.toFile "note" "text {stamp}"')
    assert printed.startswith('"/nix/store/') and printed.endswith('-note"')
    assert make_text_path("note", f"text {stamp}".encode()).path() == printed.strip('"')

    # A text path that refers to another: the reference is part of the type.
    with_ref = nix.text(
        "nix-instantiate",
        "--eval",
        "-E",
        f'let dep = builtins.toFile "dep" "{stamp}"; in builtins.toFile "user" "uses ${{dep}}"',
    ).strip('"')
    dep = make_text_path("dep", str(stamp).encode())
    content = f"uses {dep.path()}".encode()
    assert make_text_path("user", content, [dep]).path() == with_ref
    assert make_text_path("user", content, [dep.path()]).path() == with_ref
    assert make_text_path("user", content).path() != with_ref


def path_info(nix: Nix, *paths: str) -> list[dict[str, Any]]:
    infos: list[dict[str, Any]] = json.loads(nix.run("nix", "path-info", "--json", *paths))
    return infos


@pytest.mark.nix
def test_ca_path_recomputes_nix_ca_fields(nix: Nix, sources: tuple[Path, Path]) -> None:
    file, directory = sources
    stamp = time.time_ns()
    # --read-write-mode makes evaluation really write the files, so path-info sees them.
    dep = nix.text(
        "nix-instantiate", "--eval", "--read-write-mode", "-E", f'builtins.toFile "d" "{stamp}"'
    ).strip('"')
    text_with_ref = nix.text(
        "nix-instantiate",
        "--eval",
        "--read-write-mode",
        "-E",
        f'let d = builtins.toFile "d" "{stamp}"; in builtins.toFile "t" "${{d}}"',
    ).strip('"')
    paths = [
        nix.text("nix-store", "--add", str(directory)),
        nix.text("nix-store", "--add-fixed", "sha256", str(file)),
        nix.text("nix-store", "--add-fixed", "--recursive", "sha512", str(directory)),
        dep,
        text_with_ref,
    ]
    infos = path_info(nix, *paths)
    assert {info["path"] for info in infos} == set(paths)
    kinds = set()
    for info in infos:
        ca = info["ca"]
        assert isinstance(ca, str)
        kinds.add(ca.split(":")[0] + (":r" if ca.startswith("fixed:r:") else ""))
        own = StorePath.parse(str(info["path"]))
        refs = [r for r in info["references"] if r != info["path"]]
        assert ca_path(ca, own.name, refs) == own
        assert str(parse_content_address(ca)) == ca
        # The same CA under another name is another path.
        assert ca_path(ca, own.name + "x", refs) != own
    assert kinds == {"text", "fixed", "fixed:r"}


def test_make_store_path_fingerprint() -> None:
    # The fingerprint documented for `nix-store --add myfile` containing "mycontent\n".
    inner = Hash.parse("sha256:2bfef67de873c54551d884fdab3055d84d573e654efa79db3c0d7b98883f9ee3")
    path = make_store_path("source", inner, "myfile")
    expected = hashlib.sha256(
        f"source:sha256:{inner.hex()}:{DEFAULT_STORE_DIR}:myfile".encode()
    ).digest()
    folded = bytearray(20)
    for i, b in enumerate(expected):
        folded[i % 20] ^= b
    assert path.hash_part == base32.encode(bytes(folded))
    assert make_store_path("source", inner, "myfile", store_dir="/other") != path


def test_fixed_output_rules() -> None:
    h = Hash.of_bytes(b"x", "sha1")
    with pytest.raises(StorePathError, match="cannot have references"):
        make_fixed_output_path("x", "flat", h, references=[f"{HASH_PART}-y"])
    with pytest.raises(StorePathError, match="'flat' or 'recursive'"):
        make_fixed_output_path("x", "text", h)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ca", "message"),
    [
        ("sha256:abc", "is not 'text:<hash>'"),
        ("text:sha1:" + "0" * 40, "text hashes must be sha256"),
        ("fixed:r:sha256:xyz", "bad hash"),
        ("fixed", "is not 'text:<hash>'"),
    ],
)
def test_content_address_rejections(ca: str, message: str) -> None:
    with pytest.raises(StorePathError, match=message):
        parse_content_address(ca)


def test_content_address_parse() -> None:
    h = Hash.of_bytes(b"x")
    assert parse_content_address(f"fixed:r:{h}") == ContentAddress("fixed", "recursive", h)
    assert parse_content_address(f"fixed:{h}") == ContentAddress("fixed", "flat", h)
    assert parse_content_address(f"text:{h}") == ContentAddress("text", "flat", h)
