"""ERIS v1.0.0 (Encoding for Robust Immutable Storage): a streaming encoder and a strict decoder.

Content is padded (0x80, then zeros to a whole block) and cut into leaf blocks; each block
is encrypted with IETF ChaCha20 under a key derived from its own plain text, and named by
the BLAKE2b-256 of the encrypted bytes. Internal nodes list the (reference, key) pairs of
their children, level by level, until one pair remains: the root, which together with
the block size and the tree's level forms the read capability.

Nothing here does I/O. The encoder hands each block to a sink as soon as it exists and
keeps at most one block per tree level. The decoder asks a caller-supplied ``get_block``
for blocks, verifies every one before use, and refuses trees that could not fit within
the size the caller already trusts (a signed NarSize) before fetching anything.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from substituter import errors

__all__ = [
    "BLOCK_SIZES",
    "BlockSink",
    "GetBlock",
    "NULL_SECRET",
    "ErisError",
    "CapabilityError",
    "ReadCapability",
    "Encoder",
    "encode",
    "encode_to",
    "decode",
    "decode_bytes",
    "block_urn",
    "parse_block_urn",
]

BLOCK_SIZES = (1024, 32768)
NULL_SECRET = bytes(32)
_HASH_SIZE = 32
_PAIR_SIZE = 2 * _HASH_SIZE
_NULL_REF = bytes(_HASH_SIZE)
_CAP_SIZE = 2 + 2 * _HASH_SIZE
_CAP_BLOCK_SIZE_CODES = {1024: 0x0A, 32768: 0x0F}  # log2 of the block size
_CAP_BLOCK_SIZES = {code: size for size, code in _CAP_BLOCK_SIZE_CODES.items()}
_URN_PREFIX = "urn:eris:"
_BLOCK_URN_PREFIX = "urn:blake2b:"
_READ_CHUNK = 1 << 20
Buffer = bytes | bytearray | memoryview
_MAX_CONTENT = 2**64 - 1  # sizes in Nix (NarSize) are unsigned 64-bit


class ErisError(errors.FormatError):
    """ERIS data is malformed: a block of the wrong size, bad padding, a broken internal node."""


class CapabilityError(ErisError):
    """A read capability (URN or 66 bytes) does not parse strictly."""


# --- small pure helpers ----------------------------------------------------------------


def _b32(data: bytes) -> str:
    """Unpadded upper-case RFC 4648 base32, as ERIS URNs write it."""
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _unb32(text: str, size: int, what: str) -> bytes:
    """Strict inverse of `_b32` for exactly `size` bytes; `what` names the field in errors."""
    expected_len = -(-size * 8 // 5)
    if len(text) != expected_len:
        raise CapabilityError(f"{what} has {len(text)} base32 characters, expected {expected_len}")
    padded = text + "=" * (-len(text) % 8)
    try:
        data = base64.b32decode(padded, casefold=False)
    except (binascii.Error, ValueError) as exc:
        raise CapabilityError(f"{what} is not upper-case unpadded base32: {text!r}") from exc
    if _b32(data) != text:  # non-zero trailing bits would decode to the same bytes
        raise CapabilityError(f"{what} is not canonical base32 (trailing bits set): {text!r}")
    return data


def _hash(data: Buffer) -> bytes:
    return hashlib.blake2b(data, digest_size=_HASH_SIZE).digest()


# cryptography takes the 4-byte little-endian block counter (0) and the 12-byte IETF nonce
# ([level] + 11 zero bytes) as one 16-byte value.
_NONCES = [bytes(4) + bytes((level,)) + bytes(11) for level in range(256)]


def _chacha20(key: bytes, level: int, data: Buffer) -> bytes:
    """ChaCha20 as ERIS uses it for a node at `level`; it is its own inverse."""
    cipher = Cipher(algorithms.ChaCha20(key, _NONCES[level]), mode=None)
    return cipher.encryptor().update(data)


def block_urn(ref: bytes) -> str:
    """The URN of a single block: ``urn:blake2b:`` + base32 of its 32-byte reference."""
    if len(ref) != _HASH_SIZE:
        raise ValueError(f"a block reference has {_HASH_SIZE} bytes, not {len(ref)}")
    return _BLOCK_URN_PREFIX + _b32(ref)


def parse_block_urn(urn: str) -> bytes:
    """The 32-byte reference named by a ``urn:blake2b:`` URN; CapabilityError if malformed."""
    if not urn.startswith(_BLOCK_URN_PREFIX):
        raise CapabilityError(f"block URN does not start with {_BLOCK_URN_PREFIX!r}: {urn!r}")
    return _unb32(urn[len(_BLOCK_URN_PREFIX) :], _HASH_SIZE, "block URN")


# --- read capability --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadCapability:
    """What is needed to decode content: block size, tree level, and the root's ref and key."""

    block_size: int
    level: int
    root_ref: bytes
    root_key: bytes

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise CapabilityError(f"block size {self.block_size} is not one of {BLOCK_SIZES}")
        if not 0 <= self.level <= 255:
            raise CapabilityError(f"level {self.level} does not fit in one byte")
        for name, value in (("root reference", self.root_ref), ("root key", self.root_key)):
            if len(value) != _HASH_SIZE:
                raise CapabilityError(f"{name} has {len(value)} bytes, expected {_HASH_SIZE}")

    @property
    def arity(self) -> int:
        """How many (reference, key) pairs fit in one internal node."""
        return self.block_size // _PAIR_SIZE

    def to_bytes(self) -> bytes:
        """The 66-byte binary form: block-size code, level, root reference, root key."""
        header = bytes((_CAP_BLOCK_SIZE_CODES[self.block_size], self.level))
        return header + self.root_ref + self.root_key

    def urn(self) -> str:
        return _URN_PREFIX + _b32(self.to_bytes())

    def __str__(self) -> str:
        return self.urn()

    @classmethod
    def parse(cls, urn_or_bytes: str | bytes) -> ReadCapability:
        """Parse a ``urn:eris:`` URN or the 66-byte binary form; CapabilityError if malformed."""
        if isinstance(urn_or_bytes, str):
            if not urn_or_bytes.startswith(_URN_PREFIX):
                raise CapabilityError(
                    f"read capability does not start with {_URN_PREFIX!r}: {urn_or_bytes[:40]!r}"
                )
            data = _unb32(urn_or_bytes[len(_URN_PREFIX) :], _CAP_SIZE, "read capability")
        else:
            data = bytes(urn_or_bytes)
        if len(data) != _CAP_SIZE:
            raise CapabilityError(f"read capability has {len(data)} bytes, expected {_CAP_SIZE}")
        block_size = _CAP_BLOCK_SIZES.get(data[0])
        if block_size is None:
            raise CapabilityError(
                f"read capability block-size code 0x{data[0]:02x} is neither 0x0a (1 KiB)"
                " nor 0x0f (32 KiB)"
            )
        return cls(block_size, data[1], data[2:34], data[34:66])


# --- encoder ----------------------------------------------------------------------------

BlockSink = Callable[[bytes, bytes], object]
"""Receives (reference, encrypted block) for every block, in the order they are made."""


class Encoder:
    """Streaming ERIS encoder: `feed` content in any pieces, then `finish` for the capability.

    Blocks go to `sink` as soon as they are complete. Memory is one pending leaf plus at most
    one internal node's worth of pairs per level, whatever the content size.
    """

    def __init__(
        self, block_size: int, sink: BlockSink, convergence_secret: bytes = NULL_SECRET
    ) -> None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"ERIS block size must be one of {BLOCK_SIZES}, not {block_size}")
        if len(convergence_secret) != _HASH_SIZE:
            raise ValueError(
                f"convergence secret must be {_HASH_SIZE} bytes, not {len(convergence_secret)}"
            )
        self._block_size = block_size
        self._arity = block_size // _PAIR_SIZE
        self._sink = sink
        self._secret = convergence_secret
        self._pending = bytearray()  # content not yet making a whole leaf
        # _levels[i]: ref‖key pairs of level-i nodes not yet gathered into a level-(i+1) node
        self._levels: list[list[bytes]] = [[]]
        self._finished = False

    def feed(self, data: Buffer) -> None:
        if self._finished:
            raise ValueError("feed() after finish()")
        view = memoryview(data)
        bs = self._block_size
        if self._pending:
            take = bs - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < bs:
                return
            self._add_leaf(bytes(self._pending))
            self._pending.clear()
        whole = len(view) - len(view) % bs
        for offset in range(0, whole, bs):
            self._add_leaf(view[offset : offset + bs])
        self._pending += view[whole:]

    def finish(self) -> ReadCapability:
        """Pad and emit the last leaf, close every open level, and return the capability."""
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        padding = b"\x80" + bytes(self._block_size - len(self._pending) - 1)
        self._add_leaf(bytes(self._pending) + padding)
        self._pending.clear()
        level = 0
        # The root is the single pair left at the highest level; below it, gather what is open.
        while level + 1 < len(self._levels) or len(self._levels[level]) > 1:
            if self._levels[level]:
                self._add_node(level + 1)
            level += 1
        (root,) = self._levels[level]
        return ReadCapability(self._block_size, level, root[:_HASH_SIZE], root[_HASH_SIZE:])

    def _add_leaf(self, leaf: Buffer) -> None:
        key = hashlib.blake2b(leaf, digest_size=_HASH_SIZE, key=self._secret).digest()
        self._emit(0, key, _chacha20(key, 0, leaf))

    def _add_node(self, level: int) -> None:
        """Gather the open pairs of `level - 1` into one node at `level`."""
        if len(self._levels) == level:
            self._levels.append([])
        children = self._levels[level - 1]
        node = b"".join(children)
        node += bytes(self._block_size - len(node))
        children.clear()
        key = _hash(node)
        self._emit(level, key, _chacha20(key, level, node))

    def _emit(self, level: int, key: bytes, block: bytes) -> None:
        ref = _hash(block)
        self._sink(ref, block)
        pairs = self._levels[level]
        pairs.append(ref + key)
        if len(pairs) == self._arity:  # a full node is needed whatever comes next
            self._add_node(level + 1)


def _chunks(source: Iterable[Buffer] | BinaryIO) -> Iterator[Buffer]:
    if hasattr(source, "read"):
        while chunk := source.read(_READ_CHUNK):
            yield chunk
    else:
        yield from source


def encode_to(
    source: Iterable[Buffer] | BinaryIO,
    sink: BlockSink,
    block_size: int,
    convergence_secret: bytes = NULL_SECRET,
) -> ReadCapability:
    """Encode a stream of content pieces (or a binary file), sending blocks to `sink`."""
    encoder = Encoder(block_size, sink, convergence_secret)
    for chunk in _chunks(source):
        encoder.feed(chunk)
    return encoder.finish()


def encode(
    source: Iterable[Buffer] | BinaryIO | Buffer,
    block_size: int,
    convergence_secret: bytes = NULL_SECRET,
) -> tuple[ReadCapability, dict[bytes, bytes]]:
    """Encode and collect the blocks by reference (identical blocks are stored once).

    Holds every block in memory: for small content and tests; stream with `encode_to`.
    """
    blocks: dict[bytes, bytes] = {}
    pieces: Iterable[Buffer] | BinaryIO
    pieces = [source] if isinstance(source, (bytes, bytearray, memoryview)) else source
    cap = encode_to(pieces, blocks.__setitem__, block_size, convergence_secret)
    return cap, blocks


# --- decoder ----------------------------------------------------------------------------

GetBlock = Callable[[bytes], Awaitable[bytes | None]]
"""Fetches a block by reference; returns None (or raises NotAvailable) when it is missing."""


@dataclass(frozen=True, slots=True)
class _Node:
    ref: bytes
    key: bytes
    level: int
    index: int  # position among the nodes of its level, counted from the left
    last: bool  # on the tree's right edge: the only nodes that may be partly full


class _Tree:
    """Every check of a strict decode, apart from how and when blocks are fetched."""

    def __init__(self, cap: ReadCapability, max_size: int | None) -> None:
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must not be negative, got {max_size}")
        self.block_size = cap.block_size
        self.arity = cap.arity
        self.max_size = max_size
        self.root = _Node(cap.root_ref, cap.root_key, cap.level, 0, True)
        # A canonical tree of level L >= 1 has more than arity**(L-1) leaves, all but one full.
        least = self.arity ** (cap.level - 1) * self.block_size if cap.level > 0 else 0
        if max_size is not None and least > max_size:
            raise errors.SizeMismatch(
                f"read capability of level {cap.level} with {cap.block_size}-byte blocks"
                f" encodes at least {least} bytes, more than the expected {max_size}"
            )
        if least > _MAX_CONTENT:  # even unbounded, a deeper tree can only be an attack
            raise ErisError(
                f"read capability of level {cap.level} with {cap.block_size}-byte blocks"
                f" encodes at least {least} bytes, more than any content (2**64 bytes)"
            )

    def missing(self, node: _Node) -> errors.NotAvailable:
        return errors.NotAvailable(f"block {_b32(node.ref)} (level {node.level}) is missing")

    def open(self, node: _Node, block: bytes) -> bytes:
        """Check `block` against the node's reference, decrypt it, and check its key."""
        if len(block) != self.block_size:
            raise ErisError(
                f"block {_b32(node.ref)} has wrong length {len(block)}, expected {self.block_size}"
            )
        actual = _hash(block)
        if actual != node.ref:
            raise errors.HashMismatch(
                f"block {_b32(node.ref)} does not match its reference: its BLAKE2b-256 is"
                f" {_b32(actual)}"
            )
        plain = _chacha20(node.key, node.level, block)
        # Leaf keys depend on the convergence secret, so only internal keys can be checked.
        if node.level > 0 and _hash(plain) != node.key:
            raise errors.HashMismatch(
                f"internal node {_b32(node.ref)} at level {node.level} does not hash to its key:"
                " the read capability's level or key, or a parent node, is wrong"
            )
        return plain

    def children(self, node: _Node, plain: bytes) -> list[_Node]:
        """The child nodes an internal node lists, checked for layout and the size bound."""
        arity, name = self.arity, _b32(node.ref)
        count = arity
        for i in range(arity):
            if plain[i * _PAIR_SIZE : i * _PAIR_SIZE + _HASH_SIZE] == _NULL_REF:
                count = i
                break
        if plain.count(0, count * _PAIR_SIZE) != len(plain) - count * _PAIR_SIZE:
            raise ErisError(
                f"internal node {name} has non-zero bytes after its {count} reference-key pairs"
            )
        if count == 0:
            raise ErisError(f"internal node {name} holds no references")
        if count < arity and not node.last:
            raise ErisError(
                f"internal node {name} holds {count} of {arity} references but is not the last"
                f" node of level {node.level}"
            )
        if count == 1 and node is self.root:
            raise ErisError(
                f"root node {name} holds a single reference: the tree is deeper than its content"
            )
        first = node.index * arity
        nodes = [
            _Node(
                plain[i * _PAIR_SIZE : i * _PAIR_SIZE + _HASH_SIZE],
                plain[i * _PAIR_SIZE + _HASH_SIZE : (i + 1) * _PAIR_SIZE],
                node.level - 1,
                first + i,
                node.last and i == count - 1,
            )
            for i in range(count)
        ]
        self._check_bound(nodes[-1])  # the right-most child implies the most content
        return nodes

    def _check_bound(self, node: _Node) -> None:
        """Refuse, before fetching anything under it, a node that implies too much content."""
        if self.max_size is None:
            return
        first_leaf = node.index * self.arity**node.level
        least = first_leaf * self.block_size  # every leaf before this one is full
        if least > self.max_size:
            raise errors.SizeMismatch(
                f"block {_b32(node.ref)} at level {node.level} starts leaf {first_leaf}, so the"
                f" content has at least {least} bytes, more than the expected {self.max_size}"
            )

    def leaf_content(self, node: _Node, plain: bytes) -> bytes:
        """A leaf's content: all of it, or for the last leaf what precedes its padding."""
        if node.last:
            unpadded = plain.rstrip(b"\0")
            if not unpadded.endswith(b"\x80"):
                raise ErisError(
                    f"last leaf {_b32(node.ref)} is not padded: it must end in 0x80 followed"
                    " only by zero bytes"
                )
            plain = unpadded[:-1]
        end = node.index * self.block_size + len(plain)
        if self.max_size is not None and end > self.max_size:
            raise errors.SizeMismatch(
                f"leaf {node.index} ({_b32(node.ref)}) brings the content to {end} bytes, more"
                f" than the expected {self.max_size}"
            )
        return plain


def _discard(task: asyncio.Future[bytes]) -> None:
    """Cancel a fetch nobody will wait for, retrieving its error so asyncio does not log it."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


class _Walker:
    """Walks the tree left to right, fetching internal nodes one sibling ahead per level.

    It yields the leaves in batches (the children of one level-1 node), so a leaf costs
    one generator step however deep the tree is.
    """

    def __init__(self, tree: _Tree, get_block: GetBlock) -> None:
        self._tree = tree
        self._get_block = get_block

    def start(self, node: _Node) -> asyncio.Future[bytes]:
        return asyncio.ensure_future(self._fetch(node))

    async def _fetch(self, node: _Node) -> bytes:
        block = await self._get_block(node.ref)
        if block is None:
            raise self._tree.missing(node)
        return block

    async def leaves(self) -> AsyncGenerator[list[_Node], None]:
        root = self._tree.root
        if root.level == 0:
            yield [root]
            return
        async with aclosing(self._walk(root, self.start(root))) as batches:
            async for batch in batches:
                yield batch

    async def _walk(
        self, node: _Node, fetching: asyncio.Future[bytes]
    ) -> AsyncGenerator[list[_Node], None]:
        try:
            block = await fetching
        finally:
            _discard(fetching)
        children = self._tree.children(node, self._tree.open(node, block))
        if node.level == 1:
            yield children
            return
        # While one child's subtree is walked, its next sibling is already on its way.
        ahead: asyncio.Future[bytes] | None = self.start(children[0])
        try:
            for i, child in enumerate(children):
                current = ahead
                assert current is not None
                ahead = self.start(children[i + 1]) if i + 1 < len(children) else None
                async with aclosing(self._walk(child, current)) as batches:
                    async for batch in batches:
                        yield batch
        finally:
            if ahead is not None:
                _discard(ahead)


async def decode(
    cap: ReadCapability,
    get_block: GetBlock,
    *,
    max_size: int | None,
    concurrency: int = 16,
) -> AsyncGenerator[bytes, None]:
    """Yield the content of `cap` in order, verifying every block before its bytes are used.

    Up to `concurrency` leaf blocks are fetched at once (plus one internal node per level).
    `max_size` is the size the caller already trusts (a signed NarSize or FileSize): a tree
    that must hold more is refused before anything is fetched, and no more than `max_size`
    bytes are ever yielded. Errors: ErisError (malformed), HashMismatch (a block or key that
    does not verify), NotAvailable (a missing block), SizeMismatch (content beyond max_size).
    Close the generator (``aclose``) to cancel outstanding fetches when stopping early.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    tree = _Tree(cap, max_size)
    walker = _Walker(tree, get_block)
    window: deque[tuple[_Node, asyncio.Future[bytes]]] = deque()
    try:
        async with aclosing(walker.leaves()) as batches:
            async for batch in batches:
                for leaf in batch:
                    window.append((leaf, walker.start(leaf)))
                    if len(window) == concurrency:
                        node, fetching = window.popleft()
                        yield tree.leaf_content(node, tree.open(node, await fetching))
        while window:
            node, fetching = window.popleft()
            yield tree.leaf_content(node, tree.open(node, await fetching))
    finally:
        for _, fetching in window:
            _discard(fetching)


def decode_bytes(
    cap: ReadCapability, blocks: Mapping[bytes, bytes], *, max_size: int | None = None
) -> bytes:
    """Decode from blocks held in memory, with the same checks as `decode`. For tests."""
    tree = _Tree(cap, max_size)
    content = bytearray()
    stack = [tree.root]  # depth first, left to right: at most level × arity nodes
    while stack:
        node = stack.pop()
        block = blocks.get(node.ref)
        if block is None:
            raise tree.missing(node)
        plain = tree.open(node, block)
        if node.level == 0:
            content += tree.leaf_content(node, plain)
        else:
            stack.extend(reversed(tree.children(node, plain)))
    return bytes(content)
