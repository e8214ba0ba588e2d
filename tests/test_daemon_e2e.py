"""End to end: real Nix substitutes through a real `substituter daemon` from real caches."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import zstandard

from .cache_server import build_cache
from .conftest import Nix
from .daemon_proc import DaemonProcess

pytestmark = [pytest.mark.nix, pytest.mark.slow]


def copy_from(nix: Nix, url: str, store: Path, public_key: str, *paths: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["nix", "copy", "--from", url, "--to", str(store), "--option", "trusted-public-keys", public_key,
         "--option", "narinfo-cache-negative-ttl", "0", *paths],
        env=nix.env, capture_output=True, check=False,
    )


def assert_intact(nix: Nix, store: Path, paths: list[str]) -> None:
    nix.run("nix-store", "--store", str(store), "--check-validity", *paths)
    for path in paths:
        ours = nix.run("nix-store", "--dump", path)
        theirs = nix.run("nix-store", "--store", str(store), "--dump", path)
        assert ours == theirs, f"{path} differs after substitution"


def binary_cache(url: str, name: str = "upstream", priority: int = 40) -> dict:
    return {"type": "binary-cache", "name": name, "url": url, "priority": priority}


def test_copy_closure_through_daemon_from_http_cache(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "xz")
    server = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key], "fetchers": [binary_cache(server.url)]}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, store, cache.paths)
        metrics = httpx.get(f"{daemon.url}/metrics").text
        assert 'substituter_narinfo_requests_total{result="hit"}' in metrics


def test_copy_from_local_mirror(nix: Nix, nix_keys, tmp_path: Path) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "mirror", "zstd")
    config = {"trusted-public-keys": [cache.public_key],
              "fetchers": [{"type": "local-mirror", "path": str(cache.root)}]}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, store, cache.paths)


def test_corrupt_preferred_source_falls_back_to_good_one(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "none")
    evil_root = tmp_path / "evil"
    shutil.copytree(cache.root, evil_root)
    evil = serve_cache(evil_root)
    evil.corrupt(200)  # flips a byte inside every NAR it serves
    good = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key],
              "fetchers": [binary_cache(evil.url, "evil", 10), binary_cache(good.url, "good", 50)]}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, store, cache.paths)
        assert "hash mismatch" in daemon.log() and "evil" in daemon.log()


def test_untrusted_signatures_are_never_served(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "xz")
    server = serve_cache(cache.root)
    other_sk, other_pk = tmp_path / "other.sk", tmp_path / "other.pk"
    nix.run("nix-store", "--generate-binary-cache-key", "other-1", str(other_sk), str(other_pk))
    config = {"trusted-public-keys": [other_pk.read_text().strip()], "fetchers": [binary_cache(server.url)]}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        hash_part = Path(cache.top).name[:32]
        response = httpx.get(f"{daemon.url}/{hash_part}.narinfo")
        assert response.status_code == 404
        assert response.headers["cache-control"] == "no-store"
        assert "no valid signature from a trusted key" in response.text
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode != 0
        assert not (store / "nix" / "store" / Path(cache.top).name).exists()


def test_missing_path_is_a_fast_404_and_garbage_is_rejected(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "xz")
    server = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key], "fetchers": [binary_cache(server.url)]}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        assert httpx.get(f"{daemon.url}/{'0' * 32}.narinfo").status_code == 404
        assert httpx.get(f"{daemon.url}/../etc/passwd.narinfo").status_code == 404
        assert httpx.get(f"{daemon.url}/{'e' * 32}.narinfo").status_code == 404  # 'e' is not nix32
        assert httpx.get(f"{daemon.url}/nar/garbage.nar").status_code == 404
        info = httpx.head(f"{daemon.url}/nix-cache-info")
        assert info.status_code == 200


def test_substitute_with_nix_store_realise(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "zstd")
    server = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key], "fetchers": [binary_cache(server.url)]}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        store = tmp_path / "chroot"
        nix.run("nix-store", "--store", str(store), "-r", cache.top, "--option", "substituters", daemon.url,
                "--option", "trusted-public-keys", cache.public_key)
        assert_intact(nix, store, cache.paths)


def test_source_killed_mid_transfer_resumes_from_another(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "none")
    flaky = serve_cache(cache.root)
    flaky.cut_after(150, times=100)
    good = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key],
              "fetchers": [binary_cache(flaky.url, "flaky", 10), binary_cache(good.url, "good", 50)]}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, store, cache.paths)


def test_restart_between_runs_keeps_narinfo_urls_valid(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "xz")
    server = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key], "fetchers": [binary_cache(server.url)]}
    daemon = DaemonProcess(tmp_path, config, nix.env)
    hash_part = Path(cache.top).name[:32]
    with daemon:
        narinfo = httpx.get(f"{daemon.url}/{hash_part}.narinfo").text
    url = next(line[5:] for line in narinfo.splitlines() if line.startswith("URL: "))
    with daemon:  # same port, same state dir: a narinfo cached by Nix still leads to the NAR
        expected = nix.run("nix-store", "--dump", cache.top)
        # Not fetched before the narinfo was served: offered uncompressed; the zstd form works too.
        assert url.endswith(".nar")
        raw = httpx.get(f"{daemon.url}/{url}")
        assert raw.status_code == 200 and raw.content == expected
        nar = httpx.get(f"{daemon.url}/{url}.zst")
        assert nar.status_code == 200 and zstandard.ZstdDecompressor().decompress(nar.content) == expected
        # Now cached: the narinfo offers the cached zstd file, served as it is.
        again = httpx.get(f"{daemon.url}/{hash_part}.narinfo").text
        assert "Compression: zstd" in again and ".nar.zst" in again
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()


def test_cached_nars_are_served_without_upstreams(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "xz")
    server = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key], "fetchers": [binary_cache(server.url)]}
    daemon = DaemonProcess(tmp_path, config, nix.env)
    hash_part = Path(cache.top).name[:32]
    with daemon:
        narinfo = httpx.get(f"{daemon.url}/{hash_part}.narinfo").text
        url = next(line[5:] for line in narinfo.splitlines() if line.startswith("URL: "))
        first = httpx.get(f"{daemon.url}/{url}")
        assert first.status_code == 200
    server.stop()  # the upstream is gone
    with daemon:
        again = httpx.get(f"{daemon.url}/{url}")
        assert again.status_code == 200 and again.content == first.content
        tail = httpx.get(f"{daemon.url}/{url}", headers={"Range": "bytes=100-"})
        assert tail.status_code == 206 and tail.content == first.content[100:]
        assert tail.headers["Content-Range"] == f"bytes 100-{len(first.content) - 1}/{len(first.content)}"
        head = httpx.head(f"{daemon.url}/{url}")
        assert head.status_code == 200 and head.headers["Content-Length"] == str(len(first.content))
        # The same NAR as the cached zstd file (sendfile): whole, resumed, HEAD.
        assert url.endswith(".nar")
        zst = httpx.get(f"{daemon.url}/{url}.zst")
        assert zst.status_code == 200 and zst.headers["Content-Type"] == "application/zstd"
        assert zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(zst.content) == first.content
        for target, body in ((url, first.content), (f"{url}.zst", zst.content)):
            resumed = httpx.get(f"{daemon.url}/{target}", headers={"Range": "bytes=7-"})
            assert resumed.status_code == 206 and resumed.content == body[7:], target
            assert resumed.headers["Content-Range"] == f"bytes 7-{len(body) - 1}/{len(body)}"
            assert httpx.head(f"{daemon.url}/{target}").headers["Content-Length"] == str(len(body))
            for unserved in ("bytes=5-9", f"bytes={len(body)}-", "bytes=-10", "lines=1-"):
                refused = httpx.get(f"{daemon.url}/{target}", headers={"Range": unserved})
                assert refused.status_code == 416, (target, unserved)
                assert refused.headers["Content-Range"] == f"bytes */{len(body)}"
        # A NarHash nobody vouches for is not served, cached or not.
        wrong = url.replace(url[4:8], "0000")
        assert httpx.get(f"{daemon.url}/{wrong}").status_code == 404


@pytest.mark.parametrize("compression", ["xz", "none"])
def test_streaming_large_nars_verifies_while_sending(nix: Nix, nix_keys, tmp_path: Path, serve_cache,
                                                    compression: str) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", compression)
    server = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key], "fetchers": [binary_cache(server.url)],
              "nar-cache": {"verify-first": 0}}  # every NAR streams through
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, store, cache.paths)


def test_streaming_from_a_corrupt_source_never_completes_unverified(
        nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "none")
    evil = serve_cache(cache.root)
    evil.corrupt(300)
    config = {"trusted-public-keys": [cache.public_key], "fetchers": [binary_cache(evil.url, "evil")],
              "nar-cache": {"verify-first": 0}}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        hash_part = Path(cache.top).name[:32]
        narinfo = httpx.get(f"{daemon.url}/{hash_part}.narinfo").text
        url = next(line[5:] for line in narinfo.splitlines() if line.startswith("URL: "))
        try:
            response = httpx.get(f"{daemon.url}/{url}")
        except httpx.HTTPError:
            pass  # the connection was cut: fine
        else:  # a 404 before any byte, or never a complete frame
            if response.status_code == 200:
                with pytest.raises(zstandard.ZstdError):
                    zstandard.ZstdDecompressor().decompress(response.content)
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode != 0
        assert not (store / "nix" / "store" / Path(cache.top).name).exists()
        assert "hash mismatch" in daemon.log()


def test_streaming_replaces_a_corrupt_source_caught_before_any_byte_went_out(
        nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "none")
    evil = serve_cache(cache.root)
    evil.corrupt(200)  # inside the NAR's header: the strict parser stops it at once
    good = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key],
              "fetchers": [binary_cache(evil.url, "evil", 10), binary_cache(good.url, "good", 50)],
              "nar-cache": {"verify-first": 0}}  # the streaming path
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        store = tmp_path / "client-store"
        result = copy_from(nix, daemon.url, store, cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, store, cache.paths)
        assert "starting over without evil" in daemon.log()


@pytest.mark.parametrize("verify_first", [0, 32 * 1024 * 1024])
def test_a_zstd_upstream_file_is_cached_and_served_as_it_is(
        nix: Nix, nix_keys, tmp_path: Path, serve_cache, verify_first: int) -> None:
    """The verified cache keeps Nix's own zstd files (no compression work in the daemon), and
    Nix takes them back through the daemon with the upstream gone."""
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "zstd")
    server = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key], "fetchers": [binary_cache(server.url)],
              "nar-cache": {"verify-first": verify_first}}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        result = copy_from(nix, daemon.url, tmp_path / "first", cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        server.stop()
        for path in cache.paths:
            hash_part = Path(path).name[:32]
            upstream = (cache.root / f"{hash_part}.narinfo").read_text()
            upstream_url = next(line[5:] for line in upstream.splitlines() if line.startswith("URL: "))
            deadline = time.monotonic() + 10  # the cache write may still be finishing
            while "Compression: zstd" not in (served := httpx.get(f"{daemon.url}/{hash_part}.narinfo").text):
                assert time.monotonic() < deadline, served
                time.sleep(0.05)
            url = next(line[5:] for line in served.splitlines() if line.startswith("URL: "))
            assert httpx.get(f"{daemon.url}/{url}").content == (cache.root / upstream_url).read_bytes()
        result = copy_from(nix, daemon.url, tmp_path / "second", cache.public_key, cache.top)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, tmp_path / "second", cache.paths)


def test_references_and_small_nars_are_fetched_ahead_of_nix(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    """Nix walks a closure one request at a time: once a narinfo is served, its references'
    narinfos and its NAR are fetched meanwhile, so they are there even if the upstream goes."""
    cache = build_cache(nix, nix_keys, tmp_path / "cache", "zstd")
    server = serve_cache(cache.root)
    config = {"trusted-public-keys": [cache.public_key], "fetchers": [binary_cache(server.url)]}
    top = cache.hash_part(cache.top)
    references = [cache.hash_part(p) for p in cache.paths if p != cache.top]
    assert references
    with DaemonProcess(tmp_path, config, nix.env) as daemon, httpx.Client(base_url=daemon.url) as client:
        served = client.get(f"/{top}.narinfo").text
        time.sleep(1.0)  # nothing else asked; the daemon works ahead
        server.stop()
        for hash_part in references:
            assert client.get(f"/{hash_part}.narinfo").status_code == 200, daemon.log()
        url = next(line[5:] for line in served.splitlines() if line.startswith("URL: "))
        nar = client.get(f"/{url}")
        assert nar.status_code == 200 and nar.content == nix.run("nix-store", "--dump", cache.top)


def big_zstd_cache(nix: Nix, nix_keys, dest: Path) -> tuple[str, Path, str]:
    """One path of ~3 MiB (random and text: many zstd blocks, raw and compressed) published
    with zstd; returns the path, its NAR file in the cache and the public key."""
    stamp = time.time_ns()
    script = ("mkdir $out; head -c 1500000 /dev/urandom > $out/random; "
              "seq -f 'line %.0f of text' 1 100000 > $out/text")
    path = nix.build(
        f'derivation {{ name = "big-zstd"; system = builtins.currentSystem; builder = "/bin/sh"; '
        f'args = [ "-c" "{script}" ]; PATH = "/usr/bin:/bin"; stamp = "{stamp}"; }}'
    )[0]
    secret_key, _, public_key = nix_keys
    nix.run("nix", "store", "sign", "--key-file", str(secret_key), path)
    nix.run("nix", "copy", "--to", f"file://{dest}?compression=zstd", path)
    narinfo = (dest / f"{Path(path).name[:32]}.narinfo").read_text()
    url = next(line[5:] for line in narinfo.splitlines() if line.startswith("URL: "))
    return path, dest / url, public_key


def test_a_streamed_zstd_nar_is_passed_on_as_its_own_blocks(nix: Nix, nix_keys, tmp_path: Path, serve_cache) -> None:
    """A NAR that streams (larger than verify-first) is offered as zstd: the source's blocks go
    to Nix as they verify, not the decoded NAR."""
    path, nar_file, public_key = big_zstd_cache(nix, nix_keys, tmp_path / "cache")
    server = serve_cache(tmp_path / "cache")
    config = {"trusted-public-keys": [public_key], "fetchers": [binary_cache(server.url)],
              "nar-cache": {"enable": False, "verify-first": 0, "stream-zstd": True}}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        served = httpx.get(f"{daemon.url}/{Path(path).name[:32]}.narinfo").text
        assert "Compression: zstd" in served and "FileHash" not in served
        url = next(line[5:] for line in served.splitlines() if line.startswith("URL: "))
        body = httpx.get(f"{daemon.url}/{url}").content
        assert len(body) <= nar_file.stat().st_size  # compressed blocks, not the NAR
        nar = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(body)
        assert nar == nix.run("nix-store", "--dump", path)
        result = copy_from(nix, daemon.url, tmp_path / "store", public_key, path)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, tmp_path / "store", [path])


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.97])
def test_a_zstd_source_cut_mid_stream_goes_on_in_the_same_frame(
        nix: Nix, nix_keys, tmp_path: Path, serve_cache, fraction: float) -> None:
    """The zstd source dies part-way: the blocks Nix already has stay, and the rest of the NAR
    follows from the next source as raw blocks of the same zstd stream."""
    path, nar_file, public_key = big_zstd_cache(nix, nix_keys, tmp_path / "cache")
    flaky = serve_cache(tmp_path / "cache")
    flaky.cut_after(int(nar_file.stat().st_size * fraction), times=100)
    good = serve_cache(tmp_path / "cache")
    config = {"trusted-public-keys": [public_key],
              "fetchers": [binary_cache(flaky.url, "flaky", 10), binary_cache(good.url, "good", 50)],
              "nar-cache": {"verify-first": 0, "stream-zstd": True}}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        result = copy_from(nix, daemon.url, tmp_path / "store", public_key, path)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, tmp_path / "store", [path])
        assert "flaky" in daemon.log() and "trying the next source" in daemon.log()


@pytest.mark.parametrize("stream_zstd", [False, True])
def test_the_only_source_dropping_mid_stream_is_taken_up_again(nix: Nix, nix_keys, tmp_path: Path, serve_cache,
                                                               stream_zstd: bool) -> None:
    path, nar_file, public_key = big_zstd_cache(nix, nix_keys, tmp_path / "cache")
    flaky = serve_cache(tmp_path / "cache")
    flaky.cut_after(nar_file.stat().st_size * 2 // 3, times=1)
    config = {"trusted-public-keys": [public_key], "fetchers": [binary_cache(flaky.url, "flaky")],
              "nar-cache": {"verify-first": 0, "stream-zstd": stream_zstd}}
    with DaemonProcess(tmp_path, config, nix.env) as daemon:
        result = copy_from(nix, daemon.url, tmp_path / "store", public_key, path)
        assert result.returncode == 0, result.stderr.decode() + daemon.log()
        assert_intact(nix, tmp_path / "store", [path])
        assert "trying the next source" in daemon.log()
