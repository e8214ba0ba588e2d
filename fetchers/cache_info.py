"""``nix-cache-info``: what every binary-cache-shaped source says about itself.

Shared by the fetchers that read Nix binary caches (over HTTP or from a directory); no I/O here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from substituter.errors import ConfigError

__all__ = ["CacheInfo", "check_store_dir", "parse_cache_info"]

log = logging.getLogger("fetchers.cache_info")


@dataclass(frozen=True)
class CacheInfo:
    """The fields of ``nix-cache-info`` that matter to a substituter."""

    store_dir: str | None
    priority: int | None = None
    want_mass_query: bool = False


def parse_cache_info(text: str) -> CacheInfo:
    """Parse ``nix-cache-info`` (``Key: value`` lines); unknown keys are ignored, as Nix does."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    priority: int | None = None
    if "Priority" in values:
        try:
            priority = int(values["Priority"])
        except ValueError:
            log.warning("nix-cache-info: ignoring non-integer Priority %r", values["Priority"])
    return CacheInfo(
        store_dir=values.get("StoreDir"),
        priority=priority,
        want_mass_query=values.get("WantMassQuery") == "1",
    )


def check_store_dir(info: CacheInfo, expected: str, where: str) -> None:
    """A cache for another store dir holds paths we cannot use: that is a configuration error."""
    if info.store_dir is not None and info.store_dir.rstrip("/") != expected.rstrip("/"):
        raise ConfigError(
            f"{where} is a cache for store dir {info.store_dir!r}, but this store is {expected!r}"
        )
