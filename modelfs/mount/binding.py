"""Files to readers: the data path's side of the tree (:mod:`.tree`).

The tree is a pure listing: each file says what bytes it is. This module reads what building
it needs (a plain tar's headers by range, a compressed layer's member list by streaming it)
and binds a reader to a file when the file is first used: opened, read, prefetched, or asked
how much of it is cached. :meth:`FileReaders.reader` is the one place that decides which
reader serves a file; the FUSE layer and the daemon's prefetch and status all go through it.

A file an OMS statement signs in a way no layer digest stands for (a file in a tar layer,
another hash, shards) is read only through :meth:`FileReaders.read_view`, which waits on its
check (:mod:`.filecheck`) before serving a byte of it.

A compressed layer has one :class:`~.layerstream.LayerStream` for all its files, kept here from
the listing on: the stream that listed a layer already made a target for each member, and a
file bound later gets that target.
"""

from __future__ import annotations

from typing import Any

from ..errors import SignatureError
from ..formats.spec import Descriptor
from ..formats.tarindex import Member, ReadAt
from ..formats.view import View
from .blobreader import joined
from .fetcher import BlobReader, Fetcher
from .filecheck import FileGate, gate_for
from .layerstream import LayerStream, derived_key
from .tree import Layer, Node, Tree, build_tree


class FileReaders:
    """The readers of one mount's files, made on first use (the fetcher keeps one reader per
    blob; a layer stream one target per member)."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self._streams: dict[tuple[str, str], LayerStream] = {}  # by layer digest and packing
        self._gate: FileGate | None = None

    @property
    def gate(self) -> FileGate | None:
        """The signature checks of the mount's files; set once the tree is listed, before anything is served."""
        return self._gate

    @gate.setter
    def gate(self, gate: FileGate | None) -> None:
        if gate is not None:  # a refused file's pages leave the kernel by the one drop path
            gate.on_refused = lambda node: self.fetcher.pages_stale(self.key(node))
        self._gate = gate

    async def opened(self, node: Node) -> None:
        """``node`` is opened: its reader bound, and its signature check asked whether it
        may be (a refused file is not; an empty one is checked now)."""
        reader = self.reader(node)
        if self._gate is not None:
            await self._gate.admit_open(node, reader)

    async def read_view(self, node: Node, offset: int, size: int) -> bytes | bytearray | memoryview:
        """Bytes [offset, offset + size) of file ``node``: the one way the FUSE layer reads a
        file, so a file with a pending signature check serves nothing before it matched."""
        reader = self.reader(node)
        if self._gate is not None:
            await self._gate.admit(node, reader, offset, offset + size)
        return await reader.read_view(node.offset + offset, size)

    def read_at(self, layer: Descriptor) -> ReadAt:
        """Range reads of a layer's blob, through its reader (a plain tar's headers), without
        read-ahead: listing jumps from header to header, and the reader's read-ahead took
        each jump for a stream, fetching blocks of members no one asked for (a view of one
        member of a 4 MiB tar fetched 3 MiB, not 1)."""
        reader = self.fetcher.reader(layer.digest, layer.size)
        return lambda offset, size: read_here(reader, offset, size)

    async def unpack_members(self, layer: Layer) -> list[Member]:
        """Stream a compressed layer now, keeping each member it holds (see :meth:`LayerStream.collect`)."""
        return await self._stream(layer).collect()

    def reader(self, node: Node) -> BlobReader:
        """The reader that serves ``node``'s bytes (a file: ``node.layer`` is set), read at
        ``node.offset``; made at the first call for its blob or member, the same one after."""
        layer = _layer_of(node)
        if layer.streamed:
            return self._stream(layer).target(node.member, node.size)
        return self.fetcher.reader(layer.descriptor.digest, layer.descriptor.size)

    @staticmethod
    def key(node: Node) -> str:
        """The key (``BlobReader.digest``) of the reader that serves ``node``, without binding
        it: the blob's digest, or the derived key of a member of a compressed layer."""
        layer = _layer_of(node)
        return derived_key(layer.descriptor.digest, node.member) if layer.streamed else layer.descriptor.digest

    def every(self, tree: Tree) -> list[BlobReader]:
        """One reader per distinct run of bytes in ``tree`` (what prefetch and the status count)."""
        return [self.reader(node) for node in tree.distinct_files()]

    def _stream(self, layer: Layer) -> LayerStream:
        key = (layer.descriptor.digest, layer.packing.value)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = self.fetcher.layer_stream(layer.descriptor, layer.packing, layer.where)
        return stream


async def fetch_here(reader: BlobReader, offset: int, size: int) -> range:
    """Make bytes [offset, offset + size) of ``reader``'s blob servable as a read would,
    with a reader's priority, but without moving its read-ahead (only those bytes are
    wanted: a header); the blocks that hold them."""
    size = min(size, reader.size - offset)
    if size <= 0 or offset < 0:
        return range(0)
    block_size = reader.blob.entry.block_size
    blocks = range(offset // block_size, (offset + size - 1) // block_size + 1)
    missing = [i for i in blocks if not reader.servable(i)]
    if missing:
        await reader.ensure(missing, foreground=True)
    return blocks


async def read_here(reader: BlobReader, offset: int, size: int) -> bytes:
    """Bytes [offset, offset + size) of ``reader``'s blob, fetched by :func:`fetch_here`, then
    taken from memory or the cache (a block dropped meanwhile: read as a reader reads it)."""
    size = min(size, reader.size - offset)
    if size <= 0 or offset < 0:
        return b""
    blocks = await fetch_here(reader, offset, size)
    parts = await reader.blocks(blocks[0], blocks[-1])
    if parts is None:  # dropped or damaged meanwhile: the read path fetches it again
        return await reader.read(offset, size)
    # only the bytes asked for are copied (a 64 KiB header chunk of a 1 MiB block)
    return joined(parts, offset - blocks[0] * reader.blob.entry.block_size, size)


def _layer_of(node: Node) -> Layer:
    assert node.layer is not None, f"{node.name!r} is not a file"
    return node.layer


async def check_signed_files(model: Any, fetcher: Fetcher, view: View | None = None) -> None:
    """``pull``'s turn of the mount's gate: the model's files listed as a mount of ``view``
    lists them, and every file of the view with a pending signature check hashed from the
    cache through its reader (a file outside the view was not pulled, and is not served).
    SignatureError (its one line) if one differs under enforce; under warn it is logged."""
    if model.verdict is None or model.verdict.file_checks is None:
        return
    readers = FileReaders(fetcher)
    tree = await build_tree(model, readers, view)
    gate = gate_for(model.verdict, tree)
    if gate is None:
        return
    failures = await gate.check_all(tree, readers.reader)
    if failures and gate.checks.enforcing:
        raise SignatureError(failures[0])
