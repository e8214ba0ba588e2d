"""NAR parser, verifier and writer: byte for byte against real Nix, and every strictness rule."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from substituter.errors import HashMismatch, NarError, SizeMismatch
from substituter.nix.nar import NarParser, NarVerifier, dump

from .conftest import Nix


def make_tree(root: Path) -> Path:
    """A tree with every kind of node Nix can archive, and names that test the sort order."""
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "seven").write_bytes(b"1234567")  # needs padding
    (root / "eight").write_bytes(b"12345678")  # needs none
    (root / "big").write_bytes(os.urandom(1 << 20) + b"tail")
    tool = root / "tool"
    tool.write_bytes(b"#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    (root / "owner-only-exec").write_bytes(b"x")
    (root / "owner-only-exec").chmod(0o700)
    (root / "group-exec-only").write_bytes(b"x")
    (root / "group-exec-only").chmod(0o654)  # Nix ignores all but the owner's x bit
    (root / "empty-dir").mkdir()
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("leaf\n")
    (root / "link-rel").symlink_to("a/b/c/leaf")
    (root / "link-abs").symlink_to("/etc/hostname")
    (root / "link-dangling").symlink_to("does/not/exist")
    (root / "with space").write_text("space")
    (root / "ünïcødé").write_text("unicode")
    for name in ("B", "a-", "a.", "a_", "Z", "~", "ä", "0"):  # bytewise, not locale, order
        (root / name).write_text(name)
    return root


def nar_string(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def tokens(*parts: bytes) -> bytes:
    return b"".join(nar_string(p) for p in parts)


def feed_in(parser: NarParser, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        parser.feed(data[i : i + chunk])


@pytest.mark.nix
def test_dump_is_byte_identical_to_nix(nix: Nix, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    ours = b"".join(dump(tree))
    assert ours == nix.run("nix-store", "--dump", str(tree))
    nix_hex = nix.text("nix-hash", "--type", "sha256", str(tree))
    assert hashlib.sha256(ours).hexdigest() == nix_hex


@pytest.mark.nix
@pytest.mark.parametrize("kind", ["file", "executable", "symlink", "empty-dir"])
def test_dump_of_single_node_roots(nix: Nix, tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    if kind == "symlink":
        root.symlink_to("/nowhere")
    elif kind == "empty-dir":
        root.mkdir()
    else:
        root.write_bytes(b"contents")
        root.chmod(0o755 if kind == "executable" else 0o644)
    assert b"".join(dump(root)) == nix.run("nix-store", "--dump", str(root))


@pytest.mark.nix
def test_parser_hash_and_size_match_nix_path_info(nix: Nix) -> None:
    top, _ = nix.closure("nar-info")
    nar = nix.run("nix-store", "--dump", top)
    parser = NarParser()
    feed_in(parser, nar, 4096)
    result = parser.finish()
    info = nix.text("nix", "path-info", "--json", top)
    assert f'"narSize":{result.nar_size}' in info.replace(" ", "")
    nix_hex = nix.text("nix-store", "--query", "--hash", top)  # sha256:<nix32>
    assert nix.text("nix-hash", "--type", "sha256", "--to-base16", nix_hex.split(":")[1]) == (
        result.nar_hash.hex()
    )


@pytest.mark.parametrize("chunk", [1, 3, 8, 4096, 1 << 30])
def test_parser_accepts_any_chunking(tmp_path: Path, chunk: int) -> None:
    nar = b"".join(dump(make_tree(tmp_path / "tree")))
    parser = NarParser()
    feed_in(parser, nar, chunk)
    result = parser.finish()
    assert result.nar_size == len(nar)
    assert result.nar_hash == hashlib.sha256(nar).digest()
    assert parser.nar_hash_digest() == result.nar_hash


class Recorder:
    """A sink that writes every event down."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def directory_start(self) -> None:
        self.events.append(("dir",))

    def directory_end(self) -> None:
        self.events.append(("end",))

    def entry(self, name: bytes) -> None:
        self.events.append(("entry", name))

    def file_start(self, executable: bool, size: int) -> None:
        self.events.append(("file", executable, size, bytearray()))

    def file_data(self, chunk: memoryview) -> None:
        last = self.events[-1][3]
        assert isinstance(last, bytearray)
        last += chunk

    def file_end(self) -> None:
        self.events.append(("file-end",))

    def symlink(self, target: bytes) -> None:
        self.events.append(("symlink", target))


def test_sink_sees_the_tree_in_order(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "x").write_bytes(b"hello")
    (root / "d" / "x").chmod(0o755)
    (root / "l").symlink_to("d/x")
    recorder = Recorder()
    parser = NarParser(recorder)
    feed_in(parser, b"".join(dump(root)), 1)
    parser.finish()
    assert recorder.events == [
        ("dir",),
        ("entry", b"d"),
        ("dir",),
        ("entry", b"x"),
        ("file", True, 5, bytearray(b"hello")),
        ("file-end",),
        ("end",),
        ("entry", b"l"),
        ("symlink", b"d/x"),
        ("end",),
    ]


def test_verifier_accepts_the_right_hash_and_size(tmp_path: Path) -> None:
    nar = b"".join(dump(make_tree(tmp_path / "tree")))
    verifier = NarVerifier(hashlib.sha256(nar).digest(), len(nar))
    feed_in(verifier, nar, 65536)
    assert verifier.finish().nar_size == len(nar)


def test_verifier_rejects_a_wrong_hash(tmp_path: Path) -> None:
    nar = b"".join(dump(make_tree(tmp_path / "tree")))
    verifier = NarVerifier(hashlib.sha256(b"other").digest(), len(nar))
    verifier.feed(nar)
    with pytest.raises(HashMismatch, match="sha256 is"):
        verifier.finish()


def test_verifier_stops_at_the_first_byte_over_the_size(tmp_path: Path) -> None:
    nar = b"".join(dump(make_tree(tmp_path / "tree")))
    verifier = NarVerifier(hashlib.sha256(nar).digest(), 100)
    verifier.feed(nar[:100])
    with pytest.raises(SizeMismatch, match="longer than its NarSize 100"):
        verifier.feed(nar[100:101])
    assert verifier.nar_size == 100


def test_verifier_rejects_a_short_stream(tmp_path: Path) -> None:
    nar = b"".join(dump(make_tree(tmp_path / "tree")))
    verifier = NarVerifier(hashlib.sha256(nar).digest(), len(nar))
    verifier.feed(nar[:-8])
    with pytest.raises(SizeMismatch, match="shorter than its NarSize"):
        verifier.finish()


# -- strictness: one crafted archive per rule -------------------------------------------

MAGIC = nar_string(b"nix-archive-1")


def file_node(contents: bytes = b"hi") -> bytes:
    return tokens(b"(", b"type", b"regular", b"contents", contents, b")")


def directory(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(
        tokens(b"entry", b"(", b"name", n) + nar_string(b"node") + node + tokens(b")") for n, node in entries
    )
    return tokens(b"(", b"type", b"directory") + body + tokens(b")")


def nested(depth: int) -> bytes:
    node = file_node()
    for _ in range(depth):
        node = directory((b"d", node))
    return node


def bad_padding_in_tag() -> bytes:
    token = bytearray(nar_string(b"("))
    token[-1] = 1
    return MAGIC + bytes(token)


def bad_padding_after_contents() -> bytes:
    nar = bytearray(MAGIC + file_node(b"abc"))
    offset = nar.index(b"abc") + 3
    nar[offset] = 0xFF
    return bytes(nar)


BAD_NARS: dict[str, tuple[Callable[[], bytes], str]] = {
    "bad magic": (lambda: nar_string(b"nix-archive-2") + file_node(), "bad magic"),
    "empty stream": (lambda: b"", "truncated"),
    "truncated mid-file": (lambda: (MAGIC + file_node(b"x" * 64))[:-40], "truncated"),
    "non-zero padding in a tag": (bad_padding_in_tag, "non-zero padding after tag"),
    "non-zero padding after contents": (bad_padding_after_contents, "non-zero padding after file"),
    "node without '('": (lambda: MAGIC + tokens(b"type", b"regular"), "expected '(' to open"),
    "node without 'type'": (lambda: MAGIC + tokens(b"(", b"regular"), "expected 'type'"),
    "unknown type": (lambda: MAGIC + tokens(b"(", b"type", b"fifo", b")"), "unknown node type"),
    "executable after contents": (
        lambda: MAGIC + tokens(b"(", b"type", b"regular", b"contents", b"x", b"executable", b"", b")"),
        "'executable' after 'contents'",
    ),
    "executable twice": (
        lambda: (
            MAGIC
            + tokens(
                b"(", b"type", b"regular", b"executable", b"", b"executable", b"", b"contents", b"x", b")"
            )
        ),
        "'executable' twice",
    ),
    "executable marker not empty": (
        lambda: MAGIC + tokens(b"(", b"type", b"regular", b"executable", b"yes", b"contents", b"x", b")"),
        "executable marker must be the empty string",
    ),
    "regular without contents": (
        lambda: MAGIC + tokens(b"(", b"type", b"regular", b")"),
        "has no 'contents'",
    ),
    "second contents": (
        lambda: MAGIC + tokens(b"(", b"type", b"regular", b"contents", b"x", b"contents", b"y", b")"),
        "a second 'contents'",
    ),
    "second type": (
        lambda: MAGIC + tokens(b"(", b"type", b"symlink", b"target", b"x", b"type", b"regular", b")"),
        "a second 'type'",
    ),
    "symlink without target": (
        lambda: MAGIC + tokens(b"(", b"type", b"symlink", b")"),
        "expected 'target'",
    ),
    "empty symlink target": (
        lambda: MAGIC + tokens(b"(", b"type", b"symlink", b"target", b"", b")"),
        "symlink target is empty",
    ),
    "NUL in symlink target": (
        lambda: MAGIC + tokens(b"(", b"type", b"symlink", b"target", b"a\0b", b")"),
        "contains NUL",
    ),
    "symlink target too long": (
        lambda: MAGIC + tokens(b"(", b"type", b"symlink", b"target", b"a" * 4096, b")"),
        "symlink target is 4096 bytes, over the limit of 4095",
    ),
    "tag too long": (lambda: MAGIC + tokens(b"(" * 33), "tag is 33 bytes, over the limit of 32"),
    "huge length is rejected before allocating": (
        lambda: MAGIC + (1 << 62).to_bytes(8, "little"),
        "over the limit of 32",
    ),
    "empty name": (lambda: MAGIC + directory((b"", file_node())), "entry name is empty"),
    "name '.'": (lambda: MAGIC + directory((b".", file_node())), "entry name b'.' is not allowed"),
    "name '..'": (lambda: MAGIC + directory((b"..", file_node())), "b'..' is not allowed"),
    "name with '/'": (lambda: MAGIC + directory((b"a/b", file_node())), "contains '/'"),
    "name with NUL": (lambda: MAGIC + directory((b"a\0", file_node())), "contains NUL"),
    "name too long": (
        lambda: MAGIC + directory((b"n" * 256, file_node())),
        "entry name is 256 bytes, over the limit of 255",
    ),
    "unsorted names": (
        lambda: MAGIC + directory((b"b", file_node()), (b"a", file_node())),
        "entries not sorted: b'a' after b'b'",
    ),
    "duplicate names": (
        lambda: MAGIC + directory((b"a", file_node()), (b"a", file_node())),
        "duplicate entry name b'a'",
    ),
    "directory with a stray tag": (
        lambda: MAGIC + tokens(b"(", b"type", b"directory", b"file", b")"),
        "expected 'entry' or ')'",
    ),
    "entry without name": (
        lambda: MAGIC + tokens(b"(", b"type", b"directory", b"entry", b"(", b"node"),
        "expected 'name' first in an entry",
    ),
    "entry without node": (
        lambda: MAGIC + tokens(b"(", b"type", b"directory", b"entry", b"(", b"name", b"a", b"(", b"type"),
        "expected 'node' after the entry name",
    ),
    "entry not closed": (
        lambda: (
            MAGIC
            + tokens(b"(", b"type", b"directory", b"entry", b"(", b"name", b"a", b"node")
            + file_node()
            + tokens(b"entry")
        ),
        "expected ')' to close an entry",
    ),
    "too deep": (lambda: MAGIC + nested(64), "nesting depth 64 reaches the limit of 64"),
    "trailing bytes": (lambda: MAGIC + file_node() + b"\0", "trailing bytes"),
    "a second archive appended": (lambda: (MAGIC + file_node()) * 2, "trailing bytes"),
}


@pytest.mark.parametrize("chunk", [1, 5, 1 << 30])
@pytest.mark.parametrize("rule", sorted(BAD_NARS))
def test_every_rule_is_enforced(rule: str, chunk: int) -> None:
    make, message = BAD_NARS[rule]
    parser = NarParser(Recorder())
    with pytest.raises(NarError, match=message_pattern(message)) as caught:
        feed_in(parser, make(), chunk)
        parser.finish()
    assert caught.value.offset is not None
    with pytest.raises(NarError, match="already failed"):
        parser.finish()


def message_pattern(text: str) -> str:
    return re.escape(text)


def test_depth_just_under_the_limit_is_accepted() -> None:
    parser = NarParser()
    parser.feed(MAGIC + nested(63))
    parser.finish()


def test_error_offset_points_at_the_offending_token() -> None:
    nar = MAGIC + tokens(b"(", b"type", b"fifo")
    with pytest.raises(NarError) as caught:
        NarParser().feed(nar)
    assert caught.value.offset == len(MAGIC + tokens(b"(", b"type"))


def test_dump_streams_big_files_in_bounded_chunks(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(8 << 20)  # sparse: 8 MiB of zeros
    sizes = [len(chunk) for chunk in dump(big)]
    assert sum(sizes) == len(MAGIC) + 5 * 16 + 8 + (8 << 20)
    assert max(sizes) <= 1 << 20
