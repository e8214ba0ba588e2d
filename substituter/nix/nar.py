"""NAR (Nix ARchive): a strict streaming parser, a verifier, and a writer (``dump``).

Grammar (every string is ``u64le(len) ‖ bytes ‖ zero padding to 8``)::

    nar  = "nix-archive-1" node
    node = "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
                      | "symlink" "target" <target>
                      | "directory" { "entry" "(" "name" <name> "node" node ")" } ) ")"

The parser is push-based: feed it chunks of any size (one byte at a time works) and
call ``finish()``. It is stricter than Nix 2.8: field order, sorted unique names, name and
target rules, length caps (checked before anything is allocated), depth and trailing bytes
are all enforced, and every violation raises :class:`NarError` naming the rule and the
byte offset where it was detected. It hashes whole chunks as they arrive and hands file
contents to the sink as zero-copy slices, so the verify-only path runs near sha256 speed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from substituter.errors import HashMismatch, NarError, SizeMismatch

__all__ = [
    "MAGIC",
    "MAX_DEPTH",
    "MAX_NAME",
    "MAX_TAG",
    "MAX_TARGET",
    "NarParser",
    "NarResult",
    "NarSink",
    "NarVerifier",
    "check_entry_name",
    "dump",
]

MAGIC = b"nix-archive-1"
MAX_TAG = 32  # longest keyword or magic string we accept
MAX_NAME = 255  # entry names, as NAME_MAX on Linux
MAX_TARGET = 4095  # symlink targets, as PATH_MAX - 1
MAX_DEPTH = 64  # nodes deeper than this are rejected (the root is depth 0)


class NarSink(Protocol):
    """Receives a NAR's tree as events, in stream order.

    ``entry`` names the node that follows inside the innermost open directory; the
    root node has no name. ``file_data`` gets a view into the caller's buffer that is
    only valid during the call: copy or write it, do not keep it.
    """

    def directory_start(self) -> None: ...

    def directory_end(self) -> None: ...

    def entry(self, name: bytes) -> None: ...

    def file_start(self, executable: bool, size: int) -> None: ...

    def file_data(self, chunk: memoryview) -> None: ...

    def file_end(self) -> None: ...

    def symlink(self, target: bytes) -> None: ...


@dataclass(frozen=True)
class NarResult:
    """What a complete NAR stream measured: its sha256 digest and its length in bytes."""

    nar_hash: bytes
    nar_size: int


def check_entry_name(name: bytes) -> str | None:
    """Return why ``name`` is not a valid directory entry name, or None if it is."""
    if not name:
        return "entry name is empty"
    if name in (b".", b".."):
        return f"entry name {name!r} is not allowed"
    if b"/" in name:
        return f"entry name {name!r} contains '/'"
    if b"\0" in name:
        return f"entry name {name!r} contains NUL"
    return None


class _Stream:
    """A grammar request: pass the next ``size`` bytes to the sink as file contents."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


# The grammar is written as generators that yield what they need next: an int n asks for
# exactly n bytes (sent back as bytes), a _Stream asks for contents to be streamed.
_Request = int | _Stream
_Grammar = Generator[_Request, Any, Any]


class NarParser:
    """Strict push parser for one NAR, driving an optional :class:`NarSink`."""

    def __init__(self, sink: NarSink | None = None) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self._size = 0  # bytes fed
        self._offset = 0  # bytes consumed by the grammar (equals _size unless it failed)
        self._buf = bytearray()
        self._want = 0  # bytes the pending token request needs
        self._stream_left = 0  # contents bytes still to pass to the sink
        self._done = False
        self._failed: Exception | None = None
        self._grammar = self._archive()
        self._advance(None)

    @property
    def nar_size(self) -> int:
        """Bytes fed so far."""
        return self._size

    @property
    def done(self) -> bool:
        """True once the final ``)`` of the archive has been read."""
        return self._done

    def nar_hash_digest(self) -> bytes:
        """sha256 digest of the bytes fed so far."""
        return self._hash.digest()

    def result(self) -> NarResult:
        return NarResult(self._hash.digest(), self._size)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse the next chunk; raises NarError at the first byte that breaks a rule."""
        if self._failed is not None:
            raise NarError(f"parser already failed: {self._failed}", offset=self._offset)
        self._hash.update(data)
        self._size += len(data)
        view = memoryview(data).cast("B")
        try:
            self._consume(view)
        except Exception as exc:  # a grammar error, or the sink failed mid-node
            self._failed = exc
            raise

    def finish(self) -> NarResult:
        """Declare the end of input; raises NarError if the archive is incomplete."""
        if self._failed is not None:
            raise NarError(f"parser already failed: {self._failed}", offset=self._offset)
        if not self._done:
            self._failed = NarError("archive is truncated", offset=self._offset)
            raise self._failed
        return self.result()

    # -- driver ---------------------------------------------------------------------

    def _consume(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end:
            if self._done:
                raise NarError("trailing bytes after the end of the archive", offset=self._offset)
            if self._stream_left:
                n = min(self._stream_left, end - pos)
                if self._sink is not None:
                    self._sink.file_data(view[pos : pos + n])
                pos += n
                self._offset += n
                self._stream_left -= n
                if not self._stream_left:
                    self._advance(None)
                continue
            take = min(self._want - len(self._buf), end - pos)
            self._buf += view[pos : pos + take]
            pos += take
            self._offset += take
            if len(self._buf) == self._want:
                token = bytes(self._buf)
                self._buf.clear()
                self._advance(token)

    def _advance(self, value: bytes | None) -> None:
        """Resume the grammar with ``value`` until it asks for bytes we do not have yet."""
        while True:
            try:
                request = self._grammar.send(value)
            except StopIteration:
                self._done = True
                return
            if isinstance(request, _Stream):
                if request.size:
                    self._stream_left = request.size
                    return
                value = None
            elif request:
                self._want = request
                return
            else:
                value = b""

    # -- grammar --------------------------------------------------------------------

    def _archive(self) -> _Grammar:
        start = self._offset
        magic = yield from self._string(MAX_TAG, "magic")
        if magic != MAGIC:
            raise NarError(f"bad magic {magic!r}, expected {MAGIC!r}", offset=start)
        yield from self._node(0)

    def _string(self, cap: int, what: str) -> _Grammar:
        start = self._offset
        size = int.from_bytes((yield 8), "little")
        if size > cap:
            raise NarError(f"{what} is {size} bytes, over the limit of {cap}", offset=start)
        padded = yield size + (-size) % 8
        if padded.count(0, size) != len(padded) - size:
            raise NarError(f"non-zero padding after {what}", offset=self._offset - len(padded))
        return padded[:size]

    def _tag(self) -> _Grammar:
        return (yield from self._string(MAX_TAG, "tag"))

    def _expect(self, tag: bytes, where: str) -> _Grammar:
        start = self._offset
        got = yield from self._tag()
        if got != tag:
            raise NarError(f"expected {tag.decode()!r} {where}, got {got!r}", offset=start)

    def _node(self, depth: int) -> _Grammar:
        start = self._offset
        if depth >= MAX_DEPTH:
            raise NarError(f"nesting depth {depth} reaches the limit of {MAX_DEPTH}", offset=start)
        yield from self._expect(b"(", "to open a node")
        yield from self._expect(b"type", "after '('")
        start = self._offset
        kind = yield from self._tag()
        if kind == b"regular":
            yield from self._regular()
        elif kind == b"symlink":
            yield from self._symlink()
        elif kind == b"directory":
            yield from self._directory(depth)
        else:
            raise NarError(f"unknown node type {kind!r}", offset=start)

    def _close(self, what: str) -> _Grammar:
        start = self._offset
        tag = yield from self._tag()
        if tag == b")":
            return
        if tag == b"type":
            problem = "a second 'type'"
        elif tag == b"executable":
            problem = "'executable' after 'contents' (field order)"
        elif tag in (b"contents", b"target"):
            problem = f"a second {tag.decode()!r}"
        else:
            problem = f"unexpected tag {tag!r}"
        raise NarError(f"{what} has {problem}, expected ')'", offset=start)

    def _regular(self) -> _Grammar:
        start = self._offset
        tag = yield from self._tag()
        executable = tag == b"executable"
        if executable:
            marker_start = self._offset
            marker = yield from self._string(MAX_TAG, "executable marker")
            if marker:
                raise NarError(
                    f"executable marker must be the empty string, got {marker!r}",
                    offset=marker_start,
                )
            start = self._offset
            tag = yield from self._tag()
        if tag != b"contents":
            if tag == b")":
                raise NarError("regular file has no 'contents'", offset=start)
            if tag == b"executable":
                raise NarError("regular file has 'executable' twice", offset=start)
            raise NarError(f"expected 'contents' in a regular file, got {tag!r}", offset=start)
        size = int.from_bytes((yield 8), "little")
        if self._sink is not None:
            self._sink.file_start(executable, size)
        yield _Stream(size)
        pad = (-size) % 8
        if pad and (yield pad).count(0) != pad:
            raise NarError("non-zero padding after file contents", offset=self._offset - pad)
        if self._sink is not None:
            self._sink.file_end()
        yield from self._close("regular file")

    def _symlink(self) -> _Grammar:
        yield from self._expect(b"target", "in a symlink")
        start = self._offset
        target = yield from self._string(MAX_TARGET, "symlink target")
        if not target:
            raise NarError("symlink target is empty", offset=start)
        if b"\0" in target:
            raise NarError(f"symlink target {target!r} contains NUL", offset=start)
        if self._sink is not None:
            self._sink.symlink(target)
        yield from self._close("symlink")

    def _directory(self, depth: int) -> _Grammar:
        if self._sink is not None:
            self._sink.directory_start()
        previous: bytes | None = None
        while True:
            start = self._offset
            tag = yield from self._tag()
            if tag == b")":
                break
            if tag != b"entry":
                raise NarError(f"expected 'entry' or ')' in a directory, got {tag!r}", offset=start)
            yield from self._expect(b"(", "after 'entry'")
            yield from self._expect(b"name", "first in an entry")
            start = self._offset
            name = yield from self._string(MAX_NAME, "entry name")
            problem = check_entry_name(name)
            if problem is not None:
                raise NarError(problem, offset=start)
            if previous is not None and name <= previous:
                problem = "duplicate entry name" if name == previous else "entries not sorted:"
                raise NarError(f"{problem} {name!r} after {previous!r}", offset=start)
            previous = name
            if self._sink is not None:
                self._sink.entry(name)
            yield from self._expect(b"node", "after the entry name")
            yield from self._node(depth + 1)
            yield from self._expect(b")", "to close an entry")
        if self._sink is not None:
            self._sink.directory_end()


class NarVerifier(NarParser):
    """A parser that also checks the stream against a signed NarHash and NarSize.

    Exceeding ``expected_size`` raises SizeMismatch at once, before those bytes are parsed
    or hashed; a short stream or a different sha256 is reported by ``finish()``.
    """

    def __init__(self, expected_sha256: bytes, expected_size: int, sink: NarSink | None = None) -> None:
        if len(expected_sha256) != 32:
            raise ValueError(f"expected a 32-byte sha256 digest, got {len(expected_sha256)} bytes")
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        super().__init__(sink)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.nar_size + len(data) > self.expected_size:
            raise SizeMismatch(
                f"NAR is longer than its NarSize {self.expected_size} "
                f"(at least {self.nar_size + len(data)} bytes)"
            )
        super().feed(data)

    def finish(self) -> NarResult:
        if self.nar_size != self.expected_size:
            raise SizeMismatch(f"NAR is {self.nar_size} bytes, shorter than its NarSize {self.expected_size}")
        result = super().finish()
        if result.nar_hash != self.expected_sha256:
            raise HashMismatch(
                f"NAR sha256 is {result.nar_hash.hex()}, expected {self.expected_sha256.hex()}"
            )
        return result


# -- writer -----------------------------------------------------------------------------

_FLUSH_AT = 64 * 1024  # batch small tokens into chunks of about this size
_READ_SIZE = 1024 * 1024  # file contents are streamed in reads of this size


def _string_bytes(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + b"\0" * ((-len(data)) % 8)


class _Dumper:
    """Serialises a filesystem tree exactly as ``nix-store --dump`` does."""

    def __init__(self) -> None:
        self.out = bytearray(_string_bytes(MAGIC))

    def put(self, *strings: bytes) -> None:
        for s in strings:
            self.out += _string_bytes(s)

    def take(self) -> Iterator[bytes]:
        if self.out:
            yield bytes(self.out)
            self.out.clear()

    def node(self, path: bytes) -> Iterator[bytes]:
        st = os.lstat(path)
        self.put(b"(", b"type")
        if stat.S_ISREG(st.st_mode):
            yield from self.regular(path)
        elif stat.S_ISLNK(st.st_mode):
            self.put(b"symlink", b"target", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            self.put(b"directory")
            for name in sorted(os.listdir(path)):
                self.put(b"entry", b"(", b"name", name, b"node")
                yield from self.node(path + b"/" + name)
                self.put(b")")
        else:
            raise NarError(f"{os.fsdecode(path)!r} is not a regular file, directory or symlink")
        self.put(b")")
        if len(self.out) >= _FLUSH_AT:
            yield from self.take()

    def regular(self, path: bytes) -> Iterator[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            self.put(b"regular")
            if st.st_mode & stat.S_IXUSR:  # Nix looks at the owner's execute bit only
                self.put(b"executable", b"")
            self.put(b"contents")
            self.out += st.st_size.to_bytes(8, "little")
            left = st.st_size
            if left >= _FLUSH_AT:
                yield from self.take()
            while left:
                block = f.read(min(left, _READ_SIZE))
                if not block:
                    raise NarError(f"{os.fsdecode(path)!r} shrank while it was being dumped")
                left -= len(block)
                if len(block) < _FLUSH_AT:
                    self.out += block
                else:
                    yield block
            if f.read(1):
                raise NarError(f"{os.fsdecode(path)!r} grew while it was being dumped")
            self.out += b"\0" * ((-st.st_size) % 8)


def dump(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """Yield the NAR serialisation of ``path``, byte-identical to ``nix-store --dump``.

    File contents are streamed in bounded reads; nothing holds a whole file in memory.
    """
    dumper = _Dumper()
    yield from dumper.node(os.fsencode(path))
    yield from dumper.take()
