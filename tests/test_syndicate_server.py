"""Interop with a real syndicate-server: the same client code as against the embedded relay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from substituter.dataspace.gatekeeper import mint
from tests.syndicate_server import OID, ClientProcess, SyndicateServer, syndicate_server

__all__ = ["syndicate_server"]  # the fixture, re-exported so pytest finds it here

pytestmark = pytest.mark.syndicate_server


@pytest.fixture
async def daemon_and_fetcher(
    syndicate_server: SyndicateServer,
) -> AsyncIterator[tuple[ClientProcess, ClientProcess]]:
    """A "daemon-side" client on the unix socket and a "fetcher-side" one over loopback TCP."""
    daemon = await ClientProcess.start(syndicate_server.unix_addr, syndicate_server.cap, "daemon")
    fetcher = await ClientProcess.start(syndicate_server.tcp_addr, syndicate_server.cap, "fetcher")
    try:
        yield daemon, fetcher
    finally:
        await daemon.kill()
        await fetcher.kill()


async def see_each_other(daemon: ClientProcess, fetcher: ClientProcess, times: int = 1) -> None:
    for client in (daemon, fetcher):
        await client.wait_for("connected", times)
        await client.wait_for('+ <hello "daemon">', times)
        await client.wait_for('+ <hello "fetcher">', times)


async def test_assertions_flow_both_ways(
    daemon_and_fetcher: tuple[ClientProcess, ClientProcess],
) -> None:
    daemon, fetcher = daemon_and_fetcher
    await see_each_other(daemon, fetcher)
    for client in (daemon, fetcher):  # a sync round-trips through the server too
        await client.wait_for("synced")


async def test_killed_client_is_retracted(
    daemon_and_fetcher: tuple[ClientProcess, ClientProcess],
) -> None:
    daemon, fetcher = daemon_and_fetcher
    await see_each_other(daemon, fetcher)
    await fetcher.kill()
    await daemon.wait_for('- <hello "fetcher">')
    assert '- <hello "daemon">' not in daemon.lines


async def test_restart_reconnects_and_reasserts(
    syndicate_server: SyndicateServer,
    daemon_and_fetcher: tuple[ClientProcess, ClientProcess],
) -> None:
    daemon, fetcher = daemon_and_fetcher
    await see_each_other(daemon, fetcher)
    await asyncio.to_thread(syndicate_server.restart)
    # The lost connection retracts what each saw; after reconnecting both re-assert and re-see.
    await daemon.wait_for('- <hello "fetcher">')
    await fetcher.wait_for('- <hello "daemon">')
    await see_each_other(daemon, fetcher, times=2)


@pytest.mark.parametrize(
    "bad_cap",
    [mint(b"not the server key", OID),
     '<ref {oid: "substituter" sig: #x"00112233445566778899aabbccddeeff"}>'],
    ids=["wrong-key", "forged-sig"],
)
async def test_client_without_capability_gets_nothing(
    syndicate_server: SyndicateServer,
    daemon_and_fetcher: tuple[ClientProcess, ClientProcess],
    bad_cap: str,
) -> None:
    daemon, fetcher = daemon_and_fetcher
    await see_each_other(daemon, fetcher)
    intruder = await ClientProcess.start(syndicate_server.tcp_addr, bad_cap, "intruder")
    try:
        # syndicate-server answers <rejected sturdyref-failed-validation>; the client gives up.
        assert await intruder.exited() == 0
        assert intruder.lines and intruder.lines[0].startswith("refused "), intruder.lines
        assert not any(line.startswith(("+", "connected")) for line in intruder.lines)
        # A client connecting after it sees the two legitimate hellos and no intruder.
        late = await ClientProcess.start(syndicate_server.unix_addr, syndicate_server.cap, "late")
        try:
            await late.wait_for('+ <hello "fetcher">')
            await late.wait_for('+ <hello "late">')
            assert not any("intruder" in line for line in late.lines + daemon.lines)
        finally:
            await late.kill()
    finally:
        await intruder.kill()
