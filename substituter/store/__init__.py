"""Writing verified paths into a Nix store.

Two backends implement the :class:`Store` protocol: :class:`DaemonStore` speaks the
nix-daemon worker protocol (keeps signatures and CA; the daemon checks them) to a daemon's
socket, or to our own ``nix-daemon --stdio --store ROOT`` for a chroot store
(:meth:`DaemonStore.spawn`, what ``substituter fetch --store DIR`` uses); and
:class:`ImportStore` drives ``nix-store --store ROOT --import``.
"""

from __future__ import annotations

from substituter.store.base import PathInfo, Store, StoreItem
from substituter.store.daemon_client import DaemonStore
from substituter.store.import_backend import ImportStore

__all__ = ["DaemonStore", "ImportStore", "PathInfo", "Store", "StoreItem"]
