"""The bazel-cas fetcher against a real loopback cache holding NARs dumped by real Nix."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cas_server import CasServer
from conftest import Published, hash_part, serving
from substituter.errors import ConfigError, FetchError, NotAvailable, TransientFetchError
from substituter.nix.hashes import Hash
from substituter.nix.signing import PublicKey, verify_narinfo
from substituter.plugin import Offer, Unavailable, load_fetcher_type, parse_options

from substituter_bazel_cas import BazelCasFetcher, BazelCasOptions, index_key

pytestmark = pytest.mark.nix


def make_fetcher(**options: Any) -> BazelCasFetcher:
    # Options arrive as strings from `substituter fetcher --option k=v`; parse them the same way.
    parsed = parse_options(BazelCasOptions, {k: str(v) for k, v in options.items()}, "test")
    return BazelCasFetcher("cas-test", parsed)


async def started(**options: Any) -> AsyncIterator[BazelCasFetcher]:
    fetcher = make_fetcher(**options)
    await fetcher.start()
    try:
        yield fetcher
    finally:
        await fetcher.stop()


@pytest.fixture
async def fetcher(filled_cas: CasServer) -> AsyncIterator[BazelCasFetcher]:
    async for f in started(url=filled_cas.url, timeout=5):
        yield f


async def read_all(fetcher: BazelCasFetcher, offer: Offer, offset: int = 0) -> bytes:
    return b"".join([chunk async for chunk in fetcher.open(offer, offset)])


async def offer_for(fetcher: BazelCasFetcher, path: str) -> Offer:
    answer = await fetcher.locate(hash_part(path))
    assert isinstance(answer, Offer), answer
    return answer


def test_registered_under_its_kind() -> None:
    assert load_fetcher_type("bazel-cas") is BazelCasFetcher


async def test_offer_is_the_signed_narinfo_and_the_blob_url(
    fetcher: BazelCasFetcher, filled_cas: CasServer, published: Published
) -> None:
    for path in published.paths:
        offer = await offer_for(fetcher, path)
        nar = published.nars[path]
        digest = hashlib.sha256(nar).hexdigest()
        assert offer.uri == f"{filled_cas.url}/cas/{digest}"
        assert offer.info.store_path == path
        assert offer.info.nar_hash == Hash("sha256", bytes.fromhex(digest))
        assert (offer.compression, offer.file_size, offer.file_hash) == (
            "none", len(nar), str(offer.info.nar_hash)
        )
        # The signature Nix made still verifies: the fetcher changed nothing that is signed.
        assert verify_narinfo(offer.info, [PublicKey.parse(published.public_key)]) is not None


async def test_open_streams_exactly_the_nar_nix_dumped(
    fetcher: BazelCasFetcher, published: Published
) -> None:
    for path in published.paths:
        offer = await offer_for(fetcher, path)
        assert await read_all(fetcher, offer) == published.nars[path]


async def test_open_at_an_offset_sends_range(
    fetcher: BazelCasFetcher, filled_cas: CasServer, published: Published
) -> None:
    nar = published.nars[published.top]
    offer = await offer_for(fetcher, published.top)
    offset = len(nar) // 2 + 3
    assert await read_all(fetcher, offer, offset) == nar[offset:]
    method, _path, range_header = filled_cas.requests[-1]
    assert (method, range_header) == ("GET", f"bytes={offset}-")


async def test_open_at_an_offset_when_the_server_ignores_range(
    fetcher: BazelCasFetcher, filled_cas: CasServer, published: Published
) -> None:
    nar = published.nars[published.top]
    offer = await offer_for(fetcher, published.top)
    filled_cas.ignore_range = True
    assert await read_all(fetcher, offer, 101) == nar[101:]


async def test_offset_beyond_the_end_is_an_error(
    fetcher: BazelCasFetcher, published: Published
) -> None:
    offer = await offer_for(fetcher, published.top)
    with pytest.raises(FetchError, match="beyond the end"):
        await read_all(fetcher, offer, len(published.nars[published.top]) + 10)


async def test_unknown_path_is_unavailable(fetcher: BazelCasFetcher) -> None:
    answer = await fetcher.locate("0" * 32)
    assert answer == Unavailable("not in the index")


async def test_evicted_blob_is_unavailable_not_offered(
    fetcher: BazelCasFetcher, filled_cas: CasServer, published: Published
) -> None:
    nar = published.nars[published.top]
    del filled_cas.cas[hashlib.sha256(nar).hexdigest()]
    answer = await fetcher.locate(hash_part(published.top))
    assert isinstance(answer, Unavailable)
    assert "does not hold it" in answer.reason


async def test_blob_gone_between_locate_and_open(
    fetcher: BazelCasFetcher, filled_cas: CasServer, published: Published
) -> None:
    offer = await offer_for(fetcher, published.top)
    filled_cas.cas.clear()
    with pytest.raises(NotAvailable, match="no longer holds"):
        await read_all(fetcher, offer)


async def test_index_entry_for_another_path_is_refused(
    fetcher: BazelCasFetcher, filled_cas: CasServer, published: Published
) -> None:
    dep = next(p for p in published.paths if p != published.top)
    filled_cas.ac[index_key(hash_part(published.top))] = published.narinfo(dep).to_bytes()
    answer = await fetcher.locate(hash_part(published.top))
    assert isinstance(answer, Unavailable) and dep in answer.reason


async def test_garbage_index_entry_is_unavailable(
    fetcher: BazelCasFetcher, filled_cas: CasServer, published: Published
) -> None:
    filled_cas.ac[index_key(hash_part(published.top))] = b"\x0a\x20protobuf, not a narinfo"
    answer = await fetcher.locate(hash_part(published.top))
    assert isinstance(answer, Unavailable) and "not a narinfo" in answer.reason


async def test_server_errors_are_transient_for_the_core_to_retry(
    fetcher: BazelCasFetcher, filled_cas: CasServer, published: Published
) -> None:
    filled_cas.fail_next = 1
    with pytest.raises(TransientFetchError, match="503"):
        await fetcher.locate(hash_part(published.top))
    assert isinstance(await fetcher.locate(hash_part(published.top)), Offer)


async def test_connection_cut_mid_body_is_transient(
    fetcher: BazelCasFetcher, filled_cas: CasServer, published: Published
) -> None:
    offer = await offer_for(fetcher, published.top)
    filled_cas.cut_after = 64
    received = bytearray()
    with pytest.raises(TransientFetchError):
        async for chunk in fetcher.open(offer):
            received += chunk
    assert bytes(received) == published.nars[published.top][: len(received)]


async def test_unreachable_cache_is_transient(published: Published) -> None:
    async for fetcher in started(url="http://127.0.0.1:9", timeout=2):
        with pytest.raises(TransientFetchError, match="127.0.0.1:9"):
            await fetcher.locate(hash_part(published.top))


async def test_narinfos_from_a_directory(
    cas: CasServer, published: Published, tmp_path: Path
) -> None:
    for nar in published.nars.values():
        cas.put_blob(nar)
    async for fetcher in started(url=cas.url, index_dir=published.index_dir):
        offer = await offer_for(fetcher, published.top)
        assert await read_all(fetcher, offer) == published.nars[published.top]
        assert not any(path.startswith("/ac/") for _m, path, _r in cas.requests)
        assert isinstance(await fetcher.locate("1" * 32), Unavailable)


async def test_index_on_a_separate_server(cas: CasServer, published: Published) -> None:
    for nar in published.nars.values():
        cas.put_blob(nar)
    async with serving(CasServer()) as index:
        index.ac[index_key(hash_part(published.top))] = published.narinfo(published.top).to_bytes()
        async for fetcher in started(url=cas.url, index_url=index.url):
            offer = await offer_for(fetcher, published.top)
            assert offer.uri.startswith(cas.url + "/cas/")
            assert await read_all(fetcher, offer) == published.nars[published.top]
        assert [m for m, path, _r in index.requests if path.startswith("/cas/")] == []
        assert not any(path.startswith("/ac/") for _m, path, _r in cas.requests)


def test_options_are_checked_with_messages() -> None:
    with pytest.raises(ConfigError, match="not both"):
        make_fetcher(url="http://127.0.0.1:1", index_url="http://127.0.0.1:2", index_dir="/tmp")
    with pytest.raises(ConfigError, match="'url' must be an http"):
        make_fetcher(url="ftp://127.0.0.1/")
    with pytest.raises(ConfigError, match="timeout"):
        make_fetcher(url="http://127.0.0.1:1", timeout=0)
    with pytest.raises(ConfigError, match="unknown option 'compression'"):
        make_fetcher(url="http://127.0.0.1:1", compression="xz")


async def test_missing_index_dir_fails_at_start(tmp_path: Path) -> None:
    fetcher = make_fetcher(url="http://127.0.0.1:1", index_dir=tmp_path / "nope")
    with pytest.raises(ConfigError, match="is not a directory"):
        await fetcher.start()
