"""Blocks read back from the cache and checked, kept in memory for the next small read.

Every block read back from the cache is checked against its stored checksum (a 1 MiB
``pread``, xxh3, and lz4 for compressible blobs) before anyone sees it. Without a copy kept,
every small read paid that again: indexing a tar layer reads one 512-byte header (or three,
with PAX records) per member, and each read cost a whole block read back, decompressed and
checked: a layer of 100,000 small files took 148-240 s to mount; 4 KiB random reads and lazily
loaded tensors paid the same per page. (lz4 of a 1 MiB text block alone costs 0.17-0.27 ms
here; a raw block 0.04 ms read and checked from the page cache.)

The window keeps the checked copy. What it may hold, and for how long, is the cache's trust
chain applied to memory (doc/INTEGRITY.md):

- only bytes that passed their checksum on the way in (the caller puts nothing else);
- each copy under the **version** it was read as: the blob's files (their inode pair) and the
  block's stored length and checksum. A lookup names the version the caller sees now, so a
  block rewritten with another checksum, or files replaced by another process (a clear after
  a digest mismatch, an eviction), never match an older copy;
- a copy whose version was last confirmed more than ``max_age`` ago is not served until the
  caller confirms it against the map on disk (:meth:`confirm`): another process's change is
  noticed within the same bound as reads of the old files (``RECHECK_SECONDS``);
- dropped with its block (``forget``), its blob (clear, evict, files replaced), and the least
  recently used first past one byte bound for the whole process.

The bytes are held, never copied: a hit returns the very object the read-back produced (the
reader slices a ``memoryview`` of it).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

# One bound for the whole process, 64 MiB: 64 blocks. Measured here (benchmarks/smallreads.py,
# 2,000 random 4 KiB reads, page caches dropped): within one 32 MiB tensor (rows of an embedding
# table read at random by a lazily loading runtime) the daemon read back 827 KiB from the cache
# per 4 KiB served with a 4 MiB window, 484 KiB with 16 MiB, 16 KiB with 64 MiB (each block
# once), 0.30 -> 0.09 s; over a whole 256 MiB file it reads back window/file less (999, 946,
# 768, 536 KiB at 4, 16, 64, 128 MiB) while the daemon's peak RSS grows with the bound (46, 58,
# 109, 176 MB; its target is 250 MB, beside up to 128 just-fetched blocks of
# FetchPolicy.recent_blocks). Indexing a tar needs one block at a time (headers are read in
# order): 100,000 members mount as fast with 4 MiB as with 256 MiB.
DEFAULT_WINDOW_BYTES = 64 << 20
# What a held copy costs beyond its bytes (the entry, its key, the LRU links): a blob of tiny
# blocks must not fill the process with bookkeeping the byte bound does not see.
OVERHEAD_BYTES = 256


@dataclass
class Held:
    data: bytes
    version: Hashable
    confirmed_at: float  # monotonic: when its version was last seen in the map on disk

    @property
    def cost(self) -> int:
        return len(self.data) + OVERHEAD_BYTES


@dataclass(frozen=True)
class WindowStats:
    capacity: int
    held_bytes: int
    held_blocks: int
    hits: int
    misses: int
    evicted: int
    dropped: int


class BlockWindow:
    """Checked blocks in memory, keyed by (blob files, block index); thread-safe (blocks are
    read back on the event loop and on worker threads)."""

    def __init__(self, capacity: int = DEFAULT_WINDOW_BYTES) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._held: OrderedDict[tuple[str, int], Held] = OrderedDict()  # least recently used first
        self._by_blob: dict[str, set[int]] = {}
        self._bytes = 0
        self.hits = self.misses = self.evicted = self.dropped = 0

    def get(self, blob: str, index: int, version: Hashable) -> Held | None:
        """The copy of block ``index`` of ``blob`` held under ``version``, or None (a copy
        held under another version is dropped). The caller serves ``held.data`` at once if
        :meth:`fresh`, else only once it saw the version in the map on disk again."""
        key = (blob, index)
        with self._lock:
            held = self._held.get(key)
            if held is not None and held.version != version:
                self._remove(key)
                self.dropped += 1
                held = None
            if held is None:
                self.misses += 1
                return None
            self._held.move_to_end(key)
            self.hits += 1
            return held

    @staticmethod
    def fresh(held: Held, max_age: float) -> bool:
        return time.monotonic() - held.confirmed_at < max_age

    def confirm(self, blob: str, index: int, held: Held, version: Hashable) -> bool:
        """Whether ``held`` is still good, given the ``version`` the map on disk names just
        now: then it is served for another ``max_age``, else dropped."""
        if held.version == version:
            held.confirmed_at = time.monotonic()
            return True
        self.drop(blob, index)
        return False

    def put(self, blob: str, index: int, version: Hashable, data: bytes) -> None:
        """Keep ``data``, which passed its check as ``version`` just now."""
        held = Held(data, version, time.monotonic())
        if held.cost > self.capacity:
            return
        key = (blob, index)
        with self._lock:
            if key in self._held:
                self._remove(key)
            self._held[key] = held
            self._by_blob.setdefault(blob, set()).add(index)
            self._bytes += held.cost
            while self._bytes > self.capacity:
                self._remove(next(iter(self._held)))
                self.evicted += 1

    def drop(self, blob: str, index: int | None = None) -> None:
        """Forget block ``index`` of ``blob``, or every block of it."""
        with self._lock:
            indexes = [index] if index is not None else list(self._by_blob.get(blob, ()))
            for found in indexes:
                if (blob, found) in self._held:
                    self._remove((blob, found))
                    self.dropped += 1

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._by_blob.clear()
            self._bytes = 0

    def _remove(self, key: tuple[str, int]) -> None:
        held = self._held.pop(key)
        self._bytes -= held.cost
        indexes = self._by_blob.get(key[0])
        if indexes is not None:
            indexes.discard(key[1])
            if not indexes:
                del self._by_blob[key[0]]

    def stats(self) -> WindowStats:
        with self._lock:
            return WindowStats(self.capacity, self._bytes, len(self._held), self.hits, self.misses, self.evicted,
                               self.dropped)


_shared = BlockWindow()


def shared_window() -> BlockWindow:
    """The process's one window: every cache and blob of this process shares its bound."""
    return _shared
