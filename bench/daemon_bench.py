"""The daemon next to Nix: NAR throughput, narinfo latency, a 1,000-path closure, peak RSS.

    .venv/bin/python bench/daemon_bench.py [--nar] [--narinfo] [--closure] [--rss]
        [--mib 256] [--compression zstd|xz] [--runs 3] [--paths 1000] [--narinfos 200]
        [--clients 25] [--client-loop uvloop|asyncio] [--rss-mib 1024] [--keep DIR]

With no part flag every part runs.  Fixtures are built with real Nix, signed, published with
`nix copy --to file://DIR?compression=…` and served by nginx on 127.0.0.1 (started here, with a
generated config in a temp dir).  Every figure is a same-run comparison:

  --nar      one path of --mib MiB (half random, half text): `nix copy --from` nginx, against
             `nix copy --from` the daemon (binary-cache fetcher -> nginx), cold (fresh daemon,
             empty NAR cache) and warm (same daemon again, NAR cache hit).  Median of --runs.
  --narinfo  --narinfos distinct narinfos, warmed by one request each, then --clients
             keep-alive clients asking for all of them in their own order: p50/p99 from the
             daemon and from nginx serving the files, median of --runs interleaved rounds,
             and the daemon's CPU time per request (clients on uvloop when installed, else
             --client-loop asyncio).
  --closure  a closure of --paths small paths (`builtins.toFile` texts referencing each other:
             real references, no builds): `nix copy --from` nginx against the daemon.
  --rss      the daemon's peak RSS (VmHWM of its pid) while Nix copies a --rss-mib MiB path
             through it.

Every Nix run gets a fresh chroot store and XDG_CACHE_HOME.  Not a test: it prints figures,
it does not pass or fail.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.daemon_proc import DaemonProcess, free_port  # noqa: E402

NIX_CONFIG = "\n".join(
    [
        "experimental-features = nix-command",
        "sandbox = false",
        "build-users-group =",
        "substituters =",
        "narinfo-cache-negative-ttl = 0",
        "narinfo-cache-positive-ttl = 0",
    ]
)
MIB = 1 << 20


# -- Nix in a private environment ---------------------------------------------------------------


class NixRunner:
    """Runs real Nix commands; each `fresh_env` has its own XDG_CACHE_HOME (narinfo cache)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = dict(os.environ, NIX_CONFIG=NIX_CONFIG)
        self.env.pop("NIX_REMOTE", None)
        self._count = 0
        self.last_cpu = 0.0

    def fresh_dir(self, name: str) -> Path:
        self._count += 1
        return self.work / f"{name}-{self._count}"

    def fresh_env(self) -> dict[str, str]:
        xdg = self.fresh_dir("xdg")
        xdg.mkdir()
        return dict(self.env, XDG_CACHE_HOME=str(xdg))

    def run(self, *args: str) -> str:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc.stdout.strip()

    def copy_from(self, url: str, public_key: str, *paths: str) -> float:
        """`nix copy --from url` into a fresh chroot store; returns wall seconds."""
        store = self.fresh_dir("store")
        args = ["nix", "copy", "--from", url, "--to", str(store),
                "--option", "trusted-public-keys", public_key, *paths]
        settle()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(args, env=self.fresh_env(), capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        #: Nix's own user + system CPU for the last copy (children's rusage, nothing else runs then)
        self.last_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise RuntimeError(f"nix copy --from {url} failed ({proc.returncode}):\n{proc.stderr}")
        # The copy must be complete and valid, else the time means nothing.
        self.run("nix-store", "--store", str(store), "--check-validity", *paths)
        remove_tree(store)
        return seconds


def settle() -> None:
    """Write back what earlier runs left dirty (stores written, trees removed) before a timed
    run: on this machine a copy after others without it took up to 40% longer, in CPU as well
    (1,000-path closure, 8 copies in a row: 3.07 s, then 3.90-4.20 s; 3.02 s again after a sync)."""
    os.sync()


def remove_tree(path: Path) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Published:
    """Store paths published to a signed `file://` cache directory."""

    cache: Path
    top: str
    paths: list[str]
    public_key: str


class Fixtures:
    """Builds, signs and publishes the benchmark's store paths with real Nix."""

    def __init__(self, nix: NixRunner, work: Path) -> None:
        self.nix = nix
        self.work = work
        self.stamp = str(time.time_ns())
        self.built: list[str] = []
        secret, public = work / "key.sk", work / "key.pk"
        nix.run("nix-store", "--generate-binary-cache-key", f"bench-{self.stamp}", str(secret), str(public))
        self.secret_key = secret
        self.public_key = public.read_text().strip()

    def _eval_file(self, name: str, expr: str) -> Path:
        path = self.work / f"{name}.nix"
        path.write_text(expr)
        return path

    def big_path(self, mib: int) -> str:
        """One output of `mib` MiB: half /dev/urandom, half numbered text lines (~26 bytes each)."""
        half = (mib * MIB) // 2
        lines = half // 20 + 1
        script = (
            f"mkdir $out; head -c {half} /dev/urandom > $out/random; "
            f"seq -f 'line %.0f of some ordinary text' 1 {lines} | head -c {half} > $out/text"
        )
        expr = (
            f'derivation {{ name = "bench-nar-{mib}m"; system = builtins.currentSystem; '
            f'builder = "/bin/sh"; args = [ "-c" "{script}" ]; PATH = "/usr/bin:/bin"; '
            f'stamp = "{self.stamp}"; }}'
        )
        out = self.nix.run("nix-build", "--no-out-link", str(self._eval_file(f"big-{mib}", expr)))
        self.built.append(out)
        return out

    def text_closure(self, n: int) -> tuple[str, list[str]]:
        """A closure of `n` paths: `n - 1` small texts, text i referencing texts i/2 and i/3 (a DAG
        of real references about log2(n) deep, like real closures rather than one long chain), and
        a top text referencing all of them."""
        expr = (
            f'let stamp = "{self.stamp}";\n'
            "  step = acc: i: acc ++ [ (builtins.toFile \"bench-p${toString i}\"\n"
            "    \"${stamp} ${toString i} ${if i < 2 then \"\" else builtins.elemAt acc (i / 2)} "
            "${if i < 3 then \"\" else builtins.elemAt acc (i / 3)}\") ];\n"
            f"  all = builtins.foldl' step [] (builtins.genList (i: i) {n - 1});\n"
            'in builtins.toFile "bench-top" (builtins.concatStringsSep "\\n" all)\n'
        )
        file = self._eval_file(f"closure-{n}", expr)
        top = json.loads(self.nix.run("nix-instantiate", "--eval", "--read-write-mode", str(file)))
        paths = self.nix.run("nix-store", "-qR", top).split()
        self.built.extend(paths)
        return top, paths

    def publish(self, name: str, top: str, compression: str) -> Published:
        self.nix.run("nix", "store", "sign", "-r", "--key-file", str(self.secret_key), top)
        cache = self.work / f"cache-{name}"
        self.nix.run("nix", "copy", "--to", f"file://{cache}?compression={compression}", top)
        paths = self.nix.run("nix-store", "-qR", top).split()
        return Published(cache, top, paths, self.public_key)

    def delete_built(self) -> None:
        """Drop what this run built from /nix/store (best effort: GBs otherwise pile up)."""
        if self.built:
            subprocess.run(["nix-store", "--delete", *self.built], env=self.nix.env,
                           capture_output=True, check=False)


# -- servers ------------------------------------------------------------------------------------


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ text/x-nix-narinfo narinfo; text/x-nix-cache-info nix-cache-info; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


@contextmanager
def nginx(root: Path, prefix: Path) -> Iterator[str]:
    """nginx serving `root` on 127.0.0.1 (its own config, pid and logs under `prefix`); yields its URL."""
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx_bin).exists():
        raise SystemExit("nginx not found: apt-get install -y nginx-light")
    prefix.mkdir(parents=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, root=root))
    proc = subprocess.Popen([nginx_bin, "-c", str(conf), "-p", str(prefix)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/nix-cache-info", proc, prefix / "error.log")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wait_for_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited: {log.read_text() if log.exists() else ''}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def start_daemon(nix: NixRunner, upstream: str, public_key: str) -> DaemonProcess:
    """A fresh `substituter daemon` (new state dir: empty NAR cache) over one binary cache."""
    home = nix.fresh_dir("daemon")
    home.mkdir()
    config = {
        "trusted-public-keys": [public_key],
        "log-level": "warning",
        "fetchers": [{"type": "binary-cache", "name": "nginx", "url": upstream}],
    }
    return DaemonProcess(home, config, nix.env).start()


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of a process in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmHWM"], fields["VmRSS"]


# -- parts --------------------------------------------------------------------------------------


def three_ways(fx: Fixtures, upstream: str, public_key: str, top: str, runs: int
               ) -> tuple[list[float], list[float], list[float], dict[str, list[float]]]:
    """Nix direct, then a fresh daemon cold and warm, ``runs`` times: wall seconds of each, and
    CPU seconds (Nix's for each copy, the daemon's during the cold and the warm copy)."""
    direct: list[float] = []
    cold: list[float] = []
    warm: list[float] = []
    cpu: dict[str, list[float]] = {k: [] for k in ("nix direct", "nix cold", "nix warm", "daemon cold", "daemon warm")}
    for _ in range(runs):
        direct.append(fx.nix.copy_from(upstream, public_key, top))
        cpu["nix direct"].append(fx.nix.last_cpu)
        daemon = start_daemon(fx.nix, upstream, public_key)
        assert daemon.proc is not None
        pid = daemon.proc.pid
        try:
            for label, times in (("cold", cold), ("warm", warm)):
                used = cpu_seconds(pid)
                times.append(fx.nix.copy_from(daemon.url, public_key, top))
                cpu[f"daemon {label}"].append(cpu_seconds(pid) - used)
                cpu[f"nix {label}"].append(fx.nix.last_cpu)
        finally:
            daemon.stop()
            remove_tree(daemon.tmp)
    return direct, cold, warm, cpu


def print_cpu(cpu: dict[str, list[float]]) -> None:
    print("   CPU s (user + system, median): " + ", ".join(
        f"{label} {statistics.median(values):.2f}" for label, values in cpu.items()) + "\n")


def bench_nar(fx: Fixtures, mib: int, compression: str, runs: int) -> None:
    print(f"== 1. {mib} MiB NAR (half random, half text), cache compression={compression}")
    top = fx.big_path(mib)
    pub = fx.publish(f"nar-{compression}", top, compression)
    with nginx(pub.cache, fx.work / f"nginx-nar-{compression}") as upstream:
        direct, cold, warm, cpu = three_ways(fx, upstream, pub.public_key, top, runs)
    base = statistics.median(direct)
    print(f"   {'nix copy --from':<28} {'median s':>8} {'MiB/s':>7} {'ratio':>6}   runs")
    for label, times in [("nginx (Nix direct)", direct), ("daemon, cold NAR cache", cold),
                         ("daemon, warm NAR cache", warm)]:
        med = statistics.median(times)
        each = " ".join(f"{t:.2f}" for t in times)
        print(f"   {label:<28} {med:>8.2f} {mib / med:>7.0f} {med / base:>6.2f}   {each}")
    print("   ratio = time / Nix direct time (target <= 1.0)")
    print_cpu(cpu)


def bench_closure(fx: Fixtures, n: int, runs: int) -> Published:
    print(f"== 3. closure of {n} small paths (builtins.toFile texts with references)")
    top, _ = fx.text_closure(n)
    pub = fx.publish(f"closure-{n}", top, "zstd")
    assert len(pub.paths) == n, f"closure has {len(pub.paths)} paths, expected {n}"
    with nginx(pub.cache, fx.work / "nginx-closure") as upstream:
        direct, cold, warm, cpu = three_ways(fx, upstream, pub.public_key, top, runs)
    base = statistics.median(direct)
    print(f"   {'nix copy --from':<28} {'median s':>8} {'ratio':>6}   runs")
    for label, times in [("nginx (Nix direct)", direct), ("daemon, cold", cold),
                         ("daemon, warm (2nd copy)", warm)]:
        med = statistics.median(times)
        print(f"   {label:<28} {med:>8.2f} {med / base:>6.2f}   {' '.join(f'{t:.2f}' for t in times)}")
    print("   ratio = time / Nix direct time (target <= 1.1)")
    print_cpu(cpu)
    return pub


async def _http_client(port: int, targets: list[str], latencies: list[float]) -> None:
    """One keep-alive HTTP/1.1 connection asking for `targets` in turn (a bare client, so the
    figures are the server's, not a client library's)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for target in targets:
            request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            status = head.split(b" ", 2)[1]
            if status != b"200":
                raise RuntimeError(f"GET {target}: {head.decode(errors='replace').splitlines()[0]}")
    finally:
        writer.close()


def measure_latency(url: str, targets: list[str], clients: int, seed: int) -> tuple[list[float], float]:
    """Every client asks for every target once, in its own order; (sorted latencies, wall s)."""
    port = int(url.rsplit(":", 1)[1])
    latencies: list[float] = []
    orders = []
    for i in range(clients):
        order = list(targets)
        random.Random(seed + i).shuffle(order)
        orders.append(order)

    async def run() -> None:
        await asyncio.gather(*(_http_client(port, order, latencies) for order in orders))

    start = time.perf_counter()
    with asyncio.Runner(loop_factory=client_loop()) as runner:
        runner.run(run())
    return sorted(latencies), time.perf_counter() - start


#: "uvloop" (when installed) or "asyncio": the narinfo clients' event loop (--client-loop).
CLIENT_LOOP = "asyncio"


def client_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop for the clients by default: asyncio's own loop costs the 25 clients ~34 µs of CPU
    per request against ~15 µs (measured against nginx), so it would set the pace of any fast
    server rather than measure it."""
    if CLIENT_LOOP == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def bench_narinfo(fx: Fixtures, pub: Published, count: int, clients: int, runs: int) -> None:
    print(f"== 2. narinfo latency: {count} distinct paths, warm, keep-alive clients "
          f"({CLIENT_LOOP} client loop; median of {runs} interleaved rounds)")
    targets = [f"/{Path(p).name[:32]}.narinfo" for p in pub.paths[:count]]
    with nginx(pub.cache, fx.work / "nginx-narinfo") as upstream:
        daemon = start_daemon(fx.nix, upstream, pub.public_key)
        assert daemon.proc is not None
        try:
            servers = [("daemon", daemon.url), ("nginx", upstream)]
            for _, url in servers:
                measure_latency(url, targets, 1, 0)  # warm: one request per path
            rows: dict[tuple[str, int], list[tuple[float, float, float, float, float]]] = {}
            for r in range(runs):  # interleaved, so both servers see the same machine load
                for name, url in servers:
                    for n in (1, clients):
                        cpu = cpu_seconds(daemon.proc.pid)
                        lat, wall = measure_latency(url, targets, n, 1 + r)
                        cpu_us = (cpu_seconds(daemon.proc.pid) - cpu) / len(lat) * 1e6
                        rows.setdefault((name, n), []).append(
                            (percentile(lat, 0.5) * 1e3, percentile(lat, 0.99) * 1e3, lat[-1] * 1e3,
                             len(lat) / wall, cpu_us))
            print(f"   {'server':<8} {'clients':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'req/s':>7} "
                  f"{'CPU µs/req':>10}   p50 of each round")
            for (name, n), values in rows.items():
                med = [statistics.median(v[i] for v in values) for i in range(5)]
                # /proc counts CPU in 10 ms ticks: meaningful over the many-client rounds only.
                cpu_text = f"{med[4]:>10.1f}" if name == "daemon" and n > 1 else f"{'':>10}"
                print(f"   {name:<8} {n:>7} {med[0]:>7.2f} {med[1]:>7.2f} {med[2]:>7.2f} {med[3]:>7.0f} "
                      f"{cpu_text}   {' '.join(f'{v[0]:.2f}' for v in values)}")
            hwm, rss = peak_rss_mib(daemon.proc.pid)
            print(f"   daemon peak RSS after {count} narinfos: {hwm:.0f} MiB; CPU µs/req: the daemon's "
                  "user+system time per request")
        finally:
            daemon.stop()
            remove_tree(daemon.tmp)
    print(f"   targets: warm p50 <= 0.5 ms, p99 <= 5 ms with {clients} clients\n")


def bench_rss(fx: Fixtures, mib: int, compression: str) -> None:
    print(f"== 4. daemon peak RSS while Nix copies a {mib} MiB NAR through it ({compression} upstream)")
    top = fx.big_path(mib)
    pub = fx.publish(f"rss-{mib}", top, compression)
    with nginx(pub.cache, fx.work / "nginx-rss") as upstream:
        daemon = start_daemon(fx.nix, upstream, pub.public_key)
        try:
            assert daemon.proc is not None
            idle_hwm, _ = peak_rss_mib(daemon.proc.pid)
            direct = fx.nix.copy_from(upstream, pub.public_key, top)
            seconds = fx.nix.copy_from(daemon.url, pub.public_key, top)
            hwm, rss = peak_rss_mib(daemon.proc.pid)
        finally:
            daemon.stop()
            remove_tree(daemon.tmp)
    print(f"   daemon VmHWM: {idle_hwm:.0f} MiB after start, {hwm:.0f} MiB after serving "
          f"(VmRSS now {rss:.0f} MiB); target <= 100 MB ({100e6 / MIB:.0f} MiB)")
    print(f"   nix copy: {seconds:.2f} s through the daemon (cold), {direct:.2f} s from nginx "
          f"(ratio {seconds / direct:.2f})\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nar", action="store_true", help="part 1: NAR throughput")
    parser.add_argument("--narinfo", action="store_true", help="part 2: narinfo latency")
    parser.add_argument("--closure", action="store_true", help="part 3: many-path closure")
    parser.add_argument("--rss", action="store_true", help="part 4: peak RSS on a big NAR")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--compression", choices=["zstd", "xz", "none"], default="zstd")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--paths", type=int, default=1000)
    parser.add_argument("--narinfos", type=int, default=200)
    parser.add_argument("--clients", type=int, default=25)
    parser.add_argument("--client-loop", choices=["uvloop", "asyncio"], default=None,
                        help="the narinfo clients' event loop (default: uvloop when installed)")
    parser.add_argument("--rss-mib", type=int, default=1024)
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    opts = parser.parse_args()
    global CLIENT_LOOP
    CLIENT_LOOP = opts.client_loop or ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # SIGTERM runs the `finally` blocks too, so no nginx or daemon is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    everything = not (opts.nar or opts.narinfo or opts.closure or opts.rss)

    work = opts.keep or Path(tempfile.mkdtemp(prefix="daemon-bench-"))
    work.mkdir(exist_ok=True)
    nix = NixRunner(work)
    fx = Fixtures(nix, work)
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{nix.run('nix', '--version')}, {subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip()}\n")
    try:
        if everything or opts.nar:
            bench_nar(fx, opts.mib, opts.compression, opts.runs)
        if everything or opts.narinfo or opts.closure:
            # The narinfo part reuses the closure's cache when both run.
            if everything or opts.closure:
                pub = bench_closure(fx, opts.paths, opts.runs)
            else:
                top, _ = fx.text_closure(opts.narinfos + 1)
                pub = fx.publish("narinfo", top, "zstd")
            if everything or opts.narinfo:
                bench_narinfo(fx, pub, opts.narinfos, opts.clients, opts.runs)
        if everything or opts.rss:
            bench_rss(fx, opts.rss_mib, opts.compression)
    finally:
        fx.delete_built()
        if opts.keep is None:
            remove_tree(work)


if __name__ == "__main__":
    main()
