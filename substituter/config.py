"""The daemon's configuration: TOML (or JSON, for generated configs), validated strictly.

Unknown keys are errors that name the key and list the known ones; every field has a default, so
the daemon runs with no config file at all.  Fetcher tables keep their core keys (``type``,
``name``, ``priority``, ``locate-timeout``) and hand the rest to the plugin's own Options.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "Config",
    "DataspaceConfig",
    "FetcherConfig",
    "NarCacheConfig",
    "CACHE_NIXOS_ORG_KEY",
    "load_config",
    "parse_config",
    "parse_listen",
    "parse_size",
]

CACHE_NIXOS_ORG = "https://cache.nixos.org"
CACHE_NIXOS_ORG_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
DEFAULT_LISTEN = "127.0.0.1:37515"


@dataclass(frozen=True)
class FetcherConfig:
    type: str
    name: str
    priority: int | None = None
    locate_timeout: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataspaceConfig:
    #: None: embedded dataspace.  Otherwise the address of a syndicate-server,
    #: ``<unix "/path">`` or ``<tcp "127.0.0.1" 9001>``.
    connect: str | None = None
    #: The sturdy ref to present to ``connect`` (text), or a file holding it.
    cap: str | None = None
    cap_file: Path | None = None
    #: Where the embedded dataspace is served for out-of-process fetchers and the CLI.
    socket: Path | None = None
    #: Optional TCP listener for the embedded dataspace ("127.0.0.1:PORT"); loopback only
    #: unless ``allow-remote`` is set.
    tcp: str | None = None
    allow_remote: bool = False


@dataclass(frozen=True)
class NarCacheConfig:
    enable: bool = True
    max_size: int = 10 * 1024**3
    path: Path | None = None
    #: NARs up to this size are verified completely before their first byte is sent (so a
    #: corrupt source is replaced invisibly); larger ones stream while being verified.
    verify_first: int = 32 * 1024**2
    #: When a narinfo is served for a NAR up to this size that is not cached yet, the NAR is
    #: fetched (verified, cached) right away: Nix nearly always asks for it next.  0: never.
    prefetch: int = 1024**2
    #: Offer NARs above verify_first as zstd, passing a zstd source's blocks on as they verify
    #: (a third of the bytes for text-heavy NARs, for Nix on another machine), instead of as the
    #: plain NAR (on the same machine the plain NAR is faster: the client does not decode).
    stream_zstd: bool = False


@dataclass(frozen=True)
class Config:
    listen: str = DEFAULT_LISTEN
    trusted_public_keys: tuple[str, ...] = (CACHE_NIXOS_ORG_KEY,)
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    store_dir: str = "/nix/store"
    #: How long the broker waits for a fetcher's answer before treating it as "unavailable".
    locate_timeout: float = 5.0
    #: Priority advertised in /nix-cache-info (Nix tries lower numbers first).
    priority: int = 30
    log_level: str = "info"
    dataspace: DataspaceConfig = field(default_factory=DataspaceConfig)
    nar_cache: NarCacheConfig = field(default_factory=NarCacheConfig)
    fetchers: tuple[FetcherConfig, ...] = (
        FetcherConfig(type="binary-cache", name="cache.nixos.org", priority=40,
                      options={"url": CACHE_NIXOS_ORG}),
    )

    @property
    def dataspace_socket(self) -> Path:
        return self.dataspace.socket or self.state_dir / "dataspace.sock"

    @property
    def nar_cache_dir(self) -> Path:
        return self.nar_cache.path or self.state_dir / "nar-cache"


def default_state_dir() -> Path:
    """systemd's StateDirectory when set, else the XDG state home."""
    if "STATE_DIRECTORY" in os.environ:
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "substituter"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(value: Any, where: str) -> int:
    """Bytes from an integer or a string like "10G", "512MiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "B").upper()[0]
        scale = {"B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit]
        return int(float(m.group(1)) * scale)
    raise ConfigError(f"{where}: expected a size such as 10G or 512M, got {value!r}")


def parse_listen(value: str, where: str = "listen") -> tuple[str, int] | Path:
    """``host:port``, ``[::1]:port`` or ``unix:/path``."""
    if value.startswith("unix:"):
        return Path(value[len("unix:"):])
    m = re.fullmatch(r"\[([0-9a-fA-F:]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not m:
        raise ConfigError(f"{where}: expected HOST:PORT, [IPV6]:PORT or unix:/PATH, got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} is out of range")
    return host, port


class _Table:
    """Reads one TOML table, remembering which keys were used so leftovers are errors."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
        self.raw = dict(raw)
        self.where = where
        self.used: set[str] = set()

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.raw:
            return default
        value = self.raw[key]
        if isinstance(value, bool) and kind in (int, float):
            raise ConfigError(f"{self._path(key)}: expected a number, got {value!r}")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(f"{self._path(key)}: expected {expected}, got {value!r}")
        return value

    def take_rest(self) -> dict[str, Any]:
        rest = {k: v for k, v in self.raw.items() if k not in self.used}
        self.used.update(rest)
        return rest

    def finish(self, known_hint: str = "") -> None:
        unknown = [k for k in self.raw if k not in self.used]
        if unknown:
            known = ", ".join(sorted(self.used))
            raise ConfigError(
                f"unknown key {self._path(unknown[0])!r}{known_hint} (known keys here: {known})"
            )


def _is_loopback_ip(host: str) -> bool:
    """An IP literal on loopback (names are refused: they could resolve elsewhere)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _strings(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(values)


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a decoded config document."""
    top = _Table(raw, "")
    defaults = Config()
    listen = top.get("listen", str, defaults.listen)
    parse_listen(listen)
    keys = top.get("trusted-public-keys", list, None)
    trusted = defaults.trusted_public_keys if keys is None else _strings(keys, "trusted-public-keys")
    from .nix.signing import PublicKey  # local: keeps config importable for --help

    for i, key in enumerate(trusted):
        try:
            PublicKey.parse(key)
        except ValueError as exc:
            raise ConfigError(f"trusted-public-keys[{i}]: {exc}") from exc
    state_dir = top.get("state-dir", str, None)
    store_dir = top.get("store-dir", str, defaults.store_dir)
    locate_timeout = top.get("locate-timeout", float, defaults.locate_timeout)
    if locate_timeout <= 0:
        raise ConfigError("locate-timeout: must be positive")
    priority = top.get("priority", int, defaults.priority)
    log_level = top.get("log-level", str, defaults.log_level)
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log-level: expected debug, info, warning or error, got {log_level!r}")

    ds_table = _Table(top.get("dataspace", dict, {}), "dataspace")
    cap_file = ds_table.get("cap-file", str, None)
    socket = ds_table.get("socket", str, None)
    dataspace = DataspaceConfig(
        connect=ds_table.get("connect", str, None),
        cap=ds_table.get("cap", str, None),
        cap_file=Path(cap_file) if cap_file else None,
        socket=Path(socket) if socket else None,
        tcp=ds_table.get("tcp", str, None),
        allow_remote=ds_table.get("allow-remote", bool, False),
    )
    ds_table.finish()
    if dataspace.connect and not (dataspace.cap or dataspace.cap_file):
        raise ConfigError("dataspace.connect needs dataspace.cap or dataspace.cap-file")
    if dataspace.tcp:
        host, _port = parse_listen(dataspace.tcp, "dataspace.tcp")  # type: ignore[misc]
        if not _is_loopback_ip(host) and not dataspace.allow_remote:
            raise ConfigError(
                f"dataspace.tcp: {host} is not loopback; set dataspace.allow-remote = true to expose "
                "the dataspace beyond this machine"
            )

    cache_table = _Table(top.get("nar-cache", dict, {}), "nar-cache")
    cache_path = cache_table.get("path", str, None)
    nar_cache = NarCacheConfig(
        enable=cache_table.get("enable", bool, True),
        max_size=parse_size(cache_table.get("max-size", (int, str), NarCacheConfig.max_size),
                            "nar-cache.max-size"),
        path=Path(cache_path) if cache_path else None,
        verify_first=parse_size(cache_table.get("verify-first", (int, str), NarCacheConfig.verify_first),
                                "nar-cache.verify-first"),
        prefetch=parse_size(cache_table.get("prefetch", (int, str), NarCacheConfig.prefetch),
                            "nar-cache.prefetch"),
        stream_zstd=cache_table.get("stream-zstd", bool, False),
    )
    cache_table.finish()

    fetchers_raw = top.get("fetchers", list, None)
    fetchers = defaults.fetchers if fetchers_raw is None else _parse_fetchers(fetchers_raw)
    top.finish()
    return Config(
        listen=listen,
        trusted_public_keys=trusted,
        state_dir=Path(state_dir) if state_dir else defaults.state_dir,
        store_dir=store_dir,
        locate_timeout=locate_timeout,
        priority=priority,
        log_level=log_level.lower(),
        dataspace=dataspace,
        nar_cache=nar_cache,
        fetchers=fetchers,
    )


def _parse_fetchers(items: list[Any]) -> tuple[FetcherConfig, ...]:
    result = []
    names: set[str] = set()
    for i, item in enumerate(items):
        table = _Table(item, f"fetchers[{i}]")
        kind = table.get("type", str, None)
        if kind is None:
            raise ConfigError(f"fetchers[{i}]: missing 'type' (e.g. type = \"binary-cache\")")
        name = table.get("name", str, None) or _default_name(kind, table.raw, names)
        if name in names:
            raise ConfigError(f"fetchers[{i}]: name {name!r} is used twice; names must be unique")
        names.add(name)
        priority = table.get("priority", int, None)
        timeout = table.get("locate-timeout", float, None)
        result.append(FetcherConfig(kind, name, priority, timeout, table.take_rest()))
    return tuple(result)


def _default_name(kind: str, raw: Mapping[str, Any], taken: set[str]) -> str:
    hint = raw.get("url") or raw.get("path")
    base = f"{kind}:{hint}" if isinstance(hint, str) else kind
    name, n = base, 2
    while name in taken:
        name, n = f"{base}#{n}", n + 1
    return name


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load a config file (TOML, or JSON when it ends in .json); None gives the defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    try:
        if p.suffix == ".json":
            raw = json.loads(text)
        else:
            raw = tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: {exc}") from exc
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc
