"""NAR verify/restore throughput per compression, next to Nix doing the same work.

    .venv/bin/python bench/nar_bench.py [--mib 256] [--keep DIR]

Builds a tree (half random, half text) whose NAR is about --mib MiB, adds it to a chroot
Nix store, has Nix write a file:// cache of it per compression (br is re-encoded by us at
quality 5, since Nix's default quality 11 takes minutes), then times, in the same run:

  ours                                        Nix
  verify: decompress + parse + sha256         -
  restore: decompress + verify + write tree   nix copy --from file://… (chroot store)
  restore of the raw NAR                      nix-store --restore < nar
  dump + sha256 of the tree                   nix hash path

Each of our measurements runs in a fresh subprocess so ru_maxrss is its own peak RSS.
Not a test: it prints figures, it does not pass or fail.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from substituter.nix.compression import compressor, decompressor  # noqa: E402
from substituter.nix.nar import NarVerifier, dump  # noqa: E402
from substituter.nix.restore import RestoreSink  # noqa: E402

NIX_CONFIG = "\n".join(
    [
        "experimental-features = nix-command",
        "sandbox = false",
        "build-users-group =",
        "substituters =",
    ]
)
CODECS = ["none", "zstd", "xz", "bzip2", "br"]
READ = 1 << 20
# Compressed input is fed in small pieces: a decoder returns all the output of one piece
# at once, and text expands ~20x, so this bounds the memory held per call.
COMPRESSED_READ = 16 << 10


# -- worker: one measurement in its own process ---------------------------------------


def worker(mode: str, path: str, codec: str, sha256_hex: str, size: int, out: str) -> None:
    start = time.perf_counter()
    if mode == "hash-path":
        digest = hashlib.sha256()
        for chunk in dump(path):
            digest.update(chunk)
        assert digest.hexdigest() == sha256_hex
    else:
        sink = RestoreSink(out) if mode == "restore" else None
        verifier = NarVerifier(bytes.fromhex(sha256_hex), size, sink)
        decoder = decompressor(codec, max_output=size)
        read_size = READ if codec == "none" else COMPRESSED_READ
        with open(path, "rb", buffering=0) as f:
            while block := f.read(read_size):
                verifier.feed(decoder.decode(block))
        verifier.feed(decoder.flush())
        verifier.finish()
        if sink is not None:
            sink.commit()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_mib": peak_rss_kib() / 1024}))


def peak_rss_kib() -> int:
    """This process image's peak RSS.

    ru_maxrss survives execve on Linux, so a child spawned by a big parent would report
    the parent's size; VmHWM belongs to the current image only.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_worker(mode: str, path: Path, codec: str, sha: str, size: int, out: Path) -> dict[str, float]:
    args = [sys.executable, __file__, "--worker", mode, str(path), codec, sha, str(size), str(out)]
    result = json.loads(subprocess.run(args, check=True, capture_output=True).stdout)
    assert isinstance(result, dict)
    return result


# -- setup --------------------------------------------------------------------------------


def make_tree(root: Path, total: int) -> None:
    root.mkdir()
    half = total // 2
    with open(root / "random", "wb") as f:
        for _ in range(half // READ):
            f.write(os.urandom(READ))
    with open(root / "text", "wb") as f:
        line, written = 0, 0
        while written < half:
            block = b"".join(b"line %d of some ordinary text\n" % (line + i) for i in range(20000))
            line += 20000
            f.write(block[: half - written])
            written += min(len(block), half - written)


def nix(env: dict[str, str], *args: str, stdin: Path | None = None) -> float:
    """Run a Nix command and return its wall time."""
    start = time.perf_counter()
    with open(stdin or os.devnull, "rb") as inp:
        subprocess.run(list(args), env=env, stdin=inp, check=True, capture_output=True)
    return time.perf_counter() - start


def narinfo_path(cache: Path, store_path: str) -> Path:
    return cache / f"{Path(store_path).name.split('-')[0]}.narinfo"


def brotli_cache(src: Path, dst: Path, store_path: str) -> None:
    """A br cache made from the uncompressed one: re-encode the NAR, rewrite its narinfo."""
    dst.mkdir()
    shutil.copy(src / "nix-cache-info", dst / "nix-cache-info")
    info = narinfo_path(src, store_path).read_text().splitlines()
    url = next(line.split(": ", 1)[1] for line in info if line.startswith("URL: "))
    (dst / "nar").mkdir()
    encoder = compressor("br", 5)
    with open(src / url, "rb") as fin, open(dst / f"{url}.br", "wb") as fout:
        while block := fin.read(READ):
            fout.write(encoder.compress(block))
        fout.write(encoder.flush())
    lines = []
    for line in info:
        if line.startswith(("FileHash: ", "FileSize: ")):
            continue
        if line.startswith("URL: "):
            line = f"URL: {url}.br"
        elif line.startswith("Compression: "):
            line = "Compression: br"
        lines.append(line)
    narinfo_path(dst, store_path).write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    opts = parser.parse_args()
    env = dict(os.environ, NIX_CONFIG=NIX_CONFIG)
    work = opts.keep or Path(tempfile.mkdtemp(prefix="nar-bench-"))
    work.mkdir(exist_ok=True)
    try:
        bench(work, opts.mib << 20, env)
    finally:
        if opts.keep is None:
            subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, total: int, env: dict[str, str]) -> None:
    tree = work / "tree"
    make_tree(tree, total)
    nar = work / "tree.nar"
    digest = hashlib.sha256()
    with open(nar, "wb") as f:
        for chunk in dump(tree):
            digest.update(chunk)
            f.write(chunk)
    size, sha = nar.stat().st_size, digest.hexdigest()
    print(f"NAR: {size / 2**20:.0f} MiB (half random, half text), sha256 {sha[:16]}…\n")

    store = work / "store"
    out = subprocess.run(
        ["nix", "store", "add-path", "--store", str(store), str(tree)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    store_path = out.stdout.strip()

    caches: dict[str, Path] = {}
    for codec in CODECS:
        cache = work / f"cache-{codec}"
        if codec == "br":
            brotli_cache(caches["none"], cache, store_path)
        else:
            nix(
                env,
                "nix",
                "copy",
                "--from",
                str(store),
                "--to",
                f"file://{cache}?compression={codec}",
                store_path,
            )
        caches[codec] = cache

    rows = []
    for codec in CODECS:
        info = narinfo_path(caches[codec], store_path).read_text().splitlines()
        url = next(line.split(": ", 1)[1] for line in info if line.startswith("URL: "))
        blob = caches[codec] / url
        verify = run_worker("verify", blob, codec, sha, size, work / "unused")
        ours_restore = run_worker("restore", blob, codec, sha, size, work / f"ours-{codec}")
        nix_copy = nix(
            env,
            "nix",
            "copy",
            "--no-check-sigs",
            "--from",
            f"file://{caches[codec]}",
            "--to",
            str(work / f"nixstore-{codec}"),
            store_path,
        )
        rows.append((codec, blob.stat().st_size, verify, ours_restore, nix_copy))

    print(
        f"{'compression':<11} {'file MiB':>8} {'verify GB/s':>11} {'RSS MiB':>7} "
        f"{'restore s':>9} {'RSS MiB':>7} {'nix copy s':>10} {'ours/nix':>8}"
    )
    for codec, fsize, verify, restore_, nix_copy in rows:
        print(
            f"{codec:<11} {fsize / 2**20:>8.0f} {size / verify['seconds'] / 1e9:>11.2f} "
            f"{verify['rss_mib']:>7.0f} {restore_['seconds']:>9.2f} {restore_['rss_mib']:>7.0f} "
            f"{nix_copy:>10.2f} {restore_['seconds'] / nix_copy:>8.2f}"
        )

    ours_raw = run_worker("restore", nar, "none", sha, size, work / "ours-raw")
    nix_raw = nix(env, "nix-store", "--restore", str(work / "nix-raw"), stdin=nar)
    ours_hash = run_worker("hash-path", tree, "none", sha, size, work / "unused")
    nix_hash = nix(env, "nix", "hash", "path", str(tree))
    print()
    print(f"{'task':<34} {'ours s':>7} {'nix s':>7} {'ours/nix':>8} {'our RSS MiB':>11}")
    for task, ours, theirs in [
        ("restore raw NAR (nix-store --restore)", ours_raw, nix_raw),
        ("dump + sha256 (nix hash path)", ours_hash, nix_hash),
    ]:
        print(
            f"{task:<34} {ours['seconds']:>7.2f} {theirs:>7.2f} "
            f"{ours['seconds'] / theirs:>8.2f} {ours['rss_mib']:>11.0f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, path, codec, sha, size, out = sys.argv[2:8]
        worker(mode, path, codec, sha, int(size), out)
    else:
        main()
