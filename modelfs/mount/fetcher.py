"""One mount's (or one ``pull``'s) fetching: the readers of its blobs, what they share, and
the background prefetch.

The parts (README, "Data plane"):

- :mod:`.blobreader`: one reader per blob, on the loop that answers FUSE: waits for blocks
  and serves them, decides what may be served (index / whole / lazy mode);
- :mod:`.readahead`: pure decisions: read-ahead, runs, request sizes;
- :mod:`.rangefetch`: range requests on worker threads, where bytes are received, checked
  and written to the cache; the loop only coordinates;
- :mod:`.stream`: compressed tar layers, streamed once;
- :mod:`.cache`: the self-checking block cache shared by every mount and ``pull``.

The :class:`Fetcher` holds what readers share: the policy, one :class:`~.stats.Stats`, the
just-fetched blocks in memory, the count of processes waiting on a read (prefetch steps aside
for them), and the nursery the fetch tasks run in.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio

from ..errors import TRANSIENT, AuthenticationError, CacheError, FetchError, NotFoundError
from ..registry import RegistryReader, RetryPolicy
from ..registry.protocol import RangeReader
from ..registry.ranges import HttpRanges
from .blobreader import BlobReader, Block
from .blockindex import TrustedIndex
from .buffers import BlockBuffers
from .cache import BlockCache
from .rangefetch import RangeFetcher, RangeSource, available_cores
from .stats import Stats

__all__ = ["TRANSIENT", "BlobReader", "Fetcher", "FetchError", "FetchPolicy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 120.0  # a read waiting longer than this fails with EIO; so does a silent fetch
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # the client's policy: one for every fetch
    workers: int = 0  # threads doing per-byte work (receive, check, store); 0: one per core available
    readahead_max: int = 96  # blocks read ahead of a sequential reader, at most (the sizer may ask for less)
    prefetch_workers: int = 8  # runs prefetch keeps asked for (request slots bound what is in flight)
    recent_blocks: int = 128  # blocks fetched for readers, held in memory until read (past the read-ahead)
    verify: str = "full"  # or "lazy": serve bytes of blobs without a trusted index before they are checked

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else max(2, available_cores())


class RecentBlocks:
    """Just-fetched, checked blocks in memory, one budget for the whole process: the reader
    that caused a fetch usually wants the block next, and a cache that cannot store it (full
    disk) still gets it served."""

    def __init__(self, capacity: int, buffers: BlockBuffers | None = None) -> None:
        self.capacity = capacity
        self.buffers = buffers  # where a dropped block's buffer goes back to, for reuse
        self._blocks: OrderedDict[tuple[str, int], Block] = OrderedDict()

    def get(self, digest: str, index: int) -> Block | None:
        return self._blocks.get((digest, index))

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._blocks

    def put(self, digest: str, index: int, data: Block) -> None:
        replaced = self._blocks.get((digest, index))
        self._blocks[(digest, index)] = data
        self._blocks.move_to_end((digest, index))
        if replaced is not None and replaced is not data:
            self._recycle(replaced)
        while len(self._blocks) > self.capacity:
            self._recycle(self._blocks.popitem(last=False)[1])

    def _recycle(self, data: Block) -> None:
        if self.buffers is not None:
            self.buffers.give_back(data)

    def indexes(self, digest: str) -> list[int]:
        return [index for (held, index) in self._blocks if held == digest]

    def drop(self, digest: str, blocks: list[int] | None = None) -> None:
        """Let go of ``blocks`` of a blob (all of them: None). Called by
        :meth:`BlobReader.drop`, the one path by which bytes leave."""
        keys = [k for k in self._blocks if k[0] == digest] if blocks is None else [(digest, i) for i in blocks]
        for key in keys:
            held = self._blocks.pop(key, None)
            if held is not None:
                self._recycle(held)


class Fetcher:
    def __init__(self, cache: BlockCache, client: RegistryReader, repository: str, nursery: trio.Nursery,
                 policy: FetchPolicy | None = None, index: TrustedIndex | None = None,
                 range_reader: RangeReader | None = None) -> None:
        self.cache, self.client, self.repository = cache, client, repository
        self.block_index = index.index if index else None
        self.index_vouched = bool(index and index.vouched)  # named by the manifest: no whole-blob hash needed
        self.policy = policy or FetchPolicy()
        self.stats = Stats()
        self.buffers = BlockBuffers(cache.block_size, keep=self.policy.recent_blocks + 64)
        self.recent = RecentBlocks(self.policy.recent_blocks, self.buffers)
        self.foreground_waiting = 0
        self._nursery = nursery
        range_reader = range_reader or HttpRanges(self.policy.timeout, client.ca_file)
        self.ranges = RangeFetcher(client, range_reader, repository, nursery, self.policy.timeout,
                                   self.policy.worker_count, cache.block_size, self.policy.readahead_max, self.buffers.take)
        self.blobs = RangeSource(self, self.ranges)
        self.stats.workers = self.ranges.workers
        self._readers: dict[str, BlobReader] = {}
        self._idle = trio.Event()
        self._idle.set()
        # told when bytes served of a blob (or of a file of a compressed layer: its derived key) were dropped
        self.on_dropped: list[Callable[[str], Awaitable[None]]] = []

    @property
    def lazy(self) -> bool:
        return self.policy.verify == "lazy"

    def close(self) -> None:
        """Close the kept-alive connections (once the nursery's tasks and workers are done)."""
        self.ranges.close()

    @property
    def readahead_blocks(self) -> int:
        """Read-ahead that keeps every request slot busy with a full run."""
        return self.ranges.sizer.window_blocks

    def spawn(self, task: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a fetch task in the mount's nursery (cancelled at unmount)."""
        self._nursery.start_soon(task, *args)

    def reader(self, digest: str, size: int) -> BlobReader:
        found = self._readers.get(digest)
        if found is None:
            entry = self.cache.entry(digest, size)
            expected = self.block_index.for_blob(digest, entry.block_size) if self.block_index else None
            if expected is not None and len(expected) != entry.nblocks:
                log.warning("block index of %s has %d blocks, blob has %d; not using it", digest, len(expected), entry.nblocks)
                expected = None
            found = self._readers[digest] = BlobReader(self, entry, self.blobs, expected,
                                                       self.block_index.block_hash if self.block_index else None)
        return found

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

    def pages_stale(self, key: str) -> None:
        """Bytes a reader served were dropped (only :meth:`BlobReader.drop` calls this): tell
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

    def cache_write_failed(self, exc: CacheError) -> None:
        self.stats.cache_write_errors += 1
        if self.stats.cache_write_errors == 1 or self.stats.cache_write_errors % 1000 == 0:
            log.error("serving without caching: %s", exc)

    async def retry_or_give_up(self, attempt: int, exc: BaseException, where: str) -> bool:
        """Back off before another attempt, as the registry client's :class:`RetryPolicy`
        says (jitter, ``Retry-After``); False once it gives up, or must not retry. The requests
        the fetch makes through the client are sent once each (``single_attempt``): this is
        the only loop that retries them."""
        retry = self.policy.retry
        if isinstance(exc, (AuthenticationError, NotFoundError)) or attempt >= retry.attempts:
            return False
        self.stats.retries += 1
        delay = retry.delay(attempt, getattr(exc, "retry_after", None))
        log.warning("fetch of %s failed (%s); retry %d in %.1fs", where, exc or type(exc).__name__, attempt, delay)
        await trio.sleep(delay)
        return True

    def give_up(self, reader: BlobReader, blocks: Iterable[int], exc: BaseException) -> None:
        self.stats.errors += 1
        log.error("giving up on blocks of %s: %s", reader.digest, exc)
        reader.fail(blocks, exc)

    def foreground(self, delta: int) -> None:
        """A process starts (+1) or stops (-1) waiting on a read."""
        self.foreground_waiting += delta
        if self.foreground_waiting:
            if self._idle.is_set():
                self._idle = trio.Event()
        else:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no process is waiting on a read (prefetch calls this before each run)."""
        while self.foreground_waiting:
            await self._idle.wait()

    async def prefetch(self, readers: Iterable[BlobReader], progress: Callable[[int], None] | None = None,
                       cached: Callable[[int], None] | None = None) -> None:
        """Fetch every missing block of ``readers``, yielding to foreground reads. Stops with a
        :class:`CacheError` once the cache refuses blocks (a full disk): prefetching into
        memory that cannot be kept only takes bandwidth from the readers."""
        send, receive = trio.open_memory_channel[tuple[BlobReader, list[int]]](0)
        write_errors = self.stats.cache_write_errors

        def refused() -> None:
            if self.stats.cache_write_errors > write_errors:
                raise CacheError("the cache refuses new blocks (is its disk full?)")

        async def worker(receive: trio.MemoryReceiveChannel) -> None:
            async with receive:
                async for reader, blocks in receive:
                    await self.wait_idle()
                    refused()
                    await reader.ensure(blocks, foreground=False)
                    refused()
                    if progress:
                        progress(sum(reader.entry.block_length(i) for i in blocks))

        async with trio.open_nursery() as nursery:
            for _ in range(self.policy.prefetch_workers):
                nursery.start_soon(worker, receive.clone())
            await receive.aclose()
            async with send:
                for reader in readers:
                    missing = [i for i in range(reader.entry.nblocks) if not reader.servable(i)]
                    if cached:
                        cached(reader.entry.size - sum(reader.entry.block_length(i) for i in missing))
                    step = reader.entry.nblocks if reader.whole_mode else self.ranges.sizer.run_blocks
                    for start in range(0, len(missing), max(step, 1)):
                        await send.send((reader, missing[start:start + step]))
