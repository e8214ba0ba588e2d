"""The dataspace: the embedded in-process one, and how to reach or expose one elsewhere."""

from __future__ import annotations

from substituter.dataspace.dataspace import Dataspace

__all__ = ["Dataspace"]
