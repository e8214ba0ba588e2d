"""Capabilities for the dataspace: sturdy refs, the secret key behind them, and the gatekeeper.

A sturdy ref is ``<ref {oid: OID sig: #x"..."}>`` where ``sig`` is
HMAC-BLAKE2s-256(key, canonical(OID)) truncated to 16 bytes, exactly as syndicate-server
computes it, so one ref text works against the embedded relay and a real syndicate-server
configured with the same key and ``<bind <ref {oid: OID key: #x"KEY"}> $ds #f>``.

The gatekeeper answers ``<resolve STEP #:observer>`` with ``<accepted #:target>`` for a valid
ref (the reply syndicate-server 0.50.1 gives and syndicate-py 0.19.3 understands). Anything
else a connection sends it is refused: the refusal is logged and the connection closed, so a
client without the capability never gets a reference it could assert through.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import preserves
from preserves import ImmutableDict, Record, Symbol
from syndicate import actor, turn
from syndicate.schema import gatekeeper as gatekeeper_schema

from substituter.errors import ConfigError

__all__ = [
    "KEY_FILE_NAME",
    "Gatekeeper",
    "GatekeeperEntity",
    "load_or_create_key",
    "mint",
    "signature",
]

log = logging.getLogger("substituter.dataspace")

KEY_FILE_NAME = "dataspace.key"
KEY_BYTES = 32
SIG_BYTES = 16

_REF = Symbol("ref")
_OID = Symbol("oid")
_SIG = Symbol("sig")
_CAVEATS = Symbol("caveats")


def signature(key: bytes, oid: Any) -> bytes:
    """The sturdy-ref signature over ``oid`` (a Preserves value) under ``key``."""
    return hmac.new(key, preserves.canonicalize(oid), hashlib.blake2s).digest()[:SIG_BYTES]


def mint(key: bytes, oid: Any) -> str:
    """Sturdy ref text for ``oid``, e.g. ``<ref {oid: "substituter" sig: #x"..."}>``."""
    sig = signature(key, oid)
    return f'<ref {{oid: {preserves.stringify(oid)} sig: #x"{sig.hex()}"}}>'


def load_or_create_key(state_dir: Path) -> bytes:
    """The relay's secret key from ``state_dir/dataspace.key`` (hex), created 0600 if missing.

    A key file readable by group or others is refused: anyone who can read it can mint
    capabilities.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / KEY_FILE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    key = secrets.token_bytes(KEY_BYTES)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def _read_key(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"dataspace key {path} has mode {mode:04o}; it must not be readable by others "
            f"(fix: chmod 600 {path})"
        )
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigError(f"dataspace key {path} is not hex text: {exc}") from exc
    if not key:
        raise ConfigError(f"dataspace key {path} is empty (delete it to generate a new one)")
    return key


class Gatekeeper:
    """Checks sturdy refs signed with one key and maps each valid oid to the ref it grants."""

    def __init__(self, key: bytes, bindings: Mapping[Any, actor.Ref]) -> None:
        self._key = key
        self._bindings = dict(bindings)

    def mint(self, oid: Any) -> str:
        """Sturdy ref text granting ``oid`` (which need not be bound yet)."""
        return mint(self._key, oid)

    def check(self, step: Any) -> actor.Ref:
        """The ref granted by ``step`` (a parsed ``<ref {...}>``); ``PermissionError`` if none."""
        if not (isinstance(step, Record) and step.key == _REF and len(step.fields) == 1):
            raise PermissionError(f"not a sturdy ref step: {preserves.stringify(step)[:200]}")
        params = step.fields[0]
        if not isinstance(params, ImmutableDict | dict):
            raise PermissionError("sturdy ref parameters are not a dictionary")
        if _CAVEATS in params and params[_CAVEATS] != ():
            raise PermissionError("sturdy refs with caveats are not supported")
        oid, sig = params.get(_OID), params.get(_SIG)
        if oid is None or not isinstance(sig, bytes):
            raise PermissionError("sturdy ref lacks oid or sig")
        if not hmac.compare_digest(sig, signature(self._key, oid)):
            raise PermissionError(f"bad signature for oid {preserves.stringify(oid)}")
        target = self._bindings.get(oid)
        if target is None:
            raise PermissionError(f"no binding for oid {preserves.stringify(oid)}")
        return target


class GatekeeperEntity(actor.Entity):
    """One connection's view of the gatekeeper (its oid 0).

    ``refuse(reason)`` is called, inside the turn, for anything that is not a resolve of a
    valid sturdy ref; the relay closes the connection.
    """

    def __init__(self, gatekeeper: Gatekeeper, refuse: Callable[[str], None]) -> None:
        self._gatekeeper = gatekeeper
        self._refuse = refuse
        self._replies: dict[int, int] = {}  # resolve handle -> our <accepted> handle
        #: Whether this connection has presented a valid capability yet.
        self.granted = False

    def on_publish(self, v: Any, handle: int) -> None:
        try:
            request = gatekeeper_schema.Resolve.decode(v)
        except Exception:  # noqa: BLE001 - any undecodable value is a refusal, not a crash
            self._refuse(f"missing capability: {preserves.stringify(v)[:200]} is not a <resolve>")
            return
        try:
            target = self._gatekeeper.check(preserves.preserve(request.step))
        except PermissionError as exc:
            self._refuse(f"capability refused: {exc}")
            return
        if not isinstance(request.observer, actor.Ref):
            self._refuse("malformed <resolve>: its observer is not a reference")
            return
        accepted = gatekeeper_schema.Resolved.accepted(target)
        self.granted = True
        self._replies[handle] = turn.publish(request.observer, accepted)

    def on_retract(self, handle: int) -> None:
        turn.retract(self._replies.pop(handle, None))

    def on_message(self, v: Any) -> None:
        self._refuse(f"missing capability: message {preserves.stringify(v)[:200]} to the gatekeeper")
