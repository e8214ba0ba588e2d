"""Between the plugin API's Python objects and the protocol's records.

The protocol (``protocol/substitution.prs``) carries only what Nix signs plus where the file is;
these functions are the one place that maps it to :class:`~substituter.nix.narinfo.NarInfo` and
:class:`~substituter.plugin.Offer`.  Decoding checks the Nix formats strictly, so a malformed
offer from an out-of-process fetcher becomes a clear error, never a half-built object.
"""

from __future__ import annotations

from .errors import FormatError, ProtocolError
from .nix.hashes import Hash
from .nix.narinfo import NarInfo
from .plugin import Offer
from .protocol import Available
from .protocol import NarInfo as NarInfoRecord

__all__ = ["offer_to_record", "record_to_offer", "narinfo_to_record", "record_to_narinfo"]


def narinfo_to_record(info: NarInfo) -> NarInfoRecord:
    return NarInfoRecord(
        info.store_path,
        str(info.nar_hash),
        info.nar_size,
        list(info.references),
        info.deriver or "",
        info.ca or "",
        list(info.sigs),
    )


def record_to_narinfo(record: NarInfoRecord) -> NarInfo:
    """A NarInfo from a record; validated by writing and re-parsing it as Nix text."""
    lines = [
        f"StorePath: {record.storePath}",
        "URL: -",
        "Compression: none",
        f"NarHash: {record.narHash}",
        f"NarSize: {record.narSize}",
        f"References: {' '.join(record.references)}",
    ]
    if record.deriver:
        lines.append(f"Deriver: {record.deriver}")
    lines += [f"Sig: {sig}" for sig in record.sigs]
    if record.ca:
        lines.append(f"CA: {record.ca}")
    if any("\n" in line for line in lines):
        raise ProtocolError("narinfo record has a field containing a newline")
    try:
        return NarInfo.parse("\n".join(lines) + "\n")
    except FormatError as exc:
        raise ProtocolError(f"narinfo record for {record.storePath!r} is invalid: {exc}") from exc


def offer_to_record(hash_part: str, fetcher: str, offer: Offer) -> Available:
    return Available(
        hash_part,
        fetcher,
        offer.uri,
        offer.compression,
        offer.file_size or 0,
        offer.file_hash or "",
        narinfo_to_record(offer.info),
        offer.cost,
    )


def record_to_offer(record: Available) -> Offer:
    info = record_to_narinfo(record.info)
    if info.hash_part != record.hash:
        raise ProtocolError(
            f"offer from {record.fetcher!r} for {record.hash} carries the narinfo of {info.store_path}"
        )
    file_hash = record.fileHash or None
    if file_hash is not None:
        try:
            Hash.parse(file_hash)
        except FormatError as exc:
            raise ProtocolError(f"offer from {record.fetcher!r}: bad fileHash: {exc}") from exc
    return Offer(
        info=info,
        uri=record.uri,
        compression=record.compression,
        file_size=record.fileSize or None,
        file_hash=file_hash,
        cost=record.cost,
    )
