"""Cached blocks read back from disk, once (doc/ARCHITECTURE.md, "One read, traced"): on
worker threads where the machine has a core to spare for them, else on the serving loop.

Every block read back is checked against its stored checksum (:meth:`~modelfs.storage.entry.
BlobEntry.read_block`: a ``pread``, xxh3, lz4 for compressible blobs) and kept in the memory
window. On workers (``threads``), the blocks of one read (an 8 MiB ``pread`` spans 8-9 blocks)
or of a read-ahead go in one thread call, and the loop only looks blocks up in memory; that
pays where cores are spare. With none to spare (2 cores: the loop and the loader's copy),
each hand-off cost more than the read it moved (:func:`~.policy.readback_threads`), and the
loop reads back itself, one read at a time, so a block is never read twice either.

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

# Blocks one thread call reads back ahead of a reader: enough that the call costs little beside
# the reads (a thread hand-off is about 0.1 ms here, a cached block read back 0.2-0.3 ms), few
# enough that the first of them is not kept waiting on the last.
READBACK_CHUNK = 4

Result = Block | CacheError


def readback_limiter(threads: int) -> trio.CapacityLimiter | None:
    """The mount's read-back threads (``threads`` at once); None: read back on the loop."""
    return trio.CapacityLimiter(threads) if threads > 0 else None


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

    def __init__(self, entry: StoredBlob, threads: trio.CapacityLimiter | None, stats: Stats,
                 drops: Callable[[], int]) -> None:
        self.entry, self.threads, self.stats, self._drops = entry, threads, stats, drops
        self._flights: dict[int, _Flight] = {}

    @property
    def on_loop(self) -> bool:
        """No thread to spare: blocks are read back on the loop, when a read needs them."""
        return self.threads is None

    def reading(self, index: int) -> bool:
        return index in self._flights

    async def read(self, blocks: list[int]) -> dict[int, Result]:
        """The blocks of ``blocks``, each read back and checked, or the error it met. A block
        another read is already reading back is waited for, not read again; a block missing
        from the answer was not read (its read-back crossed a drop, or began before one this
        read came after): look again."""
        if self.threads is None:  # on the loop: nothing runs meanwhile, no flight to join or drop to cross
            return self._counted(self._read(blocks))
        drops = self._drops()
        theirs = {id(flight): flight for index in blocks if (flight := self._flights.get(index)) is not None}
        mine = [index for index in blocks if index not in self._flights]
        flight = _Flight(drops)
        for index in mine:
            self._flights[index] = flight
        try:
            if mine:
                flight.results = self._counted(await trio.to_thread.run_sync(self._read, mine, limiter=self.threads))
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

    def _counted(self, results: dict[int, Result]) -> dict[int, Result]:
        read = [data for data in results.values() if not isinstance(data, CacheError)]
        self.stats.blocks_read_back += len(read)
        self.stats.bytes_read_back += sum(len(data) for data in read)
        return results

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
