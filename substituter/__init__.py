"""substituter: a pluggable, verifying external substituter for Nix."""

from __future__ import annotations

__version__ = "0.1.0"
