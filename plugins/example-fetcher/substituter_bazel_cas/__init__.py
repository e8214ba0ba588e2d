"""A substituter fetcher plugin for NARs kept in a Bazel remote cache (HTTP CAS).

Registered as the fetcher type ``bazel-cas`` in the ``substituter.fetchers`` entry-point group.
"""

from __future__ import annotations

from .fetcher import BazelCasFetcher, BazelCasOptions
from .keys import cas_key, cas_url, index_key, index_url

__all__ = ["BazelCasFetcher", "BazelCasOptions", "cas_key", "cas_url", "index_key", "index_url"]
