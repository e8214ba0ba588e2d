"""The daemon: dataspace, fetchers, broker and Nix's HTTP endpoint in one actor system.

Start-up order matters: the dataspace first (embedded, or a connection to a syndicate-server),
then the fetchers (started, then attached), then the broker, which must have seen the in-process
fetchers before the HTTP endpoint accepts its first request (else an early narinfo request would
find "no fetchers" and Nix would cache that 404 for an hour).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from syndicate import actor, turn

from .broker import Broker
from .config import Config, parse_listen
from .dataspace.gatekeeper import load_or_create_key, mint
from .dataspace.relay import DEFAULT_OID, serve_dataspace
from .http_cache import Narinfos, make_app
from .http_front import FrontServer
from .nar_service import NarService
from .runtime import Runtime

__all__ = ["Daemon"]

log = logging.getLogger("substituter.daemon")

#: Written beside the dataspace socket so local tools (`substituter status`) can attach.
CAP_FILE = "dataspace.cap"


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime = Runtime(config)
        self.metrics = self.runtime.metrics
        self.http_address: tuple[str, int] | Path | None = None
        self.ready: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def broker(self) -> Broker:
        return self.runtime.broker

    @property
    def nars(self) -> NarService:
        return self.runtime.nars

    # --- inside the actor system -----------------------------------------------------------

    def boot(self) -> None:
        """Runs in the daemon actor's first turn."""
        self.runtime.boot()
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.relay = None
        if not self.runtime.remote:
            # The embedded dataspace, for out-of-process fetchers and `substituter status`.
            key = load_or_create_key(self.config.state_dir)
            ds_config = self.config.dataspace
            tcp = parse_listen(ds_config.tcp, "dataspace.tcp") if ds_config.tcp else None
            self.relay = serve_dataspace(
                self.runtime.ds, key, unix_path=self.config.dataspace_socket, tcp=tcp,  # type: ignore[arg-type]
                allow_non_loopback=ds_config.allow_remote,
            )
            _write_private(self.config.dataspace_socket.with_name(CAP_FILE), mint(key, DEFAULT_OID) + "\n")
        turn.linked_task()(self._main)

    async def _main(self, _facet: Any) -> None:
        assert self.ready is not None and self._stop is not None
        runner: web.AppRunner | None = None
        front: FrontServer | None = None
        server: asyncio.Server | None = None
        try:
            if self.relay is not None:
                await self.relay.ready
            await self.runtime.start()
            narinfos = Narinfos(self)
            runner = web.AppRunner(make_app(self, narinfos), access_log=None, handle_signals=False)
            await runner.setup()
            assert runner.server is not None
            # Narinfo requests are answered by the front; it hands everything else to aiohttp.
            front = FrontServer(narinfos, runner.server)
            listen = parse_listen(self.config.listen)
            loop = asyncio.get_running_loop()
            if isinstance(listen, Path):
                server = await loop.create_unix_server(front, str(listen), backlog=128)
            else:
                server = await loop.create_server(front, listen[0], listen[1], reuse_address=True, backlog=128)
            self.http_address = _bound_address(server, listen)
            log.info("serving Nix on %s with %d fetcher(s): %s", _show_address(self.http_address),
                     len(self.runtime.fetchers), ", ".join(f.name for f, _ in self.runtime.fetchers))
            _notify_systemd("READY=1")
            self.ready.set()
            await self._stop.wait()
            log.info("shutting down")
            _notify_systemd("STOPPING=1")
        finally:
            if server is not None:
                server.close()
            if front is not None:
                front.close()
            if runner is not None:
                await runner.cleanup()  # lets in-flight responses finish (aiohttp's shutdown timeout)
            await self.runtime.stop()
            self.ready.set()
        # Returning (not True) stops the facet, and with it the actor and the system.

    # --- outside ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the daemon to shut down; safe from any thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def run(self, on_ready: Callable[[Daemon], None] | None = None) -> None:
        """Block running the daemon until SIGTERM/SIGINT (or request_stop)."""
        loop = self._loop = new_event_loop()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (RuntimeError, ValueError):  # not in the main thread (tests)
                pass
        if on_ready is not None:
            async def watch() -> None:
                assert self.ready is not None
                await self.ready.wait()
                on_ready(self)
            loop.create_task(watch())
        actor.System(loop=loop).run(self.boot, name="substituter", configure_logging=False)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (its transports cost a fraction of asyncio's per request);
    ``SUBSTITUTER_EVENT_LOOP=asyncio`` keeps the standard loop."""
    if os.environ.get("SUBSTITUTER_EVENT_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _bound_address(server: asyncio.Server, listen: tuple[str, int] | Path) -> tuple[str, int] | Path:
    if isinstance(listen, Path) or not server.sockets:
        return listen
    host, port = server.sockets[0].getsockname()[:2]
    return host, port


def _show_address(addr: tuple[str, int] | Path | None) -> str:
    if isinstance(addr, tuple):
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        return f"http://{host}:{addr[1]}"
    return f"unix:{addr}"


def _notify_systemd(state: str) -> None:
    """sd_notify without a library: one datagram to $NOTIFY_SOCKET, if systemd gave one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)
