from __future__ import annotations

from pathlib import Path

import pytest

from substituter.errors import TransientFetchError
from substituter.plugin import Offer
from substituter.transfer import Source, TransferEvents, TransferFailed, verified_nar

from .helpers import compress, make_info, make_nar, serve_bytes


async def collect(info, sources, events=None) -> bytes:
    return b"".join([c async for c in verified_nar(info, sources, events)])


def source(name: str, info, data: bytes, compression: str = "none", **kw) -> Source:
    return Source(name, Offer(info, f"test://{name}", compression), serve_bytes(data, **kw))


@pytest.mark.parametrize("compression", ["none", "xz", "zstd", "bzip2", "br"])
async def test_single_source_each_compression(tmp_path: Path, compression: str) -> None:
    nar = make_nar(tmp_path)
    info = make_info(nar)
    data = nar if compression == "none" else compress(nar, compression)
    assert await collect(info, [source("a", info, data, compression)]) == nar


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_failover_continues_at_same_offset(tmp_path: Path, compression: str) -> None:
    nar = make_nar(tmp_path)
    info = make_info(nar)
    data = nar if compression == "none" else compress(nar, compression)
    failures = []
    events = TransferEvents(failed=lambda f, r, t: failures.append((f, t)))
    broken = source("broken", info, data, compression, fail_after=len(data) // 2)
    good = source("good", info, data, compression)
    assert await collect(info, [broken, good], events) == nar
    assert failures == [("broken", True)]


async def test_ranged_resume_asks_for_the_offset(tmp_path: Path) -> None:
    nar = make_nar(tmp_path)
    info = make_info(nar)
    offsets = []
    inner = serve_bytes(nar)

    def recording(offer, offset=0):
        offsets.append(offset)
        return inner(offer, offset)

    broken = source("broken", info, nar, fail_after=100_000)
    assert await collect(info, [broken, Source("good", Offer(info, "x://"), recording)]) == nar
    assert offsets and offsets[0] > 0 and offsets[0] <= 100_000


async def test_corrupt_source_fails_and_last_chunk_is_held_back(tmp_path: Path) -> None:
    nar = make_nar(tmp_path)
    info = make_info(nar)
    bad = bytearray(nar)
    bad[200_000] ^= 0xFF  # inside the random file's contents: only the hash can tell
    seen = []
    with pytest.raises(TransferFailed, match="hash mismatch") as exc:
        async for chunk in verified_nar(info, [source("evil", info, bytes(bad))]):
            seen.append(chunk)
    assert exc.value.bad == ["evil"]
    assert sum(map(len, seen)) < len(nar)  # the consumer never got a complete stream


async def test_longer_than_narsize_stops_early(tmp_path: Path) -> None:
    nar = make_nar(tmp_path)
    info = make_info(nar)
    with pytest.raises(TransferFailed, match="longer than its signed NarSize"):
        await collect(info, [source("long", info, nar + b"\0" * 8)])


async def test_structurally_broken_nar_is_rejected(tmp_path: Path) -> None:
    nar = make_nar(tmp_path)
    info = make_info(nar)
    with pytest.raises(TransferFailed) as exc:
        await collect(info, [source("junk", info, b"x" * len(nar))])
    assert exc.value.bad == ["junk"]


async def test_all_sources_fail_transiently(tmp_path: Path) -> None:
    nar = make_nar(tmp_path)
    info = make_info(nar)
    a = source("a", info, nar, fail_after=1000)
    b = source("b", info, nar, fail_after=5000)
    with pytest.raises(TransferFailed, match="no source could deliver") as exc:
        await collect(info, [a, b])
    assert exc.value.bad == []


async def test_stall_is_a_transient_failure(tmp_path: Path) -> None:
    import asyncio

    nar = make_nar(tmp_path)
    info = make_info(nar)

    async def stalls(offer, offset=0):
        yield nar[offset:offset + 1000]
        await asyncio.sleep(10)
        raise TransientFetchError("unreachable")

    events = TransferEvents(stall_timeout=0.05)
    result = await collect(info, [Source("slow", Offer(info, "x://"), stalls), source("ok", info, nar)], events)
    assert result == nar


async def test_flat_content_address_is_checked(tmp_path: Path) -> None:
    from substituter.nix.hashes import Hash
    from substituter.nix.nar import dump

    f = tmp_path / "file"
    f.write_bytes(b"content")
    nar = b"".join(dump(f))
    info = make_info(nar)
    good = TransferEvents(content_hash=Hash.of_bytes(b"content"))
    assert await collect(info, [source("a", info, nar)], good) == nar
    wrong = TransferEvents(content_hash=Hash.of_bytes(b"other"))
    with pytest.raises(TransferFailed, match="content address"):
        await collect(info, [source("a", info, nar)], wrong)


async def test_a_source_failing_in_any_other_way_is_replaced(tmp_path: Path) -> None:
    """A plugin's own bug (any exception) ends that source, not the transfer."""
    nar = make_nar(tmp_path)
    info = make_info(nar)

    async def buggy(offer, offset=0):
        yield nar[offset:offset + 70_000]
        raise RuntimeError("plugin bug")

    failures = []
    events = TransferEvents(failed=lambda f, r, t: failures.append((f, t)))
    result = await collect(info, [Source("buggy", Offer(info, "x://"), buggy), source("ok", info, nar)], events)
    assert result == nar and failures == [("buggy", False)]


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_a_lone_source_that_drops_once_is_taken_up_again(tmp_path: Path, compression: str) -> None:
    """A dropped connection on the only source, after it delivered part of the NAR: the NAR
    goes on from the same source, at the same NAR offset (the client never notices)."""
    nar = make_nar(tmp_path)
    info = make_info(nar)
    data = nar if compression == "none" else compress(nar, compression)
    opens: list[int] = []
    flaky, whole = serve_bytes(data, fail_after=len(data) // 2), serve_bytes(data)

    def once(offer, offset=0):
        opens.append(offset)
        return (flaky if len(opens) == 1 else whole)(offer, offset)

    assert await collect(info, [Source("lone", Offer(info, "x://", compression), once)]) == nar
    assert len(opens) == 2
    # Uncompressed: asked from the offset reached; zstd: decoded from the start and skipped.
    assert opens[1] > 0 if compression == "none" else opens[1] == 0


async def test_a_source_failing_at_the_same_place_is_not_taken_up_again_and_again(tmp_path: Path) -> None:
    nar = make_nar(tmp_path)
    info = make_info(nar)
    data = compress(nar, "zstd")  # re-opened from byte 0 each time: it never gets further
    opens: list[int] = []
    inner = serve_bytes(data, fail_after=len(data) * 2 // 3)

    def counting(offer, offset=0):
        opens.append(offset)
        return inner(offer, offset)

    with pytest.raises(TransferFailed, match="no source could deliver"):
        await collect(info, [Source("stuck", Offer(info, "x://", "zstd"), counting)])
    assert len(opens) == 2  # once, and once more after it got further the first time
