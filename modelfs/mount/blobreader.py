"""Waiting for blocks and serving them: one :class:`BlobReader` per blob (or per file of a
compressed layer), on the trio loop that answers FUSE.

What a reader may see is decided per blob, once, by what vouches for its bytes: its
:class:`~.trust.Trust` (README, "Integrity"), which every path consults:

- **index mode** (a block index the mount trusts): each block is matched against the index
  before it is served or cached, whatever ``--verify`` says; a block already cached but not
  matched under this index (stored by a lazy mount, a killed pull) is hashed from disk and
  adopted, or dropped.
- **whole mode** (no trusted index, the default): the blob is read once, in order, hashed
  whole, and no byte of it is served until the hash matches its digest. Readers wait for
  that (their deadline moves with the pass's progress).
- **lazy** (``--verify lazy``, opt-in, only for blobs without a trusted index): served
  unverified, then checked whole once complete.

A reader is put together from small parts, each one concept:

- :class:`~.blob.HeldBlob`: the cache entry, the trust, the blocks in memory, the one drop path;
- :class:`~.flights.BlockFlights`: the single flight per block, and how readers wait on it;
- :class:`~.passes.WholePasses`: passes over the whole blob, and how readers wait on them;
- :class:`~.wholecheck.WholeCheck`: the whole-blob check once complete;
- :class:`~.readersink.BlobFeed` (``reader.sink``): the side its source feeds, through the
  declared :class:`~.sink.ReaderSink`. Where blocks come from is not the reader's business.

Every block read back from the cache is checked against its stored checksum (:mod:`.cache`);
one that fails is dropped and fetched again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

from ..errors import CacheError, FetchError
from ..retry import PASS_WAIT_ROUNDS, SERVE_ROUNDS, SETTLE_ROUNDS
from ..storage.store import BlockDamaged
from .blob import HeldBlob, OfBlob
from .context import FetchContext
from .flights import BlockFlights
from .passes import WholePasses
from .readahead import Streams
from .readback import READBACK_CHUNK, ReadBacks
from .readersink import BlobFeed
from .sink import BlockSource, StoredBlob
from .trust import Block, Mode, Trust
from .wholecheck import WholeCheck

log = logging.getLogger(__name__)

# Cached blocks read back ahead of sequential streams into the memory window, for all streams
# of a blob together (a strict budget, shared with every stream seen). Small: the window is
# 64 MiB for the process, and a block read ahead but pushed out before its read comes is read
# twice. Measured here (tests/test_serving.py, 16 threads of 8 MiB preads over a 128 MiB file):
# a budget of 32 read the file back 1.15-1.31 times, 8 1.00-1.05 times; one sequential reader
# gets its next 8 blocks read back on workers while it is served.
CACHED_AHEAD = 8


class BlobReader(OfBlob):
    def __init__(self, ctx: FetchContext, entry: StoredBlob, source: BlockSource, trust: Trust) -> None:
        self.ctx, self.source = ctx, source
        self.blob = HeldBlob(ctx, entry, trust)
        self.flights = BlockFlights(entry.digest, ctx.stats)
        self.passes = WholePasses(entry.digest)
        self.check = WholeCheck(self.blob, self.passes, source.checks_whole)
        self.readahead = Streams(entry.block_size, entry.nblocks, ctx.policy.readahead_max)
        self.sink = BlobFeed(self.blob, self.flights, self.passes, self.check, self.readahead.expects)
        self.readbacks = ReadBacks(entry, ctx.readback_threads, ctx.stats, lambda: self.blob.drops)
        self.readback_ahead = Streams(entry.block_size, entry.nblocks, CACHED_AHEAD, min_blocks=0, share_with_idle=True)


    @property
    def expected(self) -> list[bytes] | None:
        """Hash per block, from the block index this reader trusts (None: no index)."""
        return self.blob.trust.expected

    @property
    def whole_mode(self) -> bool:
        """No trusted index and not lazy: bytes are served only once the blob checked whole."""
        return self.blob.trust.mode is Mode.WHOLE

    @property
    def busy(self) -> bool:
        return self.flights.busy or self.passes.running or self.check.running

    def servable(self, index: int) -> bool:
        return self.sink.servable(index)

    # -- reading --------------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of the blob."""
        data = await self.read_view(offset, size)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_view(self, offset: int, size: int) -> Block | memoryview:
        """Like :meth:`read`, for the FUSE layer: the block itself, or a view of it when the
        read lies in one block (the usual case), so the serving thread copies nothing."""
        size = min(size, self.size - offset)
        if size <= 0 or offset < 0:
            return b""
        bs = self.blob.entry.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        self.ctx.gate.reading(self.digest, first)  # prefetch follows what processes read
        self.readahead.max_blocks = self.ctx.sizer.window_blocks
        ahead = self.readahead.after_read(offset, size)
        if ahead and not self.whole_mode:
            # the read's own missing blocks in the same call: one request covers the read and
            # what lies ahead of it, not one for each (a stream's first reads ask for both)
            wanted = [*range(first, last + 1), *ahead]
            self.source.schedule(self.sink, [i for i in wanted if not self.servable(i)])
        self._read_back_ahead(offset, size)
        # A block held only in memory (full disk) may be dropped before we read it, and a cached
        # block may not read back (damaged, cut short): either way it is fetched again.
        for _ in range(SERVE_ROUNDS):
            missing = [i for i in range(first, last + 1) if not self.servable(i)]
            if missing:
                await self.ensure(missing, foreground=True)
                continue
            parts = await self.blocks(first, last)
            if parts is not None:
                break
        else:
            raise FetchError(f"blocks {first}-{last} of {self.digest} could not be kept long enough to serve them")
        start = offset - first * bs
        self.blob.served = True
        if len(parts) == 1:
            block = parts[0]
            return block if start == 0 and size == len(block) else memoryview(block)[start:start + size]
        # a read across blocks (tensor data starts at 8 + header length, so most do)
        return joined(parts, start, size)

    async def blocks(self, first: int, last: int) -> list[Block] | None:
        """Blocks ``first``-``last``, servable: from memory on the loop, the rest read back
        from the cache and checked on a worker (one thread call for all of them); None if
        one did not read back (damaged: dropped; gone meanwhile), so the caller looks again."""
        # Each block held in memory is taken as a view of this read's own: the read may wait
        # below for the others, and meanwhile RecentBlocks may recycle its buffer, releasing
        # the view it held (a released view is an error, never other bytes: a buffer is reused
        # only once no view of it is alive, which this one prevents until the read is served).
        parts = {index: _own(self.blob.held(index)) for index in range(first, last + 1)}
        wanted = [index for index, data in parts.items() if data is None]
        if wanted:
            if not self.readbacks.on_loop:
                self.ctx.stats.read_back_waits += 1
            got = await self.readbacks.read(wanted)
            for index in wanted:
                data = got.get(index)
                if isinstance(data, BlockDamaged):
                    self.blob.damaged(index, data)
                    return None
                if data is None or isinstance(data, CacheError):  # gone meanwhile, or read across a drop
                    return None
                parts[index] = data
        return [data for data in parts.values() if data is not None]

    def _read_back_ahead(self, offset: int, size: int) -> None:
        """A sequential stream over cached blocks (a reader's own, or prefetch's): read the
        next ones back into the memory window on workers now, in batches, so the stream's
        next reads are lookups. Its own read-ahead (:class:`~.readahead.Streams`), bounded by
        the window (``CACHED_AHEAD``) rather than by the request slots."""
        if self.readbacks.on_loop:  # reading ahead on the loop would only delay this read
            return
        ahead = self.readback_ahead.after_read(offset, size)
        blocks = [i for i in ahead if not self.readbacks.reading(i) and self._wanted_ahead(i)]
        for chunk in range(0, len(blocks), READBACK_CHUNK):
            self.ctx.spawn(self.readbacks.ahead, blocks[chunk:chunk + READBACK_CHUNK], self._wanted_ahead)

    def _wanted_ahead(self, index: int) -> bool:
        """Worth reading back ahead: servable, and not in memory yet."""
        return self.servable(index) and self.blob.held(index) is None

    def drop(self, blocks: Iterable[int] | None = None, evicted: bool = False) -> None:
        """Bytes of this blob leave, by the one path (:meth:`~.blob.HeldBlob.drop`)."""
        self.blob.drop(blocks, evicted)

    # -- waiting --------------------------------------------------------------------------

    async def ensure(self, blocks: list[int], foreground: bool = True) -> None:
        """Make ``blocks`` servable, fetching what is missing."""
        if self.whole_mode:
            await self.passes.wait(lambda: all(self.servable(i) for i in blocks),
                                   lambda: self.source.schedule(self.sink, blocks),
                                   self.ctx.read_deadline, PASS_WAIT_ROUNDS)
        else:
            self.source.schedule(self.sink, blocks, foreground)
            await self.flights.wait(blocks, self.servable, foreground, self.ctx.read_deadline)

    # -- checking a complete blob ---------------------------------------------------------

    async def verified(self) -> bool:
        """Whether the blob is complete and vouched for, waiting for a check under way."""
        return await self.check.verified()

    async def settle(self, read_back: Iterable[int] = ()) -> bool:
        """For ``pull``: read every cached block back (dropping damaged ones), fetch what is
        missing, and check the blob; True once every block is on disk and vouched for.
        ``read_back``: blocks already read back by :meth:`read_back` as their runs landed
        (the first round skips them)."""
        skip = set(read_back)
        for _ in range(SETTLE_ROUNDS):
            await self.read_back(i for i in range(self.nblocks) if i not in skip)
            skip = set()
            missing = [i for i in range(self.nblocks) if not self.servable(i)]
            if missing:
                await self.ensure(missing, foreground=False)
            if self.blob.entry.complete and await self.verified():
                return True
        return False

    async def read_back(self, blocks: Iterable[int]) -> None:
        """Read ``blocks`` back from the cache against their checksums, on a worker thread,
        and drop those that fail (``pull`` does it as each run lands, beside the next ones:
        at the end, a 2 GiB model's read-back was time the link stood idle)."""
        which = list(blocks)
        for index, exc in await trio.to_thread.run_sync(self._read_back, which):
            self.blob.damaged(index, exc)

    def _read_back(self, blocks: list[int]) -> list[tuple[int, BlockDamaged]]:
        """Cached ``blocks`` read back from disk against their checksum (on a worker thread):
        those that fail, for :meth:`~.blob.HeldBlob.damaged` to drop on the loop. From disk
        (``read_checked``), never the memory window: the point is what rests on disk, and a
        scan of the whole model through the window only churns it (``pull`` took 1.30 s per GiB
        that way, 1.19 s without, in one run each of ``python -m benchmarks``)."""
        entry = self.blob.entry
        failed = []
        for index in blocks:
            if entry.has(index):
                try:
                    entry.read_checked(index)
                except BlockDamaged as exc:
                    failed.append((index, exc))
                except CacheError:
                    continue  # gone meanwhile
        return failed

    def cached_bytes(self) -> int:
        """Bytes on disk (cheap: status asks every second)."""
        return self.blob.entry.cached_bytes()

    def cached_fraction(self) -> float:
        """Held locally: on disk, or checked in memory."""
        return self.blob.cached_fraction()


def joined(parts: list[Block], start: int, size: int) -> bytes:
    """``size`` bytes from ``start`` of consecutive blocks ``parts``: one copy of the bytes
    asked for, not a join of whole blocks and a slice of that."""
    end, pieces = start + size, []
    for block in parts:
        if start < len(block) and end > 0:
            pieces.append(memoryview(block)[max(0, start):min(len(block), end)])
        start, end = start - len(block), end - len(block)
    return b"".join(pieces)


def _own(data: Block | None) -> Block | None:
    """A view of ``data``'s buffer that only its taker releases."""
    return memoryview(data) if isinstance(data, memoryview) else data
