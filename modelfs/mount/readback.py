"""Cached blocks read back from disk on worker threads, once (doc/ARCHITECTURE.md, "One read,
traced"): the serving loop only looks blocks up in memory.

Every block read back is checked against its stored checksum (:meth:`~modelfs.storage.entry.
BlobEntry.read_block`: a ``pread``, xxh3, lz4 for compressible blobs) and kept in the memory
window, on the worker. Done on the loop, it was 99.9% of a warm mount's CPU on one thread
and the reads of 16 loader threads queued behind one another; the blocks of one read (an
8 MiB ``pread`` spans 8-9 blocks) or of a read-ahead go in one thread call.

Single flight per block: a read that needs a block another read is reading back waits for
that read-back, so two reads of one block (a 1 MiB read at 8 + header length spans two
blocks, and its neighbour reads the second one a moment later) cost one disk read.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..errors import CacheError
from .sink import StoredBlob
from .stats import Stats
from .trust import Block

# Threads reading cached blocks back at once, for the whole mount: a read-back is a pread and
# a checksum (both release the GIL), and a disk (an SSD, a virtual disk) answers more preads at
# once faster: 1 MiB preads of a cold file here went 1.7 GiB/s on 1 thread, 3.5 on 4, 6.4 on 8.
# With 4, a cached mount read by 16 threads (benchmarks.ready, runai) waited on read-back: p90
# read 12.8-13.7 ms, 1289-1378 MB/s; with 8, 7.6-7.9 ms, 1488-1581 MB/s (two runs each, the
# same machine; vLLM's one stream unchanged, 1334-1434 MB/s).
READBACK_THREADS = 8

# Blocks one thread call reads back ahead of a reader: enough that the call costs little beside
# the reads (a thread hand-off is about 0.1 ms here, a cached block read back 0.2-0.3 ms), few
# enough that the first of them is not kept waiting on the last.
READBACK_CHUNK = 4

Result = Block | CacheError


class _Flight:
    """One thread call reading some blocks back; its results, once ``done``."""

    def __init__(self, drops: int) -> None:
        self.done = trio.Event()
        self.results: dict[int, Result] = {}
        self.drops = drops  # the blob's drop count when its read began


class ReadBacks:
    """The read-backs of one blob's cached blocks under way (on the loop), and the worker side
    that does them. ``drops``: how many times the blob's bytes were dropped so far; bytes read
    back across a drop are not served (the drop may have invalidated the kernel's pages of
    them meanwhile), the reader looks again."""

    def __init__(self, entry: StoredBlob, threads: trio.CapacityLimiter, stats: Stats,
                 drops: Callable[[], int]) -> None:
        self.entry, self.threads, self.stats, self._drops = entry, threads, stats, drops
        self._flights: dict[int, _Flight] = {}

    def reading(self, index: int) -> bool:
        return index in self._flights

    async def read(self, blocks: list[int]) -> dict[int, Result]:
        """The blocks of ``blocks``, each read back and checked, or the error it met. A block
        another read is already reading back is waited for, not read again; a block missing
        from the answer was not read (its read-back crossed a drop, or began before one this
        read came after): look again."""
        drops = self._drops()
        theirs = {id(flight): flight for index in blocks if (flight := self._flights.get(index)) is not None}
        mine = [index for index in blocks if index not in self._flights]
        flight = _Flight(drops)
        for index in mine:
            self._flights[index] = flight
        try:
            if mine:
                flight.results = await trio.to_thread.run_sync(self._read, mine, limiter=self.threads)
                read = [data for data in flight.results.values() if not isinstance(data, CacheError)]
                self.stats.blocks_read_back += len(read)
                self.stats.bytes_read_back += sum(len(data) for data in read)
        finally:
            for index in mine:
                if self._flights.get(index) is flight:
                    del self._flights[index]
            flight.done.set()
        results = dict(flight.results)
        for other in theirs.values():
            await other.done.wait()
            if other.drops == drops:  # one begun before a drop this read came after read the old bytes
                results.update((index, other.results[index]) for index in blocks if index in other.results)
        return results if self._drops() == drops else {}

    async def ahead(self, blocks: list[int], wanted: Callable[[int], bool]) -> None:
        """Read ``blocks`` back into the memory window ahead of the reader (the read-ahead of a
        sequential stream over cached blocks): its next read is a lookup. Only those still
        ``wanted`` when this task runs (a read may have read one back meanwhile). A block
        that does not read back is left for the read that wants it (which drops it)."""
        blocks = [index for index in blocks if index not in self._flights and wanted(index)]
        if blocks:
            await self.read(blocks)

    def _read(self, blocks: list[int]) -> dict[int, Result]:
        """On a worker thread: each block read back, checked and kept in the window."""
        results: dict[int, Result] = {}
        for index in blocks:
            try:
                data = self.entry.read_block(index)
            except CacheError as exc:  # damaged (BlockDamaged), or gone meanwhile
                results[index] = exc
                continue
            results[index] = data
        return results
