"""One mount's (or one ``pull``'s) data path: how a read of a file becomes checked bytes.

The :class:`Fetcher` builds the parts once and hands each what it needs; every arrow below
points down, and nothing below imports what is above it.

A read arrives from the FUSE layer (:mod:`.fs`) at the :class:`~.blobreader.BlobReader` of
its blob, or of its file when the file lives in a compressed layer. The reader asks its
:class:`~.blob.HeldBlob` (the cache entry, the blocks held in memory, the blob's
:class:`~.trust.Trust`) whether the blocks may be served. What is missing it asks its
source for, and then it waits: per block on the :class:`~.flights.BlockFlights` (index mode
and lazy: one fetch per block, however many readers), or on the
:class:`~.passes.WholePasses` (whole mode, for a blob or a compressed layer's file:
nothing is served before it checked out whole). The read-ahead (:mod:`.readahead`, pure decisions) adds the
blocks a sequential reader will want next.

A source is one of three, each a :class:`~.sink.BlockSource`:

1.  :class:`~.rangeruns.RangeRuns` cuts the missing blocks into runs; each run is one range
    request that :class:`~.transfers.Transfers` runs on a worker thread through the
    :class:`~modelfs.registry.protocol.RangeReader` (``http.client``; the tests' fake in
    memory), at a location the :class:`~modelfs.registry.protocol.BlobLocator` gives (the
    registry client, or the client that reads through mirrors). A watchdog aborts a
    transfer that stalls.
2.  :class:`~.wholepass.WholePass` reads the blob once, in order, through the same
    transfers, hashing it whole.
3.  :class:`~.layerstream.LayerStream` streams a compressed layer once (:mod:`.stream`
    decompresses it), from the cache when it holds the layer checked, else from the
    registry, filling every file of the layer.

A source hands what it gets to the reader through its sink (``reader.sink``, the declared
:class:`~.sink.ReaderSink`): on the worker thread a block is checked against the trust,
stored in the cache (:mod:`.cache`), and only then delivered on the loop, waking its readers.
A complete blob not yet vouched for is hashed whole once (:class:`~.wholecheck.WholeCheck`).
Bytes that turn out wrong leave by one path, :meth:`~.blob.HeldBlob.drop`, which also tells
the FUSE layer to drop the kernel's pages of them.

What every part shares is a :class:`~.context.FetchContext`, built here: the policy, the
counters, the block buffers and the blocks in memory, the nursery the fetch tasks run in,
the one retry loop, what readers read (prefetch follows it: :mod:`.prefetch`), and two
hooks: bytes that failed their check (mirrors are left out a while) and bytes served that
were dropped. Every retry bound is named in :mod:`modelfs.retry`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from ..errors import FetchError
from ..formats.blockindex import ALGORITHMS, TrustedIndex
from ..formats.spec import Descriptor, Packing
from ..registry import RegistryReader
from ..registry.protocol import RangeReader
from ..registry.ranges import HttpRanges
from ..retry import ONE_ATTEMPT
from ..storage.cache import BlockCache
from ..storage.entry import BlobEntry
from .blobreader import BlobReader
from .buffers import BlockBuffers
from .context import FetchContext, ForegroundGate, Retrier
from .layerstream import LayerOrigin, LayerStream
from .policy import FetchPolicy
from .prefetch import prefetch
from .rangeruns import RangeRuns
from .rangesource import RangeSource
from .readback import readback_limiter
from .recent import RecentBlocks
from .sink import ReaderSink
from .stats import Stats
from .transfers import Transfers
from .trust import Trust
from .wholepass import WholePass

__all__ = ["BlobReader", "Fetcher", "FetchError", "FetchPolicy"]

log = logging.getLogger(__name__)


class Fetcher:
    def __init__(self, cache: BlockCache, client: RegistryReader, repository: str, nursery: trio.Nursery,
                 policy: FetchPolicy | None = None, index: TrustedIndex | None = None,
                 range_reader: RangeReader | None = None) -> None:
        self.cache, self.client, self.repository = cache, client, repository
        self.block_index = index.index if index else None
        self.policy = policy or FetchPolicy()
        self.stats = Stats()
        self.buffers = BlockBuffers(cache.block_size, keep=self.policy.recent_blocks + 64)
        self.recent = RecentBlocks(self.policy.recent_blocks, self.buffers)
        self._nursery = nursery
        # the data plane's sockets time out with the stall window: a read blocked that long is a stall
        range_reader = range_reader or HttpRanges(self.policy.stall_window, client.ca_file)
        self.ranges = Transfers(client, range_reader, repository, self.spawn, self.policy.worker_count,
                                cache.block_size, self.policy.readahead_max, stall_window=self.policy.stall_window,
                                lookup_deadline=self.policy.read_deadline, new_buffer=self.buffers.take)
        self.stats.workers = self.ranges.workers
        self.ctx = FetchContext(self.policy, self.stats, self.buffers, self.recent, self.ranges.sizer, self.spawn,
                                Retrier(self.policy, self.stats), ForegroundGate(), self.wrong_bytes, self.pages_stale,
                                index_vouched=bool(index and index.vouched),
                                readback_threads=readback_limiter(self.policy.readback_thread_count))
        self.blobs = RangeSource(RangeRuns(self.ctx, self.ranges), WholePass(self.ctx, self.ranges))
        self._readers: dict[str, BlobReader] = {}
        # told when bytes served of a blob (or of a file of a compressed layer: its derived key) were dropped
        self.on_dropped: list[Callable[[str], Awaitable[None]]] = []

    def close(self) -> None:
        """Close the kept-alive connections (once the nursery's tasks and workers are done)."""
        self.ranges.close()

    def spawn(self, task: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a fetch task in the mount's nursery (cancelled at unmount)."""
        self._nursery.start_soon(task, *args)

    # -- readers ----------------------------------------------------------------------------

    def reader(self, digest: str, size: int) -> BlobReader:
        """The reader of a registry blob (one per blob for the mount's life)."""
        found = self._readers.get(digest)
        if found is None:
            entry = self.cache.entry(digest, size)
            found = self._readers[digest] = BlobReader(self.ctx, entry, self.blobs, self._trust(entry))
        return found

    def _trust(self, entry: BlobEntry) -> Trust:
        """What vouches for a blob's bytes here: its block index, if the mount trusts one
        that names it with the blob's block count, else the whole-blob digest (or nothing
        before it, with ``--verify lazy``)."""
        index = self.block_index
        expected = index.for_blob(entry.digest, entry.block_size) if index else None
        if expected is not None and len(expected) != entry.nblocks:
            log.warning("block index of %s has %d blocks, blob has %d; not using it", entry.digest, len(expected),
                        entry.nblocks)
            expected = None
        block_hash = index.block_hash if index else ALGORITHMS["sha256"]
        return Trust.decide(expected, block_hash, self.ctx.index_vouched, self.policy.lazy)

    def confine(self, blocks: Callable[[ReaderSink, list[int]], list[int]]) -> None:
        """Fetch by ranges only the blocks ``blocks`` keeps of those asked for (a view's:
        :meth:`~.viewblocks.ViewBlocks.confine`, so read-ahead stops at the view's files)."""
        self.blobs.confine = blocks

    def layer_stream(self, layer: Descriptor, packing: Packing, where: str) -> LayerStream:
        """The source of every file of a compressed layer (its targets are their readers)."""
        def cached() -> ReaderSink | None:  # the layer's own reader, only where the cache holds it
            return self.reader(layer.digest, layer.size).sink if self.cache.holds(layer.digest) else None

        origin = LayerOrigin(self.cache.entry, self.cache.claims_path(layer.digest), cached,
                             lambda: self.client.stream_blob(self.repository, layer.digest, retry=ONE_ATTEMPT))
        return LayerStream(self.ctx, layer, packing, where, origin)

    def pinned(self) -> set[str]:
        """Blobs eviction must leave alone: a fetch is in flight or a read is waiting."""
        return {digest for digest, reader in self._readers.items() if reader.busy}

    def forget(self, digest: str) -> None:
        """The cache evicted a blob: drop its in-memory blocks too, so reads go back to the
        registry (through the reader's one drop path when there is one)."""
        reader = self._readers.get(digest)
        if reader is not None:
            reader.drop(evicted=True)
        else:
            self.recent.drop(digest)

    # -- the hooks of the context ---------------------------------------------------------

    def pages_stale(self, key: str) -> None:
        """Bytes a reader served were dropped (only the one drop path calls this): tell
        whoever serves them, so the FUSE layer drops the kernel's pages of those files."""
        for callback in self.on_dropped:
            self.spawn(callback, key)

    def wrong_bytes(self, what: str, fetched: bool = True) -> None:
        """Count bytes that failed their check; ``fetched`` ones (not read back from the
        cache) also stop reading through mirrors for a while."""
        self.stats.integrity_errors += 1
        if not fetched:
            return
        self.client.suspect(what)
        self.ranges.forget_locations()  # the next attempt asks where to read afresh (not the mirror just benched)

    # -- prefetch -------------------------------------------------------------------------

    async def prefetch(self, readers: Sequence[BlobReader], progress: Callable[[int], None] | None = None,
                       cached: Callable[[int], None] | None = None,
                       landed: Callable[[BlobReader, list[int]], Awaitable[None]] | None = None,
                       wanted: Callable[[BlobReader], Sequence[int] | None] | None = None) -> None:
        """Fetch every missing block of ``readers`` (of each, those ``wanted`` says: a view's),
        in that order, readers' blobs first (:func:`~.prefetch.prefetch`)."""
        await prefetch(self.ctx, self.ranges.slots, lambda: self.ranges.sizer.run_blocks, readers, progress, cached,
                       landed, wanted)
