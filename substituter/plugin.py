"""The fetcher plugin API: what a plugin author implements.

A fetcher answers two questions about a store path, named by its 32-character hash part:

* ``locate(hash_part)``: do you have it?  Answer with an :class:`Offer` (the signed metadata, a URI
  for the file, its compression and an estimated cost) or :class:`Unavailable` with a reason.
* ``open(offer, offset)``: stream the offered file's bytes starting at ``offset``, so a transfer can
  resume, or continue from another source at the same place.

That is all. Deadlines, retries of ``locate``, verification, ranking and trust belong to the core
(the broker): a fetcher reports what it found and never decides whether it is trustworthy.

Plugins are found through the ``substituter.fetchers`` entry-point group; the built-in fetchers are
registered there exactly like third-party ones.  A plugin class declares:

* ``kind``: the name used in config (``type = "binary-cache"``);
* ``Options``: a dataclass of its options (validated from config, listed by ``substituter plugins``);
* ``schemes``: URI schemes its ``open`` understands;
* optionally ``opener(context)``: a standalone :class:`UriOpener` for those schemes, which is how a
  plugin teaches the daemon to open URIs offered by out-of-process fetchers when no fetcher of
  that kind is configured in process.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import logging
import os
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError, PluginError

if TYPE_CHECKING:
    import importlib.metadata

    from .nix.narinfo import NarInfo

__all__ = [
    "Offer",
    "Unavailable",
    "Answer",
    "Fetcher",
    "FetcherContext",
    "DataspaceLink",
    "UriOpener",
    "FunctionFetcher",
    "NoOptions",
    "ENTRY_POINT_GROUP",
    "available_fetcher_types",
    "load_fetcher_type",
    "parse_options",
    "describe_options",
]

ENTRY_POINT_GROUP = "substituter.fetchers"
#: The fetchers shipped with this package, as registered in its entry points (pyproject.toml).
#: Loading one of these needs no scan of every installed distribution's metadata (importing
#: importlib.metadata and reading the entry points costs a one-off `fetch` ~10 ms).
BUILTIN_FETCHERS = {
    "binary-cache": "fetchers.binary_cache:BinaryCacheFetcher",
    "local-mirror": "fetchers.local_mirror:LocalMirrorFetcher",
    "eris": "fetchers.eris.fetcher:ErisFetcher",
}
#: Set to a comma-separated list of plugin kinds to block them, as pytest's ``-p no:NAME``.
BLOCK_ENV = "SUBSTITUTER_BLOCK_PLUGINS"

log = logging.getLogger("substituter.plugin")


@dataclass(frozen=True)
class Offer:
    """A fetcher's answer that it can deliver a path.

    ``info`` is the path's narinfo as the source has it (signatures included); its ``url`` is
    ignored by the core: ``uri`` says where the file is.  ``compression`` describes the bytes that
    ``open`` yields (``none`` for a raw NAR).  ``file_size``/``file_hash`` describe those bytes
    when known.  ``cost`` is the fetcher's own estimate (lower is better; 0 when it has no idea).
    """

    info: NarInfo
    uri: str
    compression: str = "none"
    file_size: int | None = None
    file_hash: str | None = None
    cost: int = 0


@dataclass(frozen=True)
class Unavailable:
    """A fetcher's answer that it cannot deliver a path; ``reason`` is shown to users."""

    reason: str


Answer = Offer | Unavailable


@dataclass
class DataspaceLink:
    """The dataspace a fetcher's host is attached to, for fetchers that exchange data over it.

    ``ref`` is the dataspace and ``facet`` a facet that lives as long as it is reachable (act in it
    with ``turn.external``).  The host sets both on every (re)attachment; both are None while
    detached.
    """

    ref: Any = None
    facet: Any = None

    @property
    def attached(self) -> bool:
        return self.ref is not None and self.facet is not None and bool(self.facet.alive)


@dataclass(frozen=True)
class FetcherContext:
    """What the core gives a fetcher: where it may keep state, the store dir in use, and (where
    the host offers it) the dataspace it is attached to."""

    store_dir: str = "/nix/store"
    state_dir: Path | None = None
    dataspace: DataspaceLink | None = None


class UriOpener(abc.ABC):
    """Opens URIs of some schemes without being a configured fetcher (see ``Fetcher.opener``)."""

    async def start(self) -> None:
        """Acquire resources."""

    async def stop(self) -> None:
        """Release resources."""

    @abc.abstractmethod
    def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        """Yield the offered file's bytes from ``offset`` on."""


@dataclass(frozen=True)
class NoOptions:
    """For fetchers without options."""


class Fetcher(abc.ABC):
    """Base class of fetcher plugins.  Subclass it, set ``kind``, ``Options`` and ``schemes``."""

    kind: ClassVar[str]
    Options: ClassVar[type[Any]] = NoOptions
    #: URI schemes :meth:`open` understands (for offers made by out-of-process fetchers).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: Default rank among fetchers; lower is tried first (like Nix's cache Priority).
    default_priority: ClassVar[int] = 50

    def __init__(
        self,
        name: str,
        options: Any,
        context: FetcherContext | None = None,
        priority: int | None = None,
    ) -> None:
        self.name = name
        self.options = options
        self.context = context or FetcherContext()
        self.priority: int = self.default_priority if priority is None else priority
        #: False when the config left the priority out: ``start`` may then take the source's own
        #: (e.g. a binary cache's ``Priority`` in nix-cache-info), as Nix does.
        self.priority_configured = priority is not None

    async def start(self) -> None:
        """Acquire resources (connections, file handles).  Called once before any locate."""

    async def stop(self) -> None:
        """Release resources.  Called once; no locate or open is running any more."""

    @abc.abstractmethod
    async def locate(self, hash_part: str) -> Answer:
        """Say whether this fetcher can deliver the path with this hash part."""

    @abc.abstractmethod
    def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        """Yield the offered file's bytes from ``offset`` on (an async generator)."""

    def describe(self) -> str:
        """Where this fetcher gets paths from, for status displays (e.g. a URL or directory)."""
        return self.kind

    @classmethod
    def opener(cls, context: FetcherContext) -> UriOpener | None:
        """A standalone opener for ``schemes`` (None: offers of these schemes need a configured
        fetcher of this kind in process)."""
        return None


LocateFn = Callable[[str], Awaitable[Answer]]
OpenFn = Callable[[Offer, int], AsyncIterator[bytes]]


class FunctionFetcher(Fetcher):
    """A fetcher made of two functions: for tests, and for tiny in-process plugins."""

    kind = "function"

    def __init__(self, name: str, locate: LocateFn, open: OpenFn, priority: int = 50) -> None:
        super().__init__(name, NoOptions(), priority=priority)
        self._locate = locate
        self._open = open

    async def locate(self, hash_part: str) -> Answer:
        return await self._locate(hash_part)

    def open(self, offer: Offer, offset: int = 0) -> AsyncIterator[bytes]:
        return self._open(offer, offset)


# --- finding plugins -------------------------------------------------------------------------


def _blocked() -> set[str]:
    return {k.strip() for k in os.environ.get(BLOCK_ENV, "").split(",") if k.strip()}


def available_fetcher_types() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed fetcher plugins by kind (entry-point name), minus blocked ones."""
    import importlib.metadata

    blocked = _blocked()
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in blocked:
            continue
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(
                f"two plugins claim fetcher type {ep.name!r}: {found[ep.name].value} and {ep.value}"
            )
        found[ep.name] = ep
    return found


def load_fetcher_type(kind: str) -> type[Fetcher]:
    """Import the plugin class registered for ``kind``; errors say what is installed.

    A built-in kind (unless blocked) is imported from where this package registers it, without
    scanning the installed plugins; so another distribution registering the same name is only
    reported by :func:`available_fetcher_types` (``substituter plugins``), never loaded."""
    if kind in BUILTIN_FETCHERS and kind not in _blocked():
        value = BUILTIN_FETCHERS[kind]
        try:
            module, _, attr = value.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        except Exception as exc:
            raise PluginError(f"fetcher plugin {kind!r} ({value}) failed to load: {exc}") from exc
    else:
        eps = available_fetcher_types()
        if kind not in eps:
            known = ", ".join(sorted(eps)) or "none"
            raise PluginError(f"no fetcher plugin of type {kind!r} is installed (installed: {known})")
        value = eps[kind].value
        try:
            cls = eps[kind].load()
        except Exception as exc:
            raise PluginError(f"fetcher plugin {kind!r} ({value}) failed to load: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Fetcher)):
        raise PluginError(f"entry point {kind!r} ({value}) is not a Fetcher subclass")
    if getattr(cls, "kind", None) != kind:
        raise PluginError(
            f"plugin class {cls.__qualname__} declares kind {getattr(cls, 'kind', None)!r}, "
            f"but is registered as {kind!r}"
        )
    return cls


# --- options ---------------------------------------------------------------------------------


def _option_name(field: dataclasses.Field[Any]) -> str:
    return field.name.replace("_", "-")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("pathlib.Path", "Path")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a config value against an option's annotated type; convert strings from --option."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}")
    if origin in (list, tuple):
        (item_tp, *_rest) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value


def parse_options(options_cls: type[Any], raw: Mapping[str, Any], where: str) -> Any:
    """Build a plugin's Options dataclass from config (kebab-case keys); unknown keys are errors."""
    if not dataclasses.is_dataclass(options_cls):
        raise PluginError(f"{where}: the plugin's Options is not a dataclass")
    hints = typing.get_type_hints(options_cls)
    fields = {_option_name(f): f for f in dataclasses.fields(options_cls)}
    unknown = [k for k in raw if k not in fields and k.replace("_", "-") not in fields]
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{where}: unknown option {unknown[0]!r} (known options: {known})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field = fields[key.replace("_", "-")]
        values[field.name] = _coerce(value, hints[field.name], f"{where}.{_option_name(field)}")
    for name, field in fields.items():
        missing = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if missing and field.name not in values:
            raise ConfigError(f"{where}: option {name!r} is required")
    try:
        return options_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class OptionDoc:
    name: str
    type: str
    default: str
    help: str


def describe_options(options_cls: type[Any]) -> list[OptionDoc]:
    """Options of a plugin with types, defaults and help (``field(metadata={"help": ...})``)."""
    hints = typing.get_type_hints(options_cls)
    docs = []
    for f in dataclasses.fields(options_cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        docs.append(
            OptionDoc(_option_name(f), _type_name(hints[f.name]), default, f.metadata.get("help", ""))
        )
    return docs
