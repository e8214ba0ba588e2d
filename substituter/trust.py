"""Which narinfos may be served: the broker's trust rule, in one place.

An offer is trusted when its narinfo carries a valid ed25519 signature, from a configured key,
over Nix's fingerprint; or when it is content-addressed and its CA field recomputes to its store
path (then the bytes themselves must match the CA hash: :attr:`Verdict.content_hash`).
Fetchers never decide this; unsigned transports (ERIS, IPFS) are trusted only through a signed
narinfo.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .nix.hashes import Hash
from .nix.narinfo import NarInfo
from .nix.signing import PublicKey, verify_narinfo
from .nix.store_path import parse_content_address

__all__ = ["TrustPolicy", "Verdict"]


@dataclass(frozen=True)
class Verdict:
    trusted: bool
    #: Why, in words for logs and ``failed`` assertions.
    reason: str
    #: For flat/text content-addressed paths trusted by CA alone: the sha256 the single regular
    #: file in the NAR must have.  (For ``fixed:r:`` the CA hash is the NarHash itself.)
    content_hash: Hash | None = None


class TrustPolicy:
    """Judges narinfos against the configured ``trusted-public-keys``."""

    def __init__(self, keys: Iterable[str | PublicKey], *, require_sigs: bool = True) -> None:
        self.keys = [k if isinstance(k, PublicKey) else PublicKey.parse(k) for k in keys]
        #: False mirrors Nix's `require-sigs = false` (the CLI's --no-require-sigs): any offer is
        #: usable; its bytes are still checked against its NarHash.
        self.require_sigs = require_sigs

    def judge(self, info: NarInfo) -> Verdict:
        verdict = self._judge(info)
        if not verdict.trusted and not self.require_sigs:
            return Verdict(True, f"accepted without a trusted signature ({verdict.reason})")
        return verdict

    def _judge(self, info: NarInfo) -> Verdict:
        key = verify_narinfo(info, self.keys)
        if key is not None:
            return Verdict(True, f"signed by {key.name}")
        if info.ca:
            return self._judge_content_address(info)
        if info.sigs:
            names = ", ".join(sorted({s.split(":", 1)[0] for s in info.sigs}))
            return Verdict(False, f"no valid signature from a trusted key (signed by: {names})")
        return Verdict(False, "unsigned and not content-addressed")

    def _judge_content_address(self, info: NarInfo) -> Verdict:
        assert info.ca is not None
        if not info.ca_matches():
            return Verdict(False, f"unsigned, and its CA field {info.ca} does not give its path")
        address = parse_content_address(info.ca)
        if address.hash.algorithm != "sha256":
            return Verdict(False, f"unsigned, and CA {info.ca} uses a hash this daemon cannot check")
        if address.method == "recursive":
            # sha256 recursive CA is the NarHash itself, which every transfer verifies.
            if address.hash != info.nar_hash:
                return Verdict(False, f"unsigned, and its CA {info.ca} is not its NarHash")
            return Verdict(True, f"content-addressed ({info.ca})")
        return Verdict(True, f"content-addressed ({info.ca})", content_hash=address.hash)
