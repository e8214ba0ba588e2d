"""Restoring NARs: equal trees both ways with real Nix, round trips, and attacks that must fail."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from substituter.errors import NarError
from substituter.nix.nar import NarParser, dump
from substituter.nix.restore import RestoreSink, restore

from .conftest import Nix
from .test_nar import MAGIC, directory, file_node, make_tree, nar_string, tokens


def describe(root: Path) -> dict[str, tuple[str, bytes | bool]]:
    """What a NAR captures of a tree: kinds, owner-exec bits, contents and link targets."""
    seen: dict[str, tuple[str, bytes | bool]] = {}

    def walk(path: Path, rel: str) -> None:
        st_ = path.lstat()
        if stat.S_ISLNK(st_.st_mode):
            seen[rel] = ("symlink", os.readlink(path).encode())
        elif stat.S_ISDIR(st_.st_mode):
            seen[rel] = ("dir", b"")
            for child in sorted(os.listdir(path)):
                walk(path / child, f"{rel}/{child}")
        else:
            seen[rel] = ("file", bool(st_.st_mode & stat.S_IXUSR))
            seen[rel + ":data"] = ("data", path.read_bytes())

    walk(root, "")
    return seen


def listing(directory_: Path) -> list[str]:
    return sorted(os.listdir(directory_))


@pytest.mark.nix
def test_our_restore_of_nix_dump_equals_the_tree(nix: Nix, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    nar = nix.run("nix-store", "--dump", str(tree))
    out = tmp_path / "out"
    result = restore([nar[i : i + 4096] for i in range(0, len(nar), 4096)], out)
    assert result.nar_size == len(nar)
    assert describe(out) == describe(tree)


@pytest.mark.nix
def test_nix_restore_of_our_dump_equals_the_tree(nix: Nix, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "out"
    nix.run("nix-store", "--restore", str(out), input=b"".join(dump(tree)))
    assert describe(out) == describe(tree)


def test_restored_files_get_store_modes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "out"
    restore(dump(tree), out)
    assert stat.S_IMODE((out / "tool").stat().st_mode) == 0o555
    assert stat.S_IMODE((out / "seven").stat().st_mode) == 0o444
    assert stat.S_IMODE((out / "group-exec-only").stat().st_mode) == 0o444
    assert listing(tmp_path) == ["out", "tree"]  # the temp dir was renamed away


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_restore_of_a_non_directory_root(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    if kind == "file":
        src.write_bytes(b"data")
    else:
        src.symlink_to("/absolute/target")
    out = tmp_path / "out"
    restore(dump(src), out)
    assert describe(out) == describe(src)


def test_restore_refuses_an_existing_target(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        restore([MAGIC + file_node()], tmp_path / "out")
    assert listing(tmp_path) == ["out"]


# -- attacks --------------------------------------------------------------------------


def entry(name: bytes, node: bytes) -> bytes:
    return tokens(b"entry", b"(", b"name", name) + nar_string(b"node") + node + tokens(b")")


def symlink_node(target: bytes) -> bytes:
    return tokens(b"(", b"type", b"symlink", b"target", target, b")")


def unsorted_directory(*entries: bytes) -> bytes:
    return tokens(b"(", b"type", b"directory") + b"".join(entries) + tokens(b")")


ATTACKS = {
    "dot-dot": MAGIC + directory((b"..", file_node(b"pwned"))),
    "dot": MAGIC + directory((b".", file_node(b"pwned"))),
    "slash": MAGIC + directory((b"sub/../../escape", file_node(b"pwned"))),
    "absolute": MAGIC + directory((b"/tmp/escape", file_node(b"pwned"))),
    "nul": MAGIC + directory((b"a\0b", file_node(b"pwned"))),
    "duplicate": MAGIC + directory((b"a", file_node(b"one")), (b"a", file_node(b"two"))),
    # a symlink to the outside, then the same name again as a directory to write through it
    "write-through-symlink": MAGIC
    + unsorted_directory(
        entry(b"a", symlink_node(b"OUTSIDE")),
        entry(b"a", directory((b"pwned", file_node(b"pwned")))),
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_are_rejected_and_leave_nothing(tmp_path: Path, attack: str) -> None:
    work = tmp_path / "work"
    outside = tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    nar = ATTACKS[attack].replace(b"OUTSIDE", str(outside).encode())
    with pytest.raises(NarError):
        restore([nar], work / "out")
    assert listing(work) == []  # no target, no temp dir
    assert listing(outside) == []
    assert listing(tmp_path) == ["outside", "work"]


def test_sink_itself_refuses_to_write_through_its_symlink(tmp_path: Path) -> None:
    """Without the parser's checks the sink must still never follow what it created."""
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    with RestoreSink(work / "out") as sink:
        sink.directory_start()
        sink.entry(b"a")
        sink.symlink(str(outside).encode())
        sink.entry(b"a")
        with pytest.raises(FileExistsError):
            sink.directory_start()
        sink.entry(b"a")
        with pytest.raises(FileExistsError):
            sink.file_start(False, 1)
        for bad in (b"..", b".", b"a/b", b"x\0", b""):
            with pytest.raises(NarError):
                sink.entry(bad)
    assert listing(outside) == []
    assert listing(work) == []


def test_sink_removes_its_work_when_the_stream_fails_midway(tmp_path: Path) -> None:
    nar = b"".join(dump(make_tree(tmp_path / "tree")))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(NarError, match="truncated"):
        restore([nar[: len(nar) // 2]], work / "out")
    assert listing(work) == []


def test_restore_sink_streams_from_a_parser(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    with RestoreSink(tmp_path / "out") as sink:
        parser = NarParser(sink)
        for chunk in dump(tree):
            parser.feed(chunk)
        parser.finish()
        sink.commit()
    assert describe(tmp_path / "out") == describe(tree)


# -- property: dump → parse → restore → dump is the identity ------------------------------

names = st.binary(min_size=1, max_size=12).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n
)
leaves = st.one_of(
    st.tuples(st.just("file"), st.binary(max_size=300), st.booleans()),
    st.tuples(st.just("symlink"), st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)),
)
trees = st.recursive(
    leaves,
    lambda children: st.tuples(st.just("dir"), st.dictionaries(names, children, max_size=5)),
    max_leaves=20,
)


def build(path: bytes, node: tuple[object, ...]) -> None:
    if node[0] == "file":
        data, executable = node[1], node[2]
        assert isinstance(data, bytes)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o755 if executable else 0o644)
    elif node[0] == "symlink":
        assert isinstance(node[1], bytes)
        os.symlink(node[1], path)
    else:
        os.mkdir(path)
        children = node[1]
        assert isinstance(children, dict)
        for name, child in children.items():
            build(path + b"/" + name, child)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_round_trip_is_the_identity(
    tmp_path_factory: pytest.TempPathFactory, tree: tuple[object, ...]
) -> None:
    base = tmp_path_factory.mktemp("rt")
    src = base / "src"
    build(os.fsencode(src), tree)
    nar = b"".join(dump(src))
    out = base / "out"
    result = restore([nar[i : i + 7] for i in range(0, len(nar), 7)], out)
    assert result.nar_size == len(nar)
    assert b"".join(dump(out)) == nar
