"""A store written through ``nix-store --store ROOT --import``: no daemon needed.

The NAR streams straight into the subprocess's stdin in Nix's export format (per path
``1 ‖ NAR ‖ 0x4558494e ‖ path ‖ references ‖ deriver ‖ 0``; the stream ends with ``0``).

That format carries no NarHash, no signatures and no content address, so:
- this backend checks NarSize and NarHash itself while streaming, and writes the trailer
  that makes ``nix-store`` register the path only after both matched;
- ``sigs`` and ``ca`` of the PathInfo are dropped, and ``dont_check_sigs`` has no effect:
  ``nix-store --import`` on a local or chroot store checks no signatures at all. Use it only
  for stores the caller owns (a chroot DIR, or the local store as root); through a daemon
  prefer :class:`~substituter.store.daemon_client.DaemonStore`, which keeps both.
- ``repair`` is not expressible and is refused.
- we stream, but ``nix-store --import`` itself (2.8) holds each NAR in memory before
  registering it; for very large paths prefer the daemon.

A failure part-way (producer error, mismatch, cancellation) kills the subprocess before the
failing path's trailer is written, so that path is never registered; paths completed
earlier in the same call stay valid.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterable, Iterable, Mapping
from pathlib import Path
from typing import Self

from substituter.errors import StoreError
from substituter.store import wire
from substituter.store.base import PathInfo, StoreItem, guarded_nar, strip_ansi

__all__ = ["EXPORT_MAGIC", "ImportStore"]

EXPORT_MAGIC = 0x4558494E


def _export_trailer(info: PathInfo) -> bytes:
    return b"".join(
        [
            wire.u64(EXPORT_MAGIC),
            wire.string(info.store_path),
            wire.string_set(info.references),
            wire.string(info.deriver or ""),
            wire.u64(0),  # "no signature" in the legacy format
        ]
    )


class ImportStore:
    """The Nix store rooted at ``root`` (``nix-store --store ROOT``), written by import.

    ``env`` is the environment for the ``nix-store``/``nix`` subprocesses (default: this
    process's); ``nix_bin`` the directory holding them, if not on PATH.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        nix_bin: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = str(root)
        self.env = dict(os.environ if env is None else env)
        self._nix_store = str(Path(nix_bin) / "nix-store") if nix_bin else "nix-store"
        self._nix = str(Path(nix_bin) / "nix") if nix_bin else "nix"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing to release: every call runs its own subprocess."""

    async def _run(self, *args: str) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
            )
        except OSError as exc:
            raise StoreError(f"cannot run {args[0]}: {exc}") from exc
        stdout, stderr = await proc.communicate()
        if proc.returncode != 0:
            raise StoreError(
                f"{' '.join(args[:4])} ... failed (exit {proc.returncode}):"
                f" {strip_ansi(stderr.decode(errors='replace')).strip()}"
            )
        return stdout.decode()

    async def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        wanted = set(paths)
        if not wanted:
            return set()
        out = await self._run(
            self._nix_store,
            "--store",
            self.root,
            "--check-validity",
            "--print-invalid",
            *sorted(wanted),
        )
        return wanted - set(out.split())

    async def is_valid_path(self, path: str) -> bool:
        return bool(await self.query_valid_paths([path]))

    async def query_path_info(self, path: str) -> PathInfo | None:
        """Metadata via ``nix path-info --json`` (``nar_hash`` as ``sha256:<nix32>``)."""
        if not await self.is_valid_path(path):
            return None
        out = await self._run(
            self._nix,
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            "--store",
            self.root,
            path,
        )
        try:
            (entry,) = json.loads(out)
            return PathInfo(
                store_path=entry["path"],
                nar_hash=entry["narHash"],
                nar_size=int(entry["narSize"]),
                references=frozenset(entry.get("references", [])),
                deriver=entry.get("deriver") or None,
                sigs=frozenset(entry.get("signatures", [])),
                ca=entry.get("ca") or None,
                ultimate=bool(entry.get("ultimate", False)),
                registration_time=int(entry.get("registrationTime", 0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"nix path-info --json gave unexpected output for {path}") from exc

    async def add_to_store_nar(
        self,
        info: PathInfo,
        nar_chunks: AsyncIterable[bytes],
        *,
        repair: bool = False,
        dont_check_sigs: bool = False,
    ) -> None:
        """Import one path; see the module doc for what the export format drops."""
        await self.add_multiple_to_store([(info, nar_chunks)], repair=repair)

    async def add_multiple_to_store(
        self,
        items: Iterable[StoreItem],
        *,
        repair: bool = False,
        dont_check_sigs: bool = False,
    ) -> None:
        """Import paths in topological order through one ``nix-store --import``."""
        if repair:
            raise StoreError("nix-store --import cannot repair paths; use a DaemonStore")
        try:
            proc = await asyncio.create_subprocess_exec(
                self._nix_store,
                "--store",
                self.root,
                "--import",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
            )
        except OSError as exc:
            raise StoreError(f"cannot run {self._nix_store}: {exc}") from exc
        assert proc.stdin is not None and proc.stderr is not None
        stdin = proc.stdin
        errors = asyncio.create_task(proc.stderr.read())

        async def refused(cause: BaseException | None = None) -> StoreError:
            await proc.wait()
            detail = strip_ansi((await errors).decode(errors="replace")).strip()
            return StoreError(
                f"nix-store --store {self.root} --import failed (exit {proc.returncode}):"
                f" {detail or cause or 'no message'}"
            )

        async def write(data: bytes) -> None:
            stdin.write(data)
            await stdin.drain()

        try:
            try:
                for info, nar_chunks in items:
                    await write(wire.u64(1))
                    async for chunk in guarded_nar(info, nar_chunks, check_hash=True):
                        await write(chunk)
                    await write(_export_trailer(info))
                await write(wire.u64(0))
                stdin.close()
                await stdin.wait_closed()
            except (BrokenPipeError, ConnectionResetError) as exc:
                # nix-store exited early: its own message says why.
                raise await refused(exc) from exc
            if await proc.wait() != 0:
                raise await refused()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        finally:
            await errors  # the pipe is at EOF once nix-store has exited
