"""Unpack a NAR stream onto disk, safely.

Everything is created relative to directory file descriptors (never by joining path
strings), with ``O_CREAT|O_EXCL|O_NOFOLLOW``, inside a fresh temporary directory beside
the target that is renamed into place only when the whole archive parsed. Any failure
removes the temporary directory, so a partial tree is never left behind and nothing is
written outside it.

Files get the modes Nix gives them in the store (0o444, or 0o555 when executable);
``nix-store --restore`` itself leaves 0o666/0o777 minus the umask. Directories stay
0o755 so that a failed restore can always be removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from substituter.errors import NarError
from substituter.nix.nar import NarParser, NarResult, check_entry_name

__all__ = ["RestoreSink", "restore"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT = b"root"  # the archive's root node, inside the temporary directory


class RestoreSink:
    """A :class:`~substituter.nix.nar.NarSink` that writes the tree to ``target``.

    Use it as a context manager around a :class:`NarParser` and call ``commit()`` after
    ``parser.finish()``; leaving the block without a commit (or with an exception)
    removes everything written so far.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        if os.path.lexists(self.target):
            raise FileExistsError(f"restore target {self.target} already exists")
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.restore-", dir=self.target.parent))
        self._dirs = [os.open(self._tmp, _DIR_FLAGS)]  # innermost open directory last
        self._name: bytes | None = _ROOT  # name for the next node, in self._dirs[-1]
        self._file: int | None = None
        self._closed = False

    # -- NarSink events ---------------------------------------------------------------

    def directory_start(self) -> None:
        name = self._take_name()
        os.mkdir(name, 0o755, dir_fd=self._dirs[-1])
        self._dirs.append(os.open(name, _DIR_FLAGS, dir_fd=self._dirs[-1]))

    def directory_end(self) -> None:
        if len(self._dirs) < 2:
            raise NarError("restore: directory end without a directory start")
        os.close(self._dirs.pop())

    def entry(self, name: bytes) -> None:
        # The parser checks names too; this sink refuses bad ones on its own as well.
        problem = check_entry_name(name)
        if problem is not None:
            raise NarError(f"restore: {problem}")
        if len(self._dirs) < 2:
            raise NarError(f"restore: entry {name!r} outside a directory")
        self._name = name

    def file_start(self, executable: bool, size: int) -> None:
        name = self._take_name()
        mode = 0o555 if executable else 0o444
        self._file = os.open(name, _FILE_FLAGS, mode, dir_fd=self._dirs[-1])
        os.fchmod(self._file, mode)  # exact mode regardless of the umask

    def file_data(self, chunk: memoryview) -> None:
        if self._file is None:
            raise NarError("restore: file contents outside a file")
        while chunk:
            written = os.write(self._file, chunk)
            chunk = chunk[written:]

    def file_end(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def symlink(self, target: bytes) -> None:
        os.symlink(target, self._take_name(), dir_fd=self._dirs[-1])

    # -- completion -------------------------------------------------------------------

    def commit(self) -> None:
        """Move the finished tree to the target."""
        if len(self._dirs) != 1 or self._file is not None or self._name is not None:
            raise NarError("restore: commit before the archive was complete")
        self._close_fds()
        os.rename(self._tmp / os.fsdecode(_ROOT), self.target)
        os.rmdir(self._tmp)
        self._closed = True

    def abort(self) -> None:
        """Remove everything written so far (safe to call more than once)."""
        if self._closed:
            return
        self._close_fds()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> RestoreSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    def _take_name(self) -> bytes:
        if self._name is None:
            raise NarError("restore: node without an entry name")
        name, self._name = self._name, None
        return name

    def _close_fds(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None
        while self._dirs:
            os.close(self._dirs.pop())


def restore(chunks: Iterable[bytes], target: str | os.PathLike[str]) -> NarResult:
    """Parse the NAR in ``chunks`` strictly and create its tree at ``target``.

    ``target`` must not exist. Returns the stream's sha256 and size; on any error
    (NarError, OSError) nothing is left on disk.
    """
    with RestoreSink(target) as sink:
        parser = NarParser(sink)
        for chunk in chunks:
            parser.feed(chunk)
        result = parser.finish()
        sink.commit()
    return result
