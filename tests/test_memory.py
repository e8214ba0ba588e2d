"""glibc malloc settings of the daemon (substituter.memory), observed in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from substituter.memory import ARENA_MAX, MMAP_THRESHOLD, TRIM_THRESHOLD, tune_malloc

from .daemon_proc import DaemonProcess

glibc = pytest.mark.skipif(
    not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="glibc only"
)

# Run in a fresh interpreter: mallopt changes the whole process, and arenas are per thread.
PROBE = """
import ctypes, sys, threading
from substituter.memory import tune_malloc

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = tune_malloc() if sys.argv[1] == "tuned" else {}
before = libc.mallinfo2().hblkhd
buffer = bytes(1 << 20)  # above glibc's default 128 KiB mmap threshold, below ours
mapped = libc.mallinfo2().hblkhd - before
pieces = [bytes(256 << 10) for _ in range(12)]
del pieces
kept = libc.mallinfo2().keepcost  # freed heap top not yet given back

# Threads that allocate get arenas of their own, up to the arena limit.
go, done = threading.Barrier(5), threading.Event()
def worker():
    kept = [bytes(200_000) for _ in range(20)]
    go.wait()
    done.wait()
threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads:
    t.start()
go.wait()
sys.stderr.flush()
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
done.set()
print(sorted(applied), mapped, kept)
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}


def _probe(mode: str, **env: str) -> tuple[str, int, int, int]:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          env={**_clean_env(), **env}, check=True)
    *names, mapped, kept = proc.stdout.split()
    arenas = sum(1 for line in proc.stderr.splitlines() if line.startswith("Arena "))
    return " ".join(names), int(mapped), arenas, int(kept)


@glibc
def test_tuned_process_keeps_buffers_in_one_heap() -> None:
    names, mapped, arenas, kept = _probe("tuned")
    assert names == "['MALLOC_ARENA_MAX', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_']"
    assert mapped == 0  # the 1 MiB buffer came from the heap
    assert arenas == ARENA_MAX == 1
    assert 2 << 20 <= kept <= TRIM_THRESHOLD  # 3 MiB freed at the top stays for the next buffers


@glibc
def test_untuned_process_maps_buffers_and_makes_arenas() -> None:
    # The control: the same probe without the settings shows what they change.
    _, mapped, arenas, kept = _probe("untuned")
    assert mapped >= 1 << 20
    assert arenas > 1
    assert kept < 1 << 20


@glibc
def test_settings_from_the_environment_win() -> None:
    names, mapped, arenas, _ = _probe("tuned", MALLOC_ARENA_MAX="3")
    assert names == "['MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_']"
    assert mapped == 0
    assert arenas == 3
    assert tune_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {}


@glibc
def test_daemon_applies_them_at_start(tmp_path: Path) -> None:
    config = {"log-level": "debug", "fetchers": []}
    with DaemonProcess(tmp_path, config, _clean_env()) as daemon:
        log = daemon.log()
    assert f"malloc settings: {{'MALLOC_ARENA_MAX': {ARENA_MAX}, 'MALLOC_MMAP_THRESHOLD_': " \
           f"{MMAP_THRESHOLD}, 'MALLOC_TRIM_THRESHOLD_': {TRIM_THRESHOLD}}}" in log, log
