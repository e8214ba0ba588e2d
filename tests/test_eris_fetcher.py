"""The ERIS fetcher: index, locate, open, and the core's verified transfer over its offers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fetchers.eris.blockstore import DirectoryBlockStore
from fetchers.eris.cli import eris_group, publish_nar
from fetchers.eris.codec import block_urn, encode, encode_to
from fetchers.eris.fetcher import ErisFetcher, ErisOptions, offer_uri, parse_offer_uri
from fetchers.eris.index import IndexEntry, save_entries
from fetchers.eris.server import start_server
from substituter.errors import ConfigError, FetchError, HashMismatch
from substituter.nix.hashes import Hash
from substituter.plugin import Offer, Unavailable, parse_options
from substituter.transfer import Source, TransferFailed, verified_nar
from tests.helpers import compress, make_info, make_nar

H1, H2, H3 = "1" * 32, "2" * 32, "3" * 32


async def published(tmp: Path, nar: bytes, hash_part: str, blocks: Path, block_size: int = 1024) -> IndexEntry:
    info = make_info(nar, hash_part)
    nar_file = tmp / f"{hash_part}.nar"
    nar_file.write_bytes(nar)
    return await publish_nar(info, nar_file, DirectoryBlockStore(blocks), block_size)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[ErisFetcher, dict[str, bytes], Path]]:
    blocks, index = tmp_path / "blocks", tmp_path / "index.jsonl"
    nars = {H1: make_nar(tmp_path, 100_000, "one"), H2: make_nar(tmp_path, 100_000, "two")}
    entries = [await published(tmp_path, nar, h, blocks) for h, nar in nars.items()]
    save_entries(index, entries)
    fetcher = ErisFetcher("eris", ErisOptions(index=str(index), blocks=[str(blocks)]))
    await fetcher.start()
    try:
        yield fetcher, nars, blocks
    finally:
        await fetcher.stop()


async def transfer(fetcher: ErisFetcher, offer: Offer) -> bytes:
    source = Source(fetcher.name, offer, fetcher.open)
    return b"".join([chunk async for chunk in verified_nar(offer.info, [source])])


async def located(fetcher: ErisFetcher, hash_part: str) -> Offer:
    answer = await fetcher.locate(hash_part)
    assert isinstance(answer, Offer), answer
    return answer


async def test_locate_offers_the_signed_narinfo_and_an_eris_uri(setup: tuple[ErisFetcher, dict[str, bytes], Path]) -> None:
    fetcher, nars, _ = setup
    offer = await located(fetcher, H1)
    assert offer.info == make_info(nars[H1], H1)
    assert offer.info.sigs  # the original signature travels with the offer
    assert offer.uri.startswith("eris:urn:eris:")
    assert offer.compression == "none" and offer.file_size == len(nars[H1])
    assert offer_uri(parse_offer_uri(offer.uri)) == offer.uri
    missing = await fetcher.locate(H3)
    assert isinstance(missing, Unavailable) and "not in" in missing.reason
    assert isinstance(await fetcher.locate("not-a-hash"), Unavailable)


async def test_transfer_delivers_the_verified_nar_and_resumes_at_an_offset(
    setup: tuple[ErisFetcher, dict[str, bytes], Path],
) -> None:
    fetcher, nars, _ = setup
    offer = await located(fetcher, H2)
    assert await transfer(fetcher, offer) == nars[H2]
    tail = b"".join([c async for c in fetcher.open(offer, 54_321)])
    assert tail == nars[H2][54_321:]
    with pytest.raises(FetchError, match="beyond"):
        [c async for c in fetcher.open(offer, len(nars[H2]) + 1)]


async def test_a_tampered_block_is_never_delivered(setup: tuple[ErisFetcher, dict[str, bytes], Path]) -> None:
    fetcher, nars, blocks = setup
    offer = await located(fetcher, H1)
    cap, own_blocks = encode(nars[H1], 1024)  # convergent: the same refs publish made
    victim = DirectoryBlockStore(blocks).path_of(next(r for r in own_blocks if r != cap.root_ref))
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(TransferFailed) as failed:
        await transfer(fetcher, offer)
    assert failed.value.bad == ["eris"]
    assert isinstance(failed.value.__cause__, HashMismatch)


async def test_a_missing_block_fails_the_transfer_naming_the_block(
    setup: tuple[ErisFetcher, dict[str, bytes], Path],
) -> None:
    fetcher, _, blocks = setup
    offer = await located(fetcher, H1)
    root_name = block_urn(parse_offer_uri(offer.uri).root_ref)[12:]
    (next(p for p in blocks.rglob("*") if p.is_file() and p.name == root_name)).unlink()
    with pytest.raises(TransferFailed, match=f"block urn:blake2b:{root_name} is not in"):
        await transfer(fetcher, offer)


async def test_a_wrong_index_entry_is_caught_by_the_signed_hash(tmp_path: Path) -> None:
    blocks, index = tmp_path / "blocks", tmp_path / "index.jsonl"
    right = make_nar(tmp_path, 50_000, "right")
    wrong = make_nar(tmp_path, 50_000, "wrong")  # same size, other bytes
    assert len(right) == len(wrong) and right != wrong
    wrong_entry = await published(tmp_path, wrong, H2, blocks)
    # The index claims H1 (signed for `right`) is stored under the capability of `wrong`.
    save_entries(index, [IndexEntry(wrong_entry.cap, "none", make_info(right, H1), len(right))])
    fetcher = ErisFetcher("eris", ErisOptions(index=str(index), blocks=[str(blocks)]))
    await fetcher.start()
    try:
        with pytest.raises(TransferFailed, match="hash mismatch") as failed:
            await transfer(fetcher, await located(fetcher, H1))
        assert failed.value.bad == ["eris"]
    finally:
        await fetcher.stop()


async def test_malformed_index_entries_are_unavailable_with_the_reason(tmp_path: Path) -> None:
    index = tmp_path / "index.jsonl"
    index.write_text(
        "not json\n"
        + json.dumps({"hash": H1, "urn": "urn:eris:XYZ", "narinfo": make_info(b"x" * 8, H1).to_text()})
        + "\n"
        + json.dumps({"hash": H2, "urn": "urn:eris:XYZ", "narinfo": "StorePath: nonsense\n"})
        + "\n"
    )
    fetcher = ErisFetcher("eris", ErisOptions(index=str(index), blocks=[str(tmp_path)]))
    await fetcher.start()
    try:
        bad_urn = await fetcher.locate(H1)
        assert isinstance(bad_urn, Unavailable) and "read capability" in bad_urn.reason
        assert f"{index}:2" in bad_urn.reason
        bad_narinfo = await fetcher.locate(H2)
        assert isinstance(bad_narinfo, Unavailable) and "line 1" in bad_narinfo.reason
    finally:
        await fetcher.stop()


async def test_guix_style_eris_line_over_n2r_with_a_compressed_file(tmp_path: Path) -> None:
    """A narinfo directory whose ERIS line names the xz file; blocks come over HTTP N2R."""
    nar = make_nar(tmp_path, 80_000)
    xz = compress(nar, "xz")
    blocks = DirectoryBlockStore(tmp_path / "blocks")
    cap = encode_to([xz], blocks.put_sync, 1024)
    info = make_info(nar, H3).with_file(f"nar/{H3}.nar.xz", "xz", Hash.of_bytes(xz), len(xz))
    info.extra.append(("ERIS", cap.urn()))
    narinfos = tmp_path / "narinfos"
    narinfos.mkdir()
    (narinfos / f"{H3}.narinfo").write_text(info.to_text())
    runner, port = await start_server(blocks)
    fetcher = ErisFetcher(
        "eris", ErisOptions(index=str(narinfos), blocks=[f"http://127.0.0.1:{port}"], concurrency=4)
    )
    await fetcher.start()
    try:
        offer = await located(fetcher, H3)
        assert offer.compression == "xz" and offer.file_size == len(xz)
        assert offer.info.sigs == make_info(nar, H3).sigs
        assert await transfer(fetcher, offer) == nar
        assert isinstance(await fetcher.locate(H1), Unavailable)
    finally:
        await fetcher.stop()
        await runner.cleanup()


def test_options_from_config() -> None:
    opts = parse_options(ErisOptions, {"index": "i.jsonl", "blocks": "a,http://127.0.0.1:1"}, "f")
    assert opts.blocks == ["a", "http://127.0.0.1:1"] and opts.concurrency == 16
    with pytest.raises(ConfigError, match="blocks"):
        parse_options(ErisOptions, {"index": "i.jsonl", "blocks": []}, "f")
    with pytest.raises(ConfigError, match="concurrency"):
        parse_options(ErisOptions, {"index": "i", "blocks": ["b"], "concurrency": 0}, "f")


async def test_publish_command_encodes_a_cache_and_skips_a_corrupt_nar(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "nar").mkdir(parents=True)
    good, bad = make_nar(tmp_path, 40_000, "good"), make_nar(tmp_path, 40_000, "bad")
    for hash_part, nar, stored in ((H1, good, good), (H2, bad, bad[:-1] + b"\x01")):
        xz = compress(stored, "xz")
        info = make_info(nar, hash_part).with_file(f"nar/{hash_part}.nar.xz", "xz", None, len(xz))
        (cache / f"{hash_part}.narinfo").write_text(info.to_text())
        (cache / "nar" / f"{hash_part}.nar.xz").write_bytes(xz)
    index, blocks = tmp_path / "index.jsonl", tmp_path / "blocks"
    result = await asyncio.to_thread(
        CliRunner().invoke,
        eris_group, ["publish", str(cache), "--blocks", str(blocks), "--index", str(index), "--block-size", "1k"]
    )
    assert result.exit_code == 1, result.output
    assert "1 path(s) could not be published" in result.output
    records = [json.loads(line) for line in index.read_text().splitlines()]
    assert [r["hash"] for r in records] == [H1]
    assert records[0]["narinfo"] == (cache / f"{H1}.narinfo").read_text()  # the original text
    fetcher = ErisFetcher("eris", ErisOptions(index=str(index), blocks=[str(blocks)]))
    await fetcher.start()
    try:
        assert await transfer(fetcher, await located(fetcher, H1)) == good
    finally:
        await fetcher.stop()
