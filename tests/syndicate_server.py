"""Test helpers for dataspaces in other processes.

``SyndicateServer`` runs a real ``syndicate-server --no-banner -c CONFIG`` with a generated
config: a fresh key, a private unix socket (in a 0700 directory, because the server makes its
socket world-accessible) and a loopback TCP port. ``syndicate_server`` is the fixture; import
it into a test module to use it.

``ClientProcess`` runs a tiny dataspace client (``CLIENT_SCRIPT``) in a separate OS process
through ``substituter.dataspace.connect``: it asserts ``<hello NAME>`` (plus any extra
assertions) on every connection and prints ``+ VALUE`` / ``- VALUE`` for the ``<hello _>``
assertions it sees come and go, ``connected`` on each accepted capability, ``synced`` when a
sync with the dataspace completes, and ``refused REASON`` when its capability is turned away.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from substituter.dataspace.gatekeeper import mint
from tests.conftest import require_tool

OID = "substituter"
READY_TIMEOUT = 30.0


def free_loopback_port() -> int:
    """A port free right now (syndicate-server cannot report the port it bound to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SyndicateServer:
    """A private syndicate-server; ``start``/``stop``/``restart`` keep the same key and addresses."""

    def __init__(self, directory: Path, executable: str) -> None:
        self.directory = directory
        self.executable = executable
        self.key = secrets.token_bytes(16)
        self.socket_dir = directory / "sock"
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.unix_path = self.socket_dir / "syndicate.sock"
        self.tcp_port = free_loopback_port()
        self.config_path = directory / "server.pr"
        self.log_path = directory / "server.log"
        self.config_path.write_text(self._config())
        self._process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        return (
            "let ?ds = dataspace\n"
            f'<require-service <relay-listener <tcp "127.0.0.1" {self.tcp_port}> $gatekeeper>>\n'
            f'<require-service <relay-listener <unix "{self.unix_path}"> $gatekeeper>>\n'
            f'<bind <ref {{oid: "{OID}" key: #x"{self.key.hex()}"}}> $ds #f>\n'
        )

    @property
    def cap(self) -> str:
        """The sturdy ref granting the dataspace."""
        return mint(self.key, OID)

    @property
    def unix_addr(self) -> str:
        return f'<unix "{self.unix_path}">'

    @property
    def tcp_addr(self) -> str:
        return f'<tcp "127.0.0.1" {self.tcp_port}>'

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("syndicate-server already running")
        self.unix_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [self.executable, "--no-banner", "-c", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"syndicate-server exited early:\n{self.log_path.read_text()}")
            if _accepts(socket.AF_UNIX, str(self.unix_path)) and _accepts(
                socket.AF_INET, ("127.0.0.1", self.tcp_port)
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"syndicate-server not ready in {READY_TIMEOUT}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def _accepts(family: int, address: object) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.connect(address)
        except OSError:
            return False
    return True


@pytest.fixture
def syndicate_server(tmp_path: Path) -> Iterator[SyndicateServer]:
    """A running private syndicate-server (stopped after the test)."""
    server = SyndicateServer(tmp_path / "syndicate-server", require_tool("syndicate-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


CLIENT_SCRIPT = r"""
import asyncio, sys
from preserves import Record, Symbol, parse, stringify
from syndicate import actor, turn, patterns as P
from syndicate.dataspace import during
from substituter.dataspace.connect import connect

addr, cap, name, *extra = sys.argv[1:]

def say(line):
    print(line, flush=True)

def boot():
    @connect(addr, cap, retry_delay=0.1, on_refused=lambda reason: say("refused " + reason))
    def on_dataspace(ds):
        turn.publish(ds, Record(Symbol("hello"), [name]))
        for text in extra:
            turn.publish(ds, parse(text))

        @during(ds, P.bind(P.rec("hello", P._)))
        def seen(value):
            say("+ " + stringify(value))
            return lambda: say("- " + stringify(value))

        say("connected")
        turn.sync(ds, lambda: say("synced"))

actor.System(loop=asyncio.new_event_loop()).run(boot, configure_logging=False)
"""


class ClientProcess:
    """A dataspace client in its own OS process; read what it printed with ``wait_for``."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, addr: str, cap: str, name: str, *extra: str) -> ClientProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT_SCRIPT, addr, cap, name, *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            async with self._changed:
                self.lines.append(raw.decode().rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, line: str, count: int = 1, timeout: float = 20.0) -> None:
        """Until ``line`` has been printed ``count`` times; fails with everything printed so far."""

        async def seen() -> None:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self.lines.count(line) >= count or self._reader.done()
                )

        try:
            await asyncio.wait_for(seen(), timeout)
        except TimeoutError:
            pass
        if self.lines.count(line) < count:
            raise AssertionError(f"client never printed {line!r} x{count}; printed {self.lines}")

    async def exited(self, timeout: float = 20.0) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self._reader
