"""Metadata first: what a loader reads before any tensor, fetched at mount before bulk
prefetch and kept in memory, so its header reads are memory hits, not registry round trips.

Measured before (issue 23: 2 GiB in 4 safetensors shards, vLLM): the headers finished about
1 s after the mount returned, behind shards nobody read yet. Here (512 MiB in 4 shards, nginx
at 200 MB/s per connection, 2 cores): every shard's header read 0.03-0.05 s after ``modelfs
mount`` returned, against 0.37-0.46 s before; first tensor 0.41-0.57 s from the mount command,
against 0.91-1.10 s. Fetched here, in parallel, with the readers' priority for request slots
(:class:`~.slots.RequestSlots`):

- small files loaders open first: ``config.json``, ``generation_config.json``,
  ``tokenizer*.json``, ``tokenizer.model``, ``special_tokens_map.json``, ``*.txt`` and
  ``*.jinja`` chat templates, each up to :data:`SMALL_FILE`;
- every ``*.index.json`` (its ``weight_map`` also orders prefetch: :mod:`.prefetch`);
- of every ``.safetensors``: its 8-byte header length, then the JSON header (at most
  :data:`SAFETENSORS_HEADER_MAX`, the format's own cap);
- of every ``.gguf`` (v2, v3): the header up to the end of its tensor-info table, parsed
  incrementally (at most :data:`GGUF_HEADER_MAX`).

The blocks that cover them are pinned in memory (:meth:`~.recent.RecentBlocks.pin`, at
most :data:`PIN_MAX` bytes in all). Blobs served only once checked whole (no trusted
block index) and files of compressed layers are left to prefetch: a header of theirs cannot
be read without the whole blob.
"""

from __future__ import annotations

import json
import logging
import posixpath
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch

import trio

from ..errors import ModelfsError, RegistryError
from .binding import FileReaders, fetch_here, read_here
from .fetcher import BlobReader
from .tree import ROOT_INODE, Node, Tree

log = logging.getLogger(__name__)

SMALL_FILE = 16 << 20  # a config, tokenizer or chat template larger than this is left to prefetch
SAFETENSORS_HEADER_MAX = 100_000_000  # safetensors refuses larger headers itself
GGUF_HEADER_MAX = 256 << 20  # a GGUF's key-value metadata (vocabularies) can be megabytes; this bounds it
GGUF_CHUNK = 1 << 20
# Items (key-value pairs, array elements, tensor infos) a GGUF header may hold: a real one has
# a vocabulary and its merges, a few hundred thousand strings each (Llama 3: 128,256 tokens,
# 280,147 merges), and a tensor info per tensor (thousands).
GGUF_ITEMS_MAX = 2_000_000  # beyond it, the header is read when asked for (not an error)
GGUF_YIELD = 4096  # items parsed between two turns of the serving loop
PIN_MAX = 512 << 20  # bytes of metadata blocks held in memory for the mount's life, at most
INDEX_BYTES_MAX = 32 << 20  # bytes of *.index.json parsed in all (what prefetch orders by), at most

SMALL_NAMES = ("config.json", "generation_config.json", "tokenizer*.json", "tokenizer.model",
               "special_tokens_map.json", "preprocessor_config.json", "*.txt", "*.jinja")

Read = Callable[[int, int], Awaitable[bytes]]  # (offset in the file, size) -> bytes


@dataclass
class MetadataFile:
    """A file of the tree as the metadata pass sees it: its path, the reader of its blob and
    where in that blob it starts."""

    path: str
    reader: BlobReader
    offset: int
    size: int
    streamed: bool = False  # a member of a compressed layer: reading it streams the whole layer

    async def fetch(self, offset: int, size: int) -> range:
        """Make bytes of the file servable, as a reader would but without moving its
        read-ahead (a header read would otherwise fetch blocks past it), with a reader's
        priority; the blocks that hold them. Nothing is read into memory here: a header the
        pass only fetches and pins (a safetensors JSON of up to 100 MB) is never joined whole."""
        return await fetch_here(self.reader, self.offset + offset, min(size, self.size - offset))

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes of the file, as :meth:`fetch` makes them servable, then taken from memory or
        the cache."""
        return await read_here(self.reader, self.offset + offset, min(size, self.size - offset))


@dataclass
class Metadata:
    """What the metadata pass fetched, and how it went (for ``status``)."""

    state: str = "pending"  # pending | fetching | ready | failed
    files: int = 0
    bytes: int = 0
    seconds: float | None = None
    indexes: list[tuple[str, object]] = field(default_factory=list)  # (path of a *.index.json, :func:`shards_of` it)
    error: str = ""

    def line(self) -> str:
        """One line for ``modelfs status``: ``ready (7 files, 412 KiB) in 0.4 s``."""
        if self.state == "ready":
            return f"ready ({self.files} files, {self.bytes / 1024:,.0f} KiB) in {self.seconds or 0:.1f} s"
        if self.state == "failed":
            return f"failed: {self.error} (read on demand)"
        return self.state


MAX_FILES = 1024  # metadata files read ahead at most (a tar of 100,000 *.txt files is no model's config)
SUFFIXES = (".json", ".model", ".txt", ".jinja", ".safetensors", ".gguf")


def node_path(tree: Tree, node: Node) -> str:
    """A node's path from the mount's root."""
    parts = []
    while node.inode != ROOT_INODE:
        parts.append(node.name)
        node = tree.nodes[node.parent]
    return "/".join(reversed(parts))


def metadata_files(tree: Tree, readers: FileReaders) -> list[MetadataFile]:
    """The files whose metadata is read ahead (:func:`kind` by name; only these get a path
    and a reader here: a tar layer of 100,000 files costs one suffix test per file)."""
    found: list[MetadataFile] = []
    for node in tree.files():
        if node.layer is None or kind(node.name, node.size) is None:
            continue
        if len(found) == MAX_FILES:
            log.info("more than %d metadata files: the rest are read when asked for", MAX_FILES)
            break
        found.append(MetadataFile(node_path(tree, node), readers.reader(node), node.offset, node.size,
                                  node.layer.streamed))
    return found


def prefetch_files(tree: Tree, readers: FileReaders) -> list[tuple[str, BlobReader]]:
    """One (path, reader) per distinct run of bytes the data path reads (what prefetch orders)."""
    return [(node_path(tree, node), readers.reader(node)) for node in tree.distinct_files()]


def kind(path: str, size: int) -> str | None:
    """What of a file is metadata: "whole", "index", "safetensors", "gguf", or None."""
    name = posixpath.basename(path)
    if not name.endswith(SUFFIXES):
        return None
    if name.endswith(".index.json"):
        return "index" if size <= SMALL_FILE else None
    if any(fnmatch(name, pattern) for pattern in SMALL_NAMES):
        return "whole" if size <= SMALL_FILE else None
    if name.endswith(".safetensors"):
        return "safetensors" if size >= 8 else None
    if name.endswith(".gguf"):
        return "gguf" if size >= 24 else None
    return None


async def header_length(what: str, read: Read, size: int) -> int:
    """Bytes from the start of the file a loader reads as its header (``what``: see :func:`kind`)."""
    if what == "safetensors":
        (length,) = struct.unpack("<Q", await read(0, 8))
        if length > SAFETENSORS_HEADER_MAX or 8 + length > size:
            raise ModelfsError(f"safetensors header of {length} bytes does not fit the file")
        return 8 + length
    if what == "gguf":
        return await gguf_header_length(read, size)
    return size


class _Cursor:
    """Reads a file forward in chunks, within a bound, for an incremental parse. Only the bytes
    not yet parsed are held (a header of up to 256 MiB was kept whole, for every GGUF of the
    model at once), and every :data:`GGUF_YIELD` items the parse lets the serving loop run: a
    hostile header of empty key-value pairs (13 bytes each) took 1.8 s of the loop's CPU per
    13 MB, 0.14 s at a stretch per MiB read (256 MiB of them: 36 s), now cut at
    :data:`GGUF_ITEMS_MAX`."""

    def __init__(self, read: Read, size: int, limit: int) -> None:
        self.read, self.size, self.limit = read, size, min(size, limit)
        self.buffer = bytearray()
        self.base = 0  # the file offset of buffer[0]
        self.position = 0
        self.items = 0

    async def item(self) -> None:
        """Count one parsed item (a pair, an array element, a tensor): at most
        :data:`GGUF_ITEMS_MAX`, the loop let run every :data:`GGUF_YIELD`."""
        self.items += 1
        if self.items > GGUF_ITEMS_MAX:
            raise ModelfsError(f"GGUF header has more than {GGUF_ITEMS_MAX} items")
        if self.items % GGUF_YIELD == 0:
            await trio.lowlevel.checkpoint()

    async def take(self, n: int, keep: bool = True) -> bytes:
        """The next ``n`` bytes (``keep=False``: skipped over, read but not kept)."""
        end = self.position + n
        if n < 0 or end > self.limit:
            raise ModelfsError(f"GGUF header runs past {self.limit} bytes")
        while self.base + len(self.buffer) < end:
            have = self.base + len(self.buffer)
            chunk = await self.read(have, min(GGUF_CHUNK, self.size - have))
            if not chunk:
                raise ModelfsError("GGUF header cut short")
            self.buffer += chunk
            if not keep:  # bytes skipped over are not held
                drop = min(len(self.buffer), end - self.base)
                del self.buffer[:drop]
                self.base += drop
        out = bytes(self.buffer[self.position - self.base:end - self.base]) if keep else b""
        self.position = end
        if end - self.base >= GGUF_CHUNK:  # parsed bytes let go
            del self.buffer[:end - self.base]
            self.base = end
        return out

    async def u32(self) -> int:
        return int(struct.unpack("<I", await self.take(4))[0])

    async def u64(self) -> int:
        return int(struct.unpack("<Q", await self.take(8))[0])

    async def string(self) -> None:
        await self.take(await self.u64(), keep=False)


GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
GGUF_STRING, GGUF_ARRAY = 8, 9


async def gguf_header_length(read: Read, size: int, limit: int = GGUF_HEADER_MAX) -> int:
    """The end of a GGUF v2/v3 file's tensor-info table: magic, version, tensor and key-value
    counts (u64), the key-value pairs (typed values, arrays), then per tensor its name, dims,
    type and offset (the format's spec, as llama.cpp's gguf.h writes it)."""
    cursor = _Cursor(read, size, limit)
    if await cursor.take(4) != b"GGUF":
        raise ModelfsError("not a GGUF file")
    version = await cursor.u32()
    if version not in (2, 3):
        raise ModelfsError(f"GGUF version {version} is not read ahead")
    tensors, pairs = await cursor.u64(), await cursor.u64()
    for _ in range(pairs):
        await cursor.item()
        await cursor.string()
        await _gguf_value(cursor, await cursor.u32())
    for _ in range(tensors):
        await cursor.item()
        await cursor.string()
        await cursor.take(8 * await cursor.u32(), keep=False)  # dims
        await cursor.take(4 + 8, keep=False)  # type, offset
    return cursor.position


async def _gguf_value(cursor: _Cursor, value_type: int, depth: int = 0) -> None:
    if value_type in GGUF_FIXED:
        await cursor.take(GGUF_FIXED[value_type], keep=False)
    elif value_type == GGUF_STRING:
        await cursor.string()
    elif value_type == GGUF_ARRAY and depth < 4:
        element, count = await cursor.u32(), await cursor.u64()
        if element in GGUF_FIXED:
            await cursor.take(GGUF_FIXED[element] * count, keep=False)
        else:
            for _ in range(count):
                await cursor.item()
                await _gguf_value(cursor, element, depth + 1)
    else:
        raise ModelfsError(f"GGUF value type {value_type} unknown")


def shards_of(data: bytes) -> dict[str, object]:
    """What prefetch keeps of a ``*.index.json`` (on a worker: 9 MB for DeepSeek-V3's 90,000
    tensors): its ``weight_map`` cut to each shard's first appearance, in order, so the mount
    holds a few names a shard, not every tensor's (:func:`~.prefetch.shard_order`)."""
    parsed = json.loads(data)
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict):
        return {}
    return {"weight_map": {shard: shard for shard in weight_map.values() if isinstance(shard, str)}}


def wanted(files: list[MetadataFile]) -> list[tuple[MetadataFile, str]]:
    """The files the pass reads, with what of each (see :func:`kind`)."""
    found = []
    for file in files:
        what = kind(file.path, file.size)
        if what is None or file.streamed or (file.reader.whole_mode and file.reader.size > SMALL_FILE):
            continue  # a big blob served only once checked whole: its header needs all of it
        found.append((file, what))
    return found


async def fetch_metadata(files: list[MetadataFile], result: Metadata) -> Metadata:
    """Read every file's metadata at once, pin the blocks that hold it, fill ``result``."""
    chosen = wanted(files)
    result.state = "fetching"
    started = time.monotonic()
    room, index_room = Room(PIN_MAX), Room(INDEX_BYTES_MAX)

    async def one(file: MetadataFile, what: str) -> None:
        if what == "index" and not index_room.take(file.size):
            log.info("%s not read ahead: indexes past %d bytes in all", file.path, INDEX_BYTES_MAX)
            what = "whole"  # fetched and pinned, not parsed
        try:
            length = await header_length(what, file.read, file.size)
            # the rest of it (a GGUF's parse read all of it); only an index's bytes are kept
            data = await file.read(0, length) if what == "index" else b""
            if what in ("whole", "safetensors"):
                await file.fetch(0, length)
        except RegistryError as exc:  # the fetch gave up (the reads of those bytes will try again)
            result.error = str(exc)
            log.warning("metadata of %s not read ahead: %s", file.path, exc)
            return
        except ModelfsError as exc:  # not the format its name says
            log.info("metadata of %s not read ahead: %s", file.path, exc)
            return
        if what == "index":
            try:
                result.indexes.append((file.path, await trio.to_thread.run_sync(shards_of, data)))
            except ValueError:
                log.info("%s is not JSON; prefetch orders shards by name", file.path)
        result.files += 1
        result.bytes += length
        await pin(file, length, room)

    try:
        async with trio.open_nursery() as nursery:
            for file, what in chosen:
                nursery.start_soon(one, file, what)
    except Exception as exc:  # a fetch that gave up: reads fetch on demand
        result.state, result.error = "failed", str(exc)
        log.warning("metadata not read ahead: %s", exc)
        return result
    result.indexes.sort()
    result.seconds = time.monotonic() - started
    result.state = "failed" if result.error else "ready"
    log.info("metadata ready: %d files, %d bytes in %.2f s (%d bytes pinned in memory)", result.files, result.bytes,
             result.seconds, room.pinned)
    return result


@dataclass
class Room:
    """Bytes the pass may still pin (or parse), shared by its files: each block is counted when
    it is pinned, after the wait for its bytes (a room read before that wait let every file of
    a mount, running at once, pin up to the whole bound: ten 100 MB headers pinned 1 GB)."""

    left: int
    pinned: int = 0

    def take(self, n: int) -> bool:
        if n > self.left:
            return False
        self.left -= n
        self.pinned += n
        return True


async def pin(file: MetadataFile, length: int, room: Room) -> int:
    """Keep the blocks holding the first ``length`` bytes of ``file`` in memory (within
    ``room``); the bytes pinned."""
    reader = file.reader
    block_size = reader.blob.entry.block_size
    first, last = file.offset // block_size, (file.offset + max(length, 1) - 1) // block_size
    done = 0
    recent = reader.ctx.recent
    for index in range(first, last + 1):
        if recent.pinned(reader.digest, index):  # another file's (a tar's small files share blocks)
            continue
        if reader.block_length(index) > room.left or not reader.servable(index):
            break
        parts = await reader.blocks(index, index)
        if parts is not None and recent.pinned(reader.digest, index):  # by another file meanwhile
            continue
        if parts is None or not room.take(reader.block_length(index)):
            break
        recent.pin(reader.digest, index, parts[0])
        done += reader.block_length(index)
    return done
