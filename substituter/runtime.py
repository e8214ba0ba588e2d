"""The in-process machinery shared by the daemon and the one-off CLI: dataspace, fetchers, broker.

:class:`Runtime` is booted inside a turn of an actor.  It owns the embedded dataspace, starts the
configured fetchers and attaches each through a :class:`FetcherHost`, and runs the
:class:`Broker` and the :class:`NarService` over them.  Frontends (the HTTP endpoint, `fetch`)
only talk to ``runtime.broker`` and ``runtime.nars``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from syndicate import turn
from syndicate.actor import Turn

from .broker import Broker
from .config import Config, FetcherConfig
from .dataspace.barrier import barrier
from .dataspace.dataspace import Dataspace
from .errors import ConfigError, PluginError
from .fetcher_host import FetcherHost
from .metrics import Metrics
from .nar_cache import NarCache
from .nar_service import NarService
from .plugin import (
    DataspaceLink,
    Fetcher,
    FetcherContext,
    UriOpener,
    available_fetcher_types,
    load_fetcher_type,
    parse_options,
)
from .trust import TrustPolicy

__all__ = ["Runtime", "build_fetchers"]

log = logging.getLogger("substituter.runtime")


def build_fetchers(config: Config, link: DataspaceLink | None = None) -> list[tuple[Fetcher, FetcherConfig]]:
    """Instantiate every configured fetcher (options validated; nothing started)."""
    built = []
    for i, fc in enumerate(config.fetchers):
        cls = load_fetcher_type(fc.type)
        options = parse_options(cls.Options, fc.options, f"fetchers[{i}] ({fc.name})")
        context = FetcherContext(store_dir=config.store_dir,
                                 state_dir=config.state_dir / "fetchers" / fc.name, dataspace=link)
        built.append((cls(fc.name, options, context, priority=fc.priority), fc))
    return built


class Runtime:
    def __init__(self, config: Config, *, trust: TrustPolicy | None = None,
                 spool_limit: int | None = None, metrics: Metrics | None = None,
                 durable_cache: bool = True, remote_openers: bool = True) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.trust = trust or TrustPolicy(config.trusted_public_keys)
        #: The dataspace as fetchers see it (e.g. ERIS block exchange), set on every attachment.
        self.link = DataspaceLink()
        self.fetchers = build_fetchers(config, self.link)
        self.cache = (
            NarCache(config.nar_cache_dir, config.nar_cache.max_size, durable=durable_cache)
            if config.nar_cache.enable else None
        )
        self.spool_limit = config.nar_cache.verify_first if spool_limit is None else spool_limit
        self.prefetch_limit = config.nar_cache.prefetch
        # Offers from out-of-process fetchers need them.  A one-off `fetch` on its own embedded
        # dataspace (exposed nowhere) gets offers only from its own fetchers, so it passes
        # remote_openers=False and is spared importing every installed plugin.
        self.openers = self._standalone_openers() if remote_openers or self.remote else {}
        self.ds: Any = None
        self.broker: Broker = None  # type: ignore[assignment]  # set by boot()
        self.nars: NarService = None  # type: ignore[assignment]
        self.facet: Any = None

    def boot(self) -> None:
        """Inside a turn: with an embedded dataspace, create it; fetchers and the broker attach
        in :meth:`start` (to a syndicate-server: on every (re)connection)."""
        self.facet = turn.active_facet()
        if not self.remote:
            self.ds = turn.ref(Dataspace())

    @property
    def remote(self) -> bool:
        return self.config.dataspace.connect is not None

    def _capability(self) -> str:
        ds = self.config.dataspace
        if ds.cap:
            return ds.cap
        assert ds.cap_file is not None  # config validation guarantees one of the two
        try:
            return ds.cap_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"dataspace.cap-file: cannot read {ds.cap_file}: {exc.strerror}") from exc

    def _attach(self, ds: Any, attached: asyncio.Future[None]) -> None:
        """In a turn of the facet that lives as long as ``ds`` is reachable: broker and fetchers."""
        self.ds = ds
        self.link.ref, self.link.facet = ds, turn.active_facet()
        local = {f.name: f for f, _ in self.fetchers}
        openers: dict[str, Any] = {scheme: o.open for scheme, o in self.openers.items()}
        local_answers: set[tuple[str, str]] = set()
        broker = Broker(ds, self.trust, locate_timeout=self.config.locate_timeout,
                        local_fetchers=local, openers=openers, metrics=self.metrics,
                        local_answers=local_answers)
        broker.boot()
        for fetcher, fc in self.fetchers:
            timeout = fc.locate_timeout or self.config.locate_timeout
            host = FetcherHost(fetcher, ds, locate_timeout=timeout, local_answers=local_answers)
            turn.facet(host.boot)

        def ready() -> None:
            self.broker = broker
            self.nars = NarService(broker.sources, self.cache, spool_limit=self.spool_limit,
                                   events=broker.events, prefetch_limit=self.prefetch_limit,
                                   refresh=lambda res: broker.settled(res.hash_part))
            if not attached.done():
                attached.set_result(None)

        # After this round trip the broker has been told of every <fetcher> asserted above.
        barrier(ds, ready)

    def _standalone_openers(self) -> dict[str, UriOpener]:
        """Openers for URIs in offers from out-of-process fetchers, from every installed plugin.

        ``file`` is never opened for remote offers: a peer must not make the daemon read local
        files (in-process local mirrors open their own files).
        """
        openers: dict[str, UriOpener] = {}
        context = FetcherContext(store_dir=self.config.store_dir)
        for kind in sorted(available_fetcher_types()):
            try:
                cls = load_fetcher_type(kind)
            except PluginError as exc:
                log.warning("%s", exc)
                continue
            wanted = [s for s in cls.schemes if s != "file" and s not in openers]
            opener = cls.opener(context) if wanted else None
            if opener is not None:
                openers.update(dict.fromkeys(wanted, opener))
        return openers

    async def start(self) -> None:
        """Start every fetcher, attach to the dataspace, and return once the broker is ready."""
        await asyncio.gather(*(o.start() for o in set(self.openers.values())))
        await asyncio.gather(*(f.start() for f, _ in self.fetchers))
        attached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.remote:
            address, cap = self.config.dataspace.connect, self._capability()
            assert address is not None

            def refused(reason: str) -> None:
                if not attached.done():
                    attached.set_exception(ConfigError(f"dataspace {address} refused dataspace.cap: {reason}"))

            from .dataspace.connect import connect  # only here: a one-off fetch rarely attaches

            def connect_remote() -> None:
                @connect(address, cap, on_refused=refused)
                def on_dataspace(ds: Any) -> None:
                    log.info("attached to the dataspace at %s", address)
                    self._attach(ds, attached)

            Turn.external(self.facet, connect_remote)
        else:
            Turn.external(self.facet, lambda: self._attach(self.ds, attached))
        await attached
        await _settle()

    async def stop(self) -> None:
        if self.nars is not None:
            await self.nars.writes_done()  # NARs handed out from memory are cached before exit
        await asyncio.gather(*(f.stop() for f, _ in self.fetchers), return_exceptions=True)
        await asyncio.gather(*(o.stop() for o in set(self.openers.values())), return_exceptions=True)


async def _settle() -> None:
    """Let already-queued turns run (each delivery is a task on the loop)."""
    for _ in range(3):
        await asyncio.sleep(0)
