"""Between the plugin API's Python objects and the protocol's records.

The protocol (``protocol/substitution.prs``) carries only what Nix signs plus where the file is;
these functions are the one place that maps it to :class:`~substituter.nix.narinfo.NarInfo` and
:class:`~substituter.plugin.Offer`.  Decoding checks the Nix formats strictly, so a malformed
offer from an out-of-process fetcher becomes a clear error, never a half-built object.
"""

from __future__ import annotations

from typing import Any

from .errors import FormatError, NarInfoError, ProtocolError
from .nix.hashes import Hash
from .nix.narinfo import _FIELD_OF_KEY, _PARSERS, NarInfo, _frozen, _Layout, _parse_sig
from .plugin import Offer
from .protocol import Available
from .protocol import NarInfo as NarInfoRecord

__all__ = ["offer_to_record", "record_to_offer", "narinfo_to_record", "record_to_narinfo"]


def narinfo_to_record(info: NarInfo) -> NarInfoRecord:
    return NarInfoRecord(
        info.store_path,
        info.nar_hash_text(),
        info.nar_size,
        list(info.references),
        info.deriver or "",
        info.ca or "",
        list(info.sigs),
    )


def record_to_narinfo(record: NarInfoRecord) -> NarInfo:
    """A NarInfo from a record, with exactly the checks of parsing it as Nix text.

    Each value goes through the narinfo parser's own value checks (store paths, hashes, sizes,
    references, deriver, signatures, CA) and must pass as a ``Key: value`` line would: no newline,
    no leading whitespace.  Built directly rather than by writing and re-parsing text (this runs
    for every offer).
    """
    deriver = record.deriver
    fields: list[tuple[str, str]] = [
        ("StorePath", record.storePath),
        ("URL", "-"),
        ("Compression", "none"),
        ("NarHash", record.narHash),
        ("NarSize", str(record.narSize)),
        ("References", " ".join(record.references)),
    ]
    if deriver:
        fields.append(("Deriver", deriver))
    lines = [*fields, *(("Sig", sig) for sig in record.sigs)]  # the order of the text it replaces
    if record.ca:
        lines.append(("CA", record.ca))
    texts = [value for _, value in lines]
    if any("\n" in text for text in texts):
        raise ProtocolError("narinfo record has a field containing a newline")
    try:
        values: dict[str, Any] = {}
        raw: dict[str, tuple[str, Any]] = {}
        sigs: list[str] = []
        for number, (key, value) in enumerate(lines, start=1):
            if value[:1].isspace():  # what `Key: value` line splitting refuses
                raise NarInfoError(f"key {key!r} must be followed by exactly one space", line=number)
            if key == "Sig":
                sigs.append(_parse_sig(value, number))
                continue
            parsed = _PARSERS[key](value, number)
            raw[key] = (value, _frozen(parsed))
            values[_FIELD_OF_KEY[key]] = parsed
    except FormatError as exc:
        raise ProtocolError(f"narinfo record for {record.storePath!r} is invalid: {exc}") from exc
    return NarInfo(**values, sigs=sigs, extra=[], layout=_Layout(tuple(key for key, _ in lines), raw))


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
