from __future__ import annotations

import base64
from pathlib import Path

import pytest

from substituter.errors import KeyFormatError
from substituter.nix.hashes import Hash
from substituter.nix.narinfo import NarInfo
from substituter.nix.signing import PublicKey, SecretKey, sign_narinfo, verify_narinfo
from tests.conftest import Nix
from tests.test_nix_narinfo import make_signed_cache

INFO = NarInfo(
    store_path="/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-hello",
    url="nar/x.nar",
    nar_hash=Hash.of_bytes(b"nar"),
    nar_size=3,
    references=["h97b2v1mpva3fwnjbrr4yfdjyndj04fl-d"],
)


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.nix
def test_keys_generated_by_nix(nix_keys: tuple[Path, Path, str]) -> None:
    secret_file, _, public_text = nix_keys
    secret = SecretKey.from_file(secret_file)
    public = PublicKey.parse(public_text)
    assert secret.public_key() == public
    assert str(public) == public_text
    assert secret.to_text() == secret_file.read_text().strip()
    assert public_text not in repr(secret) and secret.to_text() not in repr(secret)


def test_sign_and_verify() -> None:
    key = SecretKey.generate("mine-1")
    sig = key.sign(b"message")
    assert sig.startswith("mine-1:") and len(base64.b64decode(sig.split(":", 1)[1])) == 64
    assert key.public_key().verify(b"message", sig)
    assert not key.public_key().verify(b"messagE", sig)


def test_bad_signatures_are_false_not_errors() -> None:
    key = SecretKey.generate("k")
    public = key.public_key()
    good = key.sign(b"m")
    raw = bytearray(base64.b64decode(good.split(":", 1)[1]))
    raw[10] ^= 1
    flipped = "k:" + base64.b64encode(bytes(raw)).decode()
    same_name_other_key = SecretKey.generate("k").public_key()
    assert not same_name_other_key.verify(b"m", good)
    assert not PublicKey("other", public.key).verify(b"m", good)  # name must match
    for sig in ["k", "k:", "k:!!!", "k:" + base64.b64encode(b"x" * 63).decode(), flipped]:
        assert not public.verify(b"m", sig), sig
    assert not PublicKey("k", b"\xff" * 32).verify(b"m", good)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nocolon", "not 'name:base64'"),
        (":" + base64.b64encode(b"x" * 32).decode(), "not 'name:base64'"),
        ("k:%%%", "not valid base64"),
        ("k:" + base64.b64encode(b"x" * 31).decode(), "has 31 bytes, expected 32"),
    ],
)
def test_public_key_format_errors(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        PublicKey.parse(text)


def test_secret_key_format_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFormatError, match="has 32 bytes, expected 64"):
        SecretKey.parse("k:" + base64.b64encode(b"x" * 32).decode())
    other_half = SecretKey.generate("a").key[:32] + SecretKey.generate("b").key[32:]
    with pytest.raises(KeyFormatError, match="public half does not match"):
        SecretKey.parse("k:" + base64.b64encode(other_half).decode())
    binary = tmp_path / "sk"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFormatError, match="not ASCII"):
        SecretKey.from_file(binary)


def test_sign_narinfo_returns_signed_copy() -> None:
    key = SecretKey.generate("mine-1")
    signed = sign_narinfo(INFO, key)
    assert INFO.sigs == [] and len(signed.sigs) == 1
    assert verify_narinfo(signed, [key.public_key()]) == key.public_key()
    assert sign_narinfo(signed, key).sigs == signed.sigs  # not added twice
    tampered = NarInfo.parse(signed.to_text().replace("NarSize: 3", "NarSize: 4"))
    assert verify_narinfo(tampered, [key.public_key()]) is None
    assert verify_narinfo(signed, [SecretKey.generate("mine-1").public_key()]) is None


# -- against real Nix -----------------------------------------------------------------------------


@pytest.mark.nix
def test_nix_signatures_verify(nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path) -> None:
    secret_file, _, public_text = nix_keys
    cache = make_signed_cache(nix, secret_file, "zstd", tmp_path / "cache")
    public = PublicKey.parse(public_text)
    secret = SecretKey.from_file(secret_file)
    stranger = SecretKey.generate(public.name).public_key()
    for store_path in cache.paths:
        info = NarInfo.parse(cache.narinfo_file(store_path).read_text())
        assert verify_narinfo(info, [stranger, public]) == public
        assert verify_narinfo(info, [stranger]) is None
        # ed25519 is deterministic: our signature is Nix's, byte for byte.
        assert sign_narinfo(info.with_sigs([]), secret).sigs == info.sigs


def resign_cache(cache_dir: Path, store_paths: list[str], key: SecretKey) -> None:
    for narinfo_file in cache_dir.glob("*.narinfo"):
        info = NarInfo.parse(narinfo_file.read_text())
        if info.store_path in store_paths:
            narinfo_file.write_text(sign_narinfo(info.with_sigs([]), key).to_text())


@pytest.mark.nix
def test_nix_accepts_our_signatures_only_with_our_key(
    nix: Nix, nix_keys: tuple[Path, Path, str], tmp_path: Path
) -> None:
    secret_file, _, nix_public = nix_keys
    cache = make_signed_cache(nix, secret_file, "xz", tmp_path / "cache")
    ours = SecretKey.generate("substituter-test-1")
    resign_cache(cache.directory, cache.paths, ours)
    for store_path in cache.paths:
        text = (cache.narinfo_file(store_path)).read_text()
        assert f"Sig: {ours.name}:" in text and "Sig: test-" not in text

    def copy(trusted: str, store: Path) -> bytes:
        return nix.run(
            "nix",
            "copy",
            "--from",
            f"file://{cache.directory}",
            "--to",
            str(store),
            "--option",
            "trusted-public-keys",
            trusted,
            *cache.closure,
        )

    accepted = tmp_path / "accepted"
    copy(str(ours.public_key()), accepted)
    nix.run("nix-store", "--store", str(accepted), "--check-validity", *cache.closure)

    with pytest.raises(AssertionError, match="lacks a valid signature"):
        copy(nix_public, tmp_path / "rejected")
