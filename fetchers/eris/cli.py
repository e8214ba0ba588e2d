"""``substituter eris ...``: publish a binary cache as ERIS blocks, and serve blocks over N2R.

``publish`` reads every narinfo of a ``nix copy --to file://DIR`` cache, decompresses its NAR,
checks it against the signed NarHash/NarSize, encodes the raw NAR (so a transfer can resume at
any offset) into blocks, and records the capability with the original signed narinfo in a
JSON-lines index.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from pathlib import Path

import click

from substituter.errors import HashMismatch, SizeMismatch, SubstituterError
from substituter.nix.compression import decompressor, normalize
from substituter.nix.hashes import Hash
from substituter.nix.narinfo import NarInfo

from .blockstore import BlockStore, DirectoryBlockStore, open_block_store
from .codec import Encoder
from .index import IndexEntry, save_entries
from .server import serve

__all__ = ["eris_group", "publish_cache", "publish_nar", "parse_listen", "BLOCK_SIZE_NAMES"]

log = logging.getLogger("fetchers.eris.cli")

BLOCK_SIZE_NAMES = {"1k": 1024, "32k": 32768}
DEFAULT_LISTEN = "127.0.0.1:37516"
_READ = 1 << 20
#: Blocks written at once while publishing (they are independent files or PUTs).
_PUT_BATCH = 64


async def publish_nar(
    narinfo: NarInfo, nar_file: Path, store: BlockStore, block_size: int = 32768
) -> IndexEntry:
    """Encode the NAR in ``nar_file`` (compressed as the narinfo says) into ``store``.

    The decompressed NAR must match the narinfo's NarSize and NarHash, else nothing is indexed.
    """
    pending: list[tuple[bytes, bytes]] = []
    encoder = Encoder(block_size, lambda ref, block: pending.append((ref, block)))
    decoder = decompressor(normalize(narinfo.compression), max_output=narinfo.nar_size)
    sha256 = hashlib.sha256()
    size = 0

    async def write_pending() -> None:
        while pending:
            batch, pending[:] = pending[:_PUT_BATCH], pending[_PUT_BATCH:]
            await asyncio.gather(*(store.put(ref, block) for ref, block in batch))

    async def feed(data: bytes) -> None:
        nonlocal size
        size += len(data)
        sha256.update(data)
        encoder.feed(data)
        await write_pending()

    with nar_file.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, _READ):
            await feed(decoder.decode(chunk))
    await feed(decoder.flush())
    if size != narinfo.nar_size:
        raise SizeMismatch(f"{nar_file}: NAR has {size} bytes, NarSize says {narinfo.nar_size}")
    if Hash("sha256", sha256.digest()) != narinfo.nar_hash:
        raise HashMismatch(f"{nar_file}: NAR does not hash to NarHash {narinfo.nar_hash}")
    cap = encoder.finish()
    await write_pending()  # the last leaf and the internal nodes
    return IndexEntry(cap, "none", narinfo, narinfo.nar_size)


async def publish_cache(
    cache_dir: Path, store: BlockStore, block_size: int = 32768
) -> list[IndexEntry]:
    """Publish every NAR of a binary cache directory; a NAR that fails is named and skipped."""
    entries: list[IndexEntry] = []
    for narinfo_file in await asyncio.to_thread(_narinfo_files, cache_dir):
        try:
            narinfo, nar_file = await asyncio.to_thread(_read_narinfo, cache_dir, narinfo_file)
            entries.append(await publish_nar(narinfo, nar_file, store, block_size))
        except (SubstituterError, OSError) as exc:
            log.error("%s: not published: %s", narinfo_file, exc)
    return entries


def _narinfo_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.narinfo"))


def _read_narinfo(cache_dir: Path, narinfo_file: Path) -> tuple[NarInfo, Path]:
    """The narinfo and the NAR file it names, which must lie inside the cache."""
    narinfo = NarInfo.parse(narinfo_file.read_bytes())
    nar_file = (cache_dir / narinfo.url).resolve()
    if not nar_file.is_relative_to(cache_dir.resolve()):
        raise SubstituterError(f"URL {narinfo.url!r} leaves {cache_dir}")
    return narinfo, nar_file


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


@click.group("eris")
def eris_group() -> None:
    """ERIS: publish binary caches as encrypted content-addressed blocks, and serve them."""


@eris_group.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--blocks", required=True, help="block directory, or the URL of an N2R server (PUT).")
@click.option("--index", "index_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSON-lines index to write (merged with an existing one).")
@click.option("--block-size", type=click.Choice(sorted(BLOCK_SIZE_NAMES)), default="32k",
              show_default=True, help="ERIS block size.")
def publish(cache_dir: Path, blocks: str, index_file: Path, block_size: str) -> None:
    """Encode every NAR of CACHE_DIR (a `nix copy --to file://` directory) into ERIS blocks."""

    async def run() -> tuple[int, int]:
        store = open_block_store(blocks)
        try:
            entries = await publish_cache(cache_dir, store, BLOCK_SIZE_NAMES[block_size])
        finally:
            await store.aclose()
        return len(entries), save_entries(index_file, entries)

    _setup_logging()
    try:
        published, total = asyncio.run(run())
    except SubstituterError as exc:
        raise click.ClickException(str(exc)) from exc
    failed = len(_narinfo_files(cache_dir)) - published
    click.echo(f"published {published} path(s) to {blocks}; {index_file} holds {total}")
    if failed:
        raise click.ClickException(f"{failed} path(s) could not be published (see above)")


@eris_group.command("serve")
@click.argument("block_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True,
              help="HOST:PORT to listen on (loopback unless you say otherwise).")
@click.option("--writable", is_flag=True,
              help="Accept PUT (publishing over HTTP); without it the store is read-only.")
def serve_command(block_dir: Path, listen: str, writable: bool) -> None:
    """Serve BLOCK_DIR over ERIS-over-HTTP (GET/HEAD/PUT /uri-res/N2R?urn:blake2b:...)."""
    host, port = parse_listen(listen)
    _setup_logging()
    block_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(serve(DirectoryBlockStore(block_dir), host, port, writable=writable))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror}") from exc


@eris_group.command("share")
@click.argument("block_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dataspace", "address", required=True,
              help='Dataspace address: <unix "/path">, unix:/path, or 127.0.0.1:PORT.')
@click.option("--cap", required=True, help="Capability (sturdy ref text), or @FILE.")
def share_command(block_dir: Path, address: str, cap: str) -> None:
    """Answer requests for BLOCK_DIR's blocks over a dataspace (a daemon's, or a syndicate-server).

    Fetchers configured with ``blocks = ["dataspace:"]`` anywhere on that dataspace then get
    blocks from here; each block is checked by its hash on both sides.
    """
    from syndicate import actor

    from substituter.dataspace.connect import connect

    from .dataspace_store import serve_blocks

    _setup_logging()
    if cap.startswith("@"):
        cap = Path(cap[1:]).read_text().strip()
    store = DirectoryBlockStore(block_dir)

    def boot() -> None:
        @connect(address, cap)
        def on_dataspace(ds: object) -> None:
            logging.getLogger("fetchers.eris").info("sharing %s on %s", block_dir, address)
            serve_blocks(ds, store)

    try:
        actor.System(loop=asyncio.new_event_loop()).run(boot, name="eris share", configure_logging=False)
    except KeyboardInterrupt:
        pass


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)


if __name__ == "__main__":
    eris_group()
