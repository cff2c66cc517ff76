"""The map of one cached blob: its bytes on disk, and the copy of its entries in memory.

Pure: nothing here opens a file. A blob's blocks rest in a sparse ``.data`` file (block ``i``
at offset ``i * block_size``); its ``.map`` file says which are there and how to check them::

    header   64 bytes: magic "MFSMAP02", block size (u32), blob size (u64), block count (u32),
             lz4 policy (u32), little-endian, zero-padded
    entries  48 bytes per block: stored length (u32), flags (u32), xxh3-64 of the stored
             bytes (u64), the block's index hash (32 bytes; zero unless INDEXED)

The flags, and what a mount makes of them (:mod:`.entry` decides trust, block by block):

- ``PRESENT``: the block is stored; its bytes are served only once they pass the checksum.
- ``LZ4``: stored lz4-compressed (the checksum is of the compressed bytes).
- ``INDEXED``: its index hash was computed on arrival and is kept in the entry; trusted only
  by a mount whose own trusted block index has the same hash for that block.
- ``WHOLE``: it was part of the blob when the blob's sha256 matched the digest.

**The lz4 policy** is decided once per blob, from its first block written (weights do not
compress, tokenizers do), so incompressible data never pays: lz4 if that block shrinks below
85% of its size, raw otherwise; until then every block is tried. A block lz4 does not shrink
at all is stored raw whatever the policy.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import xxhash

MAGIC = b"MFSMAP02"
HEADER = struct.Struct("<8sIQII")  # magic, block_size, blob_size, nblocks, lz4 policy
HEADER_SIZE = 64
ENTRY = struct.Struct("<IIQ32s")  # stored length, flags, xxh3-64 of the stored bytes, index hash
PRESENT, LZ4, INDEXED, WHOLE = 1, 2, 4, 8
POLICY_UNDECIDED, POLICY_LZ4, POLICY_RAW = 0, 1, 2
LZ4_WORTH_IT = 0.85
EMPTY_ENTRY = bytes(ENTRY.size)

Buffer = bytes | bytearray | memoryview


def checksum(data: Buffer) -> int:
    """What each stored block is checked against when read back: xxh3-64 (0.02 s/GiB here,
    against 0.5 s for zlib's crc32), guarding against bit rot and torn writes, not attackers."""
    return xxhash.xxh3_64_intdigest(data)


def entry_offset(index: int) -> int:
    """Where block ``index``'s entry sits in the map file."""
    return HEADER_SIZE + index * ENTRY.size


@dataclass(frozen=True)
class Header:
    block_size: int
    size: int  # the blob's, in bytes
    nblocks: int
    policy: int = POLICY_UNDECIDED

    @classmethod
    def of(cls, size: int, block_size: int, policy: int = POLICY_UNDECIDED) -> Header:
        return cls(block_size, size, -(-size // block_size), policy)

    def encode(self) -> bytes:
        return HEADER.pack(MAGIC, self.block_size, self.size, self.nblocks, self.policy).ljust(HEADER_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> Header | None:
        """The header at the start of ``raw``; None if it is not one of this format."""
        if len(raw) < HEADER.size:
            return None
        magic, block_size, size, nblocks, policy = HEADER.unpack_from(raw)
        return cls(block_size, size, nblocks, policy) if magic == MAGIC else None

    def same_blob(self, other: Header) -> bool:
        """Whether ``other`` describes the same blob cut the same way (policies aside)."""
        return (self.block_size, self.size, self.nblocks) == (other.block_size, other.size, other.nblocks)

    @property
    def map_size(self) -> int:
        return HEADER_SIZE + self.nblocks * ENTRY.size

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)


@dataclass(frozen=True)
class Entry:
    length: int  # stored, compressed or not
    flags: int
    check: int  # xxh3-64 of the stored bytes
    index_hash: bytes

    @property
    def present(self) -> bool:
        return bool(self.flags & PRESENT)

    @property
    def checked(self) -> bool:
        """Present and checked: whole with its blob, or against a block index."""
        return self.present and bool(self.flags & (WHOLE | INDEXED))

    def encode(self) -> bytes:
        return ENTRY.pack(self.length, self.flags, self.check, self.index_hash)

    @classmethod
    def decode(cls, raw: Buffer, at: int = 0) -> Entry:
        return cls(*ENTRY.unpack_from(raw, at))


ABSENT = Entry(0, 0, 0, bytes(32))


def usage(header: Header, raw: bytes) -> tuple[int, bool]:
    """(bytes cached, every block checked: whole or against a block index) from a map's
    entries as read from its file (``raw``, possibly short). For ``cache stats``."""
    entries = [Entry.decode(raw, i * ENTRY.size) for i in range(len(raw) // ENTRY.size)]
    cached = sum(min(header.block_size, header.size - i * header.block_size)
                 for i, e in enumerate(entries) if e.present)
    return cached, len(entries) == header.nblocks and all(e.checked for e in entries)


# -- the lz4 policy ------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    payload: Buffer  # what is stored
    flags: int  # LZ4 or 0
    policy: int  # the blob's policy from now on (decided by its first block)


def encode_block(data: Buffer, policy: int) -> Encoded:
    """How a block is stored under the blob's lz4 policy (see the module docstring)."""
    if policy == POLICY_RAW:
        return Encoded(data, 0, policy)
    packed = lz4.block.compress(data, store_size=False)
    if policy == POLICY_UNDECIDED:
        policy = POLICY_LZ4 if len(packed) < LZ4_WORTH_IT * len(data) else POLICY_RAW
    if len(packed) < len(data):
        return Encoded(packed, LZ4, policy)
    return Encoded(data, 0, policy)


class Undecodable(ValueError):
    """Stored bytes that passed their checksum but do not decompress."""


def decode_block(stored: bytes, flags: int, length: int) -> bytes:
    """The block's bytes from what was stored (``length``: the block's, uncompressed)."""
    if not flags & LZ4:
        return stored
    try:
        return lz4.block.decompress(stored, uncompressed_size=length)
    except lz4.block.LZ4BlockError:
        raise Undecodable("does not decompress") from None


# -- the copy in memory ------------------------------------------------------------------------


class BlockMap:
    """The map's entries as this process last read them, and the blob's lz4 policy. Entries
    are refreshed on the event loop while a worker thread stores one: a lock of its own keeps
    the count of present blocks exact."""

    def __init__(self, header: Header) -> None:
        self.block_size, self.size, self.nblocks = header.block_size, header.size, header.nblocks
        self.policy = POLICY_UNDECIDED
        self._lock = threading.Lock()
        self._raw = bytearray(self.nblocks * ENTRY.size)
        self.present = 0  # entries with PRESENT
        self._scan_from = 0  # blocks before this are known present (see ``complete``)

    def header(self) -> Header:
        return Header(self.block_size, self.size, self.nblocks, self.policy)

    def load(self, policy: int, raw: bytes = b"") -> None:
        """Take every entry (``raw``, possibly short: the rest absent) and the policy."""
        entries = bytearray(raw[:self.nblocks * ENTRY.size].ljust(self.nblocks * ENTRY.size, b"\0"))
        with self._lock:
            self.policy = policy
            self._raw = entries
            self.present = sum(1 for i in range(self.nblocks) if entries[i * ENTRY.size + 4] & PRESENT)
            self._scan_from = 0

    def entries(self) -> bytes:
        return bytes(self._raw)

    def get(self, index: int) -> Entry:
        return Entry.decode(self._raw, index * ENTRY.size)

    def set(self, index: int, raw: bytes) -> None:
        """Take one entry as read or written (``raw``: its 48 bytes)."""
        at = index * ENTRY.size
        with self._lock:
            was = bool(self._raw[at + 4] & PRESENT)
            now = bool(raw[4] & PRESENT)
            self._raw[at:at + ENTRY.size] = raw
            self.present += now - was
            if was and not now:
                self._scan_from = min(self._scan_from, index)

    def complete(self, has: Callable[[int], bool]) -> bool:
        """Every block present: the count says so, or ``has`` (which may look at the disk,
        for blocks another process stored) finds the rest, scanning on from the first block
        not known present, so each call costs little."""
        if self.present >= self.nblocks:
            return True
        while self._scan_from < self.nblocks and has(self._scan_from):
            self._scan_from += 1
        return self._scan_from >= self.nblocks

    def cached_bytes(self) -> int:
        """Bytes present, from the count (cheap: status asks every second)."""
        if not self.present:
            return 0
        last = self.nblocks - 1
        short = self.block_size - min(self.block_size, self.size - last * self.block_size) if self.get(last).present else 0
        return self.present * self.block_size - short

    def stored_bytes(self) -> int:
        return sum(self.get(i).length for i in range(self.nblocks))
