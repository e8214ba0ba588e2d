"""Where things live in a Bazel remote cache: pure functions, no I/O.

A Bazel HTTP remote cache has two namespaces, both keyed by lowercase sha256 hex:

* ``/cas/<hex>``: the blob whose sha256 is ``<hex>``.  Here the blob is a NAR, uncompressed, so
  its key is the narinfo's NarHash and every byte can be checked against the signed metadata.
* ``/ac/<hex>``: the action cache, an arbitrary value under a key.  Here the value is the narinfo
  text of a store path, under the sha256 of its 32-character hash part.
"""

from __future__ import annotations

import hashlib

from substituter.errors import FormatError
from substituter.nix.hashes import Hash

__all__ = ["cas_key", "cas_url", "index_key", "index_url"]


def cas_key(nar_hash: Hash) -> str:
    """The CAS key of a NAR: its NarHash as hex.  Only sha256 names a Bazel CAS blob."""
    if nar_hash.algorithm != "sha256":
        raise FormatError(f"a Bazel CAS is keyed by sha256, but this NarHash is {nar_hash}")
    return nar_hash.hex()


def index_key(hash_part: str) -> str:
    """The action-cache key under which the narinfo of ``hash_part`` is stored."""
    return hashlib.sha256(hash_part.encode("ascii")).hexdigest()


def cas_url(base_url: str, nar_hash: Hash) -> str:
    return f"{base_url.rstrip('/')}/cas/{cas_key(nar_hash)}"


def index_url(base_url: str, hash_part: str) -> str:
    return f"{base_url.rstrip('/')}/ac/{index_key(hash_part)}"
