from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from substituter.errors import NarInfoError
from substituter.nix.hashes import Hash
from substituter.nix.narinfo import NarInfo
from substituter.nix.store_path import StorePath
from tests.conftest import Nix

NAR_HASH = Hash.of_bytes(b"nar")
STORE_PATH = "/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-hello-2.12"
REF_A = "h97b2v1mpva3fwnjbrr4yfdjyndj04fl-d"
REF_B = "1p9q0bz6f22dyxh4lw8xs08p4201vyq4-f"

SAMPLE = (
    f"StorePath: {STORE_PATH}\n"
    "URL: nar/0abc.nar.xz\n"
    "Compression: xz\n"
    f"FileHash: {Hash.of_bytes(b'file')}\n"
    "FileSize: 120\n"
    f"NarHash: {NAR_HASH}\n"
    "NarSize: 288\n"
    f"References: {REF_A} {REF_B}\n"
    "Deriver: 5jfqy66pg8xigba4fvhkyhdnjbhp8cjs-hello-2.12.drv\n"
    "Sig: k1:45wgVB4LxKal1L4dN1Z9EnGVfqyDvruMshvX4fKemk03LIgp"
    "mSVL9RNMrvTx70Z16743tchIRXGITE3s3iPdAw==\n"
)


# -- real caches written by Nix -----------------------------------------------------------------


@dataclass
class SignedCache:
    """A `nix copy --to file://` cache of a fresh closure plus content-addressed paths."""

    directory: Path
    closure: list[str]  # input-addressed, built paths (signed)
    ca_paths: list[str]  # content-addressed paths (signed too)

    @property
    def paths(self) -> list[str]:
        return self.closure + self.ca_paths

    def narinfo_file(self, store_path: str) -> Path:
        return self.directory / f"{StorePath.parse(store_path).hash_part}.narinfo"


def make_signed_cache(nix: Nix, secret_key: Path, compression: str, directory: Path) -> SignedCache:
    """Build, sign and `nix copy` a fresh closure and two CA paths into ``directory``."""
    _, closure = nix.closure(f"narinfo-{compression}")
    stamp = time.time_ns()
    source = nix.tmp / f"src-{stamp}"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "f").write_text(f"{stamp}\n")
    flat = nix.tmp / f"flat-{stamp}"
    flat.write_text(f"flat {stamp}\n")
    ca_paths = [
        nix.text("nix-store", "--add", str(source)),
        nix.text("nix-store", "--add-fixed", "sha256", str(flat)),
    ]
    paths = closure + ca_paths
    nix.run("nix", "store", "sign", "--key-file", str(secret_key), *paths)
    nix.run("nix", "copy", "--to", f"file://{directory}?compression={compression}", *paths)
    return SignedCache(directory, closure, ca_paths)


def path_infos(nix: Nix, paths: list[str]) -> dict[str, dict[str, Any]]:
    return {
        info["path"]: info for info in json.loads(nix.run("nix", "path-info", "--json", *paths))
    }


@pytest.mark.nix
@pytest.mark.parametrize("compression", ["xz", "zstd", "none"])
def test_nix_written_narinfos_round_trip(
    nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path, compression: str
) -> None:
    cache = make_signed_cache(nix, nix_keys[0], compression, tmp_path / "cache")
    infos = path_infos(nix, cache.paths)
    for store_path in cache.paths:
        text = cache.narinfo_file(store_path).read_bytes()
        info = NarInfo.parse(text)
        assert info.to_bytes() == text
        assert NarInfo.parse(text.decode()).to_text() == text.decode()

        expected = infos[store_path]
        assert info.store_path == store_path
        assert info.store_dir == "/nix/store"
        assert info.hash_part == StorePath.parse(store_path).hash_part
        assert info.compression == compression
        assert info.nar_hash == Hash.parse(str(expected["narHash"]))
        assert info.nar_size == expected["narSize"]
        assert info.reference_paths() == sorted(expected["references"])
        assert info.file_size == (cache.directory / info.url).stat().st_size
        assert info.file_hash is not None
        assert info.ca == expected.get("ca")
        assert len(info.sigs) == 1 and info.sigs[0].startswith("test-")
        assert info.ca_matches() == (store_path in cache.ca_paths)
        assert (
            info.fingerprint()
            == (
                f"1;{store_path};sha256:{Hash.parse(str(expected['narHash'])).nix32()};"
                f"{expected['narSize']};" + ",".join(sorted(expected["references"]))
            ).encode()
        )


@pytest.mark.nix
def test_nix_accepts_rewritten_narinfo(
    nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """A narinfo changed through the API (new URL, canonical rendering) still works for Nix."""
    cache = make_signed_cache(nix, nix_keys[0], "xz", tmp_path / "cache")
    for store_path in cache.paths:
        file = cache.narinfo_file(store_path)
        info = NarInfo.parse(file.read_text())
        moved = f"moved/{Path(info.url).name}"
        (cache.directory / "moved").mkdir(exist_ok=True)
        (cache.directory / info.url).rename(cache.directory / moved)
        file.write_text(info.with_url(moved).to_text())
    store = tmp_path / "chroot"
    nix.run(
        "nix",
        "copy",
        "--from",
        f"file://{cache.directory}",
        "--to",
        str(store),
        "--option",
        "trusted-public-keys",
        nix_keys[2],
        *cache.paths,
    )
    nix.run("nix-store", "--store", str(store), "--check-validity", *cache.paths)


# -- strict parsing -------------------------------------------------------------------------------


def test_sample_fields() -> None:
    info = NarInfo.parse(SAMPLE)
    assert info.references == [REF_A, REF_B]
    assert info.deriver == "5jfqy66pg8xigba4fvhkyhdnjbhp8cjs-hello-2.12.drv"
    assert info.file_size == 120 and info.nar_size == 288
    assert info.to_text() == SAMPLE
    assert info.fingerprint() == (
        f"1;{STORE_PATH};{NAR_HASH};288;/nix/store/{REF_B},/nix/store/{REF_A}".encode()
    )


def replace_line(text: str, number: int, new: str | None) -> str:
    lines = text.splitlines(keepends=True)
    if new is None:
        del lines[number - 1]
    else:
        lines[number - 1] = new
    return "".join(lines)


@pytest.mark.parametrize(
    ("number", "new_line", "line", "message"),
    [
        (2, "URL:nar/x\n", 2, "exactly one space"),
        (2, "URL:  nar/x\n", 2, "exactly one space"),
        (2, "URL nar/x\n", 2, "no 'Key: value' colon"),
        (2, "URL: \n", 2, "URL is empty"),
        (3, "StorePath: /nix/store/x\n", 3, "duplicate key 'StorePath'|bad StorePath"),
        (3, "NarSize: 1\n", 7, "duplicate key 'NarSize'"),
        (7, "NarSize: 0\n", 7, "NarSize must be at least 1"),
        (7, "NarSize: -5\n", 7, "not a decimal number"),
        (7, "NarSize: 0288\n", 7, "not a decimal number"),
        (6, "NarHash: sha256:abc\n", 6, "bad NarHash"),
        (4, "FileHash: md4:00\n", 4, "unknown hash algorithm"),
        (1, "StorePath: nix/store/x\n", 1, "must be absolute"),
        (1, f"StorePath: {REF_A}\n", 1, "not an absolute store path"),
        (1, f"StorePath: /gnu/store/{REF_A}/bin\n", 1, "bad StorePath"),
        (8, f"References: {REF_A}  {REF_B}\n", 8, "bad reference"),
        (8, "References: not-a-path\n", 8, "bad reference"),
        (9, "Deriver: x.drv\n", 9, "bad Deriver"),
        (10, "Sig: nokey\n", 10, "not 'keyname:base64'"),
        (10, "CA: fixed:sha256:zz\n", 10, "bad CA"),
        (10, "Bad Key: x\n", 10, "invalid key"),
        (5, "\n", 5, "no 'Key: value' colon"),
    ],
)
def test_parse_errors_name_the_line(number: int, new_line: str, line: int, message: str) -> None:
    with pytest.raises(NarInfoError, match=message) as caught:
        NarInfo.parse(replace_line(SAMPLE, number, new_line))
    assert caught.value.line == line
    assert str(caught.value).startswith(f"line {line}: ")


@pytest.mark.parametrize("key_line", [1, 2, 6, 7])
def test_required_keys(key_line: int) -> None:
    key = SAMPLE.splitlines()[key_line - 1].split(":")[0]
    with pytest.raises(NarInfoError, match=f"missing required key\\(s\\): {key}"):
        NarInfo.parse(replace_line(SAMPLE, key_line, None))


def test_final_newline_required() -> None:
    with pytest.raises(NarInfoError, match="does not end with a newline") as caught:
        NarInfo.parse(SAMPLE.rstrip("\n"))
    assert caught.value.line == 10
    with pytest.raises(NarInfoError, match="empty"):
        NarInfo.parse(b"")


def test_invalid_utf8_names_line() -> None:
    with pytest.raises(NarInfoError, match="not valid UTF-8") as caught:
        NarInfo.parse(SAMPLE.encode().replace(b"URL: nar", b"URL: \xffnar"))
    assert caught.value.line == 2


# -- defaults, unknown keys and rewriting ---------------------------------------------------------


def test_missing_compression_means_bzip2_and_stays_missing() -> None:
    text = replace_line(SAMPLE, 3, None)
    info = NarInfo.parse(text)
    assert info.compression == "bzip2"
    assert info.to_text() == text
    changed = info.with_file("nar/x.nar.zst", "zstd", None, None)
    assert "Compression: zstd\n" in changed.to_text()
    assert changed.to_text().index("Compression") < changed.to_text().index("NarHash")
    assert "FileHash" not in changed.to_text() and "FileSize" not in changed.to_text()


def test_unknown_keys_and_order_kept() -> None:
    text = "X-First: 1\n" + replace_line(SAMPLE, 8, f"References: {REF_A}\nX-Mid: a b  c\n")
    text += "X-Last: \n"
    info = NarInfo.parse(text)
    assert info.extra == [("X-First", "1"), ("X-Mid", "a b  c"), ("X-Last", "")]
    assert info.to_text() == text


def test_unknown_deriver_and_empty_references() -> None:
    text = replace_line(replace_line(SAMPLE, 9, "Deriver: unknown-deriver\n"), 8, "References: \n")
    info = NarInfo.parse(text)
    assert info.deriver is None and info.references == []
    assert info.to_text() == text


def test_raw_hash_form_kept_until_changed() -> None:
    text = replace_line(SAMPLE, 6, f"NarHash: {NAR_HASH.sri()}\n")
    info = NarInfo.parse(text)
    assert info.nar_hash == NAR_HASH
    assert info.to_text() == text
    info.nar_hash = Hash.of_bytes(b"other")
    assert f"NarHash: {Hash.of_bytes(b'other')}\n" in info.to_text()


def test_mutating_a_parsed_list_is_written() -> None:
    info = NarInfo.parse(SAMPLE)
    info.references.remove(REF_B)
    assert f"References: {REF_A}\n" in info.to_text()


def test_new_fields_go_where_nix_puts_them() -> None:
    info = NarInfo.parse(replace_line(SAMPLE, 10, None))  # no Sig line
    info.ca = f"fixed:r:{NAR_HASH}"
    info.sigs.append("k2:c2ln")
    lines = info.to_text().splitlines()
    assert lines[-2:] == ["Sig: k2:c2ln", f"CA: fixed:r:{NAR_HASH}"]
    info.deriver = None
    assert "Deriver" not in info.to_text()


def test_fresh_narinfo_renders_like_nix() -> None:
    info = NarInfo(
        store_path=STORE_PATH,
        url="nar/x.nar",
        nar_hash=NAR_HASH,
        nar_size=5,
        compression="none",
        references=[REF_A],
        sigs=["k:AA=="],
        ca=f"text:{NAR_HASH}",
    )
    text = info.to_text()
    assert text == (
        f"StorePath: {STORE_PATH}\nURL: nar/x.nar\nCompression: none\nNarHash: {NAR_HASH}\n"
        f"NarSize: 5\nReferences: {REF_A}\nSig: k:AA==\nCA: text:{NAR_HASH}\n"
    )
    assert NarInfo.parse(text) == info


def test_with_url_changes_only_the_url() -> None:
    info = NarInfo.parse(SAMPLE)
    moved = info.with_url("http://127.0.0.1:1/nar/y.nar.xz")
    assert moved.to_text() == SAMPLE.replace(
        "URL: nar/0abc.nar.xz", "URL: http://127.0.0.1:1/nar/y.nar.xz"
    )
    assert info.to_text() == SAMPLE
    moved.references.clear()
    assert info.references == [REF_A, REF_B]


def test_nar_hash_text_follows_the_hash_object() -> None:
    """The memo of ``str(nar_hash)`` is per hash object: a new hash gives its own text."""
    info = NarInfo.parse(SAMPLE)
    assert info.nar_hash_text() == str(info.nar_hash)
    other = Hash("sha256", bytes(32))
    info.nar_hash = other
    assert info.nar_hash_text() == str(other) and info.fingerprint().decode().split(";")[2] == str(other)
