"""The blob entry over a store that is not the disk (modelfs/storage/memory.py and the
BlobStore interface in store.py): the no-disk case as a store of its own, and the entry's
checks over a store kept in a dict. Pure: no files, milliseconds."""

from __future__ import annotations

import hashlib
import os

import pytest

from modelfs.errors import CacheError
from modelfs.storage.entry import BlobEntry, VolatileEntry
from modelfs.storage.mapformat import (
    ABSENT,
    INDEXED,
    PRESENT,
    WHOLE,
    BlockMap,
    Buffer,
    Entry,
    Header,
    checksum,
    encode_block,
)
from modelfs.storage.memory import NoDisk
from modelfs.storage.store import BlobPaths, BlockDamaged, Files
from modelfs.storage.window import BlockWindow

MiB = 1 << 20


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_blob_with_no_disk_stores_nothing_and_says_why():
    window = BlockWindow()
    block = os.urandom(MiB)
    entry = BlobEntry(NoDisk(_digest(block * 2), 2 * MiB, MiB, "No space left on device"), window)
    with pytest.raises(CacheError, match="the cache cannot store sha256:.*: No space left on device"):
        entry.write_block(0, block, hashlib.sha256(block).digest())
    for read in (entry.read_block, entry.read_checked):
        with pytest.raises(CacheError, match="block 1 of sha256:.* is not cached"):
            read(1)
    assert not entry.has(0) and not entry.trusted(0, hashlib.sha256(block).digest())
    assert not entry.complete and not entry.complete_here and not entry.verified
    assert entry.cached_bytes() == entry.stored_bytes() == 0
    assert not entry.is_open and entry.release() and entry.files_id() == (0, 0)
    entry.reload()
    assert window.stats().held_blocks == 0 and window.stats().misses == 0


def test_no_disk_records_no_trust_and_drops_nothing():
    block = os.urandom(MiB)
    entry = BlobEntry(NoDisk(_digest(block), MiB, MiB, "read-only file system"), BlockWindow())
    entry.adopt(0, hashlib.sha256(block).digest(), checksum(block))
    assert not entry.mark_whole({0: checksum(block)}) and not entry.trusted(0, hashlib.sha256(block).digest())
    with pytest.raises(CacheError):
        entry.verify()  # nothing to hash: the reader checks such a blob as it arrives, or refuses it
    entry.forget(0)
    entry.clear()
    assert entry.scrub() == 0
    empty = BlobEntry(NoDisk(_digest(b""), 0, MiB, "full"), BlockWindow())
    assert empty.complete and empty.verified and not empty.mark_whole({})  # an empty blob is never "stored whole"


def test_the_volatile_entry_is_an_entry_over_no_disk():
    entry = VolatileEntry("sha256:" + "ab" * 32, 3 * MiB, MiB, "cannot open cache files", BlockWindow())
    assert isinstance(entry.store, NoDisk) and entry.reason == "cannot open cache files"
    assert entry.nblocks == 3 and entry.block_length(2) == MiB
    assert entry.stats().cached_bytes == 0 and not entry.stats().complete


class DictStore:
    """The BlobStore interface over a dict: what a store must do for the entry, and no more."""

    def __init__(self, digest: str, size: int, block_size: int) -> None:
        self.digest, self.paths = digest, BlobPaths.under("/nonexistent", digest)
        self.map = BlockMap(Header.of(size, block_size))
        self.stored: dict[int, bytes] = {}
        self.files: Files = (1, 1)
        self.is_open = True

    def files_id(self) -> Files:
        return self.files

    def refresh(self) -> None:
        return None

    def replaced(self) -> bool:
        return False

    def read_entry(self, index: int) -> Entry:
        return self.map.get(index)

    def reload(self) -> None:
        return None

    def read(self, index: int) -> tuple[bytes, Entry, Files]:
        return self.stored[index], self.map.get(index), self.files

    def write(self, index: int, data: Buffer, index_hash: bytes | None) -> int | None:
        encoded = encode_block(data, self.map.policy)
        self.map.policy, self.stored[index] = encoded.policy, bytes(encoded.payload)
        flags = PRESENT | encoded.flags | (INDEXED if index_hash else 0)
        self.map.set(index, Entry(len(encoded.payload), flags, checksum(encoded.payload), index_hash or bytes(32)).encode())
        return checksum(encoded.payload)

    def forget(self, index: int) -> None:
        self.map.set(index, ABSENT.encode())

    def upgrade(self, checks: dict[int, int], flag: int, index_hash: bytes | None = None) -> int:
        found = [(i, self.map.get(i)) for i, check in checks.items() if self.map.get(i).check == check]
        for index, entry in found:
            self.map.set(index, Entry(entry.length, entry.flags | flag, entry.check, index_hash or entry.index_hash).encode())
        return len(found)

    def mark_whole(self, checks: dict[int, int]) -> bool:
        return self.upgrade(checks, WHOLE) == self.map.nblocks

    def clear(self) -> None:
        self.map.load(self.map.policy)
        self.files = (self.files[0] + 1, self.files[1] + 1)

    def release(self) -> bool:
        return True

    def close(self) -> None:
        return None


def test_the_entry_checks_what_any_store_gives_back():
    """Trust, checksums, lz4 and the window live in the entry: the same over any store."""
    text = (b"vocabulary " * 100000)[:MiB]
    noise = os.urandom(MiB // 2)
    store = DictStore(_digest(text + noise), MiB + MiB // 2, MiB)
    window = BlockWindow()
    entry = BlobEntry(store, window)
    entry.write_block(0, text, hashlib.sha256(text).digest())
    entry.write_block(1, noise)
    assert entry.trusted(0, hashlib.sha256(text).digest()) and not entry.trusted(1, None)
    assert entry.read_block(0) == text and entry.read_block(0) == text and window.stats().hits == 1
    assert entry.stored_bytes() < MiB // 10 + MiB // 2  # lz4 for the text block, decided by it
    assert entry.verify() and entry.verified and entry.trusted(1, None)
    store.stored[1] = bytes([store.stored[1][0] ^ 1]) + store.stored[1][1:]  # damage at rest
    with pytest.raises(BlockDamaged):
        entry.read_checked(1)
    assert entry.scrub() == 1 and not entry.has(1) and entry.has(0)
    entry.clear()
    assert not entry.has(0) and window.stats().held_blocks == 0
