"""Turns "bytes [a, b) of blob D" into cached blocks.

- Single flight: a block being fetched has one ``trio.Event``; every reader of it waits on
  that, so 16 readers of one range cause one request.
- Runs: missing blocks are fetched as contiguous runs (``run_blocks`` per range request),
  up to ``parallel`` requests in flight, each streamed block by block into the cache.
- Read-ahead: a reader moving forward doubles its window (up to ``readahead_max`` blocks);
  random access fetches only what is asked.
- Prefetch: a background pass over the whole model that steps aside whenever a process is
  waiting on a read.
- Failures: a run that breaks mid-stream resumes from the first block it did not store;
  after the retry policy gives up, waiting readers get :class:`FetchError` (EIO in the
  mount). Bytes that cannot be cached (full disk) are still served, from memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import httpx
import trio

from .blockindex import BlockIndex
from .cache import BlobEntry, BlockCache
from .errors import AuthenticationError, CacheError, IntegrityError, NotFoundError, RegistryError
from .registry import RegistryClient

log = logging.getLogger(__name__)


class FetchError(RegistryError):
    """Bytes could not be fetched; the read that needed them fails (EIO)."""


@dataclass(frozen=True)
class FetchPolicy:
    # Measured on loopback (2 cores, Distribution 2.8): 8 parallel 4 MiB ranges gave 0.42 GB/s,
    # 4 parallel 16 MiB ranges 0.95 GB/s, one stream 1.06 GB/s; per-request cost dominates small runs.
    run_blocks: int = 16
    parallel: int = 6
    readahead_max: int = 96  # blocks: enough for `parallel` runs in flight on a slow link
    timeout: float = 120.0  # a read waiting longer than this fails with EIO
    attempts: int = 5
    prefetch_workers: int = 4
    recent_blocks: int = 48  # just-fetched blocks kept in memory: the reader usually wants them next
    write_behind: int = 64  # blocks served from memory while their cache write is under way


class RecentBlocks:
    """Just-fetched blocks in memory, one budget for the whole process: the reader that
    caused a fetch usually wants the block next, and a cache that cannot store it (full
    disk) still gets it served."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def get(self, digest: str, index: int) -> bytes | None:
        return self._blocks.get((digest, index))

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._blocks

    def put(self, digest: str, index: int, data: bytes) -> None:
        self._blocks[(digest, index)] = data
        self._blocks.move_to_end((digest, index))
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def drop(self, digest: str) -> None:
        for key in [k for k in self._blocks if k[0] == digest]:
            del self._blocks[key]


@dataclass
class Counters:
    bytes_fetched: int = 0
    requests: int = 0
    retries: int = 0
    errors: int = 0
    cache_write_errors: int = 0
    integrity_errors: int = 0


class Fetcher:
    def __init__(self, cache: BlockCache, client: RegistryClient, repository: str, nursery: trio.Nursery,
                 policy: FetchPolicy | None = None, block_index: BlockIndex | None = None) -> None:
        self.cache, self.client, self.repository = cache, client, repository
        self.block_index = block_index
        self.policy = policy or FetchPolicy()
        self.counters = Counters()
        self.recent = RecentBlocks(self.policy.recent_blocks)
        self._write_slots = trio.Semaphore(self.policy.write_behind)
        self.foreground_waiting = 0
        self._nursery = nursery
        self._limiter = trio.CapacityLimiter(self.policy.parallel)
        self._readers: dict[str, BlobReader] = {}
        self._idle = trio.Event()
        self._idle.set()
        self.on_dropped: list[Callable[[str], Awaitable[None]]] = []  # told when a blob's bytes were wrong

    def reader(self, digest: str, size: int) -> "BlobReader":
        found = self._readers.get(digest)
        if found is None:
            entry = self.cache.entry(digest, size)
            expected = self.block_index.for_blob(digest, entry.block_size) if self.block_index else None
            if expected is not None and len(expected) != entry.nblocks:
                log.warning("block index of %s has %d blocks, blob has %d; not using it", digest, len(expected), entry.nblocks)
                expected = None
            found = self._readers[digest] = BlobReader(self, entry, expected)
        return found

    def pinned(self) -> set[str]:
        """Blobs eviction must leave alone: a fetch is in flight or a read is waiting."""
        return {digest for digest, reader in self._readers.items() if reader._inflight}

    def forget(self, digest: str) -> None:
        """Drop in-memory blocks of an evicted blob so reads go back to the registry."""
        self.recent.drop(digest)

    def _foreground(self, delta: int) -> None:
        self.foreground_waiting += delta
        if self.foreground_waiting:
            if self._idle.is_set():
                self._idle = trio.Event()
        else:
            self._idle.set()

    async def flush(self) -> None:
        """Wait until every block written behind has reached the cache (or failed to)."""
        slots = self.policy.write_behind
        for _ in range(slots):
            await self._write_slots.acquire()
        for _ in range(slots):
            self._write_slots.release()

    async def wait_idle(self) -> None:
        """Return once no process is waiting on a read (prefetch calls this before each run)."""
        while self.foreground_waiting:
            await self._idle.wait()

    async def prefetch(self, readers: Iterable["BlobReader"],
                       progress: Callable[[int], None] | None = None) -> None:
        """Fetch every missing block of ``readers``, yielding to foreground reads. Stops with a
        :class:`CacheError` once the cache refuses blocks (a full disk): prefetching into
        memory that cannot be kept only takes bandwidth from the readers."""
        send, receive = trio.open_memory_channel[tuple[BlobReader, list[int]]](0)
        write_errors = self.counters.cache_write_errors

        async def worker(receive: trio.MemoryReceiveChannel) -> None:
            async with receive:
                async for reader, blocks in receive:
                    await self.wait_idle()
                    if self.counters.cache_write_errors > write_errors:
                        raise CacheError("the cache refuses new blocks (is its disk full?)")
                    await reader.ensure(blocks, foreground=False)
                    if progress:
                        progress(sum(reader.entry.block_length(i) for i in blocks))

        async with trio.open_nursery() as nursery:
            for _ in range(self.policy.prefetch_workers):
                nursery.start_soon(worker, receive.clone())
            await receive.aclose()
            async with send:
                for reader in readers:
                    missing = reader.entry.missing(0, reader.entry.nblocks - 1)
                    if progress:
                        progress(reader.entry.size - sum(reader.entry.block_length(i) for i in missing))
                    step = self.policy.run_blocks
                    for start in range(0, len(missing), step):
                        await send.send((reader, missing[start:start + step]))


class BlobReader:
    def __init__(self, fetcher: Fetcher, entry: BlobEntry, expected: list[bytes] | None = None) -> None:
        self.fetcher, self.entry = fetcher, entry
        self.expected = expected  # sha256 per block, from the block index
        self.block_size = entry.block_size
        self._inflight: dict[int, trio.Event] = {}
        self._failures: dict[int, BaseException] = {}
        self._sequential_end = 0
        self._window = 0
        self._ahead_until = -1
        self._verifying = False
        self._verify_done = trio.Event()
        self._unwritten: dict[int, bytes] = {}  # served from here until the cache write lands

    @property
    def digest(self) -> str:
        return self.entry.digest

    @property
    def size(self) -> int:
        return self.entry.size

    def _available(self, index: int) -> bool:
        return index in self._unwritten or (self.entry.digest, index) in self.fetcher.recent or self.entry.has(index)

    def _block(self, index: int) -> bytes:
        data = self._unwritten.get(index) or self.fetcher.recent.get(self.entry.digest, index)
        return data if data is not None else self.entry.read_block(index)

    # -- reading --------------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        size = min(size, self.size - offset)
        if size <= 0 or offset < 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        self._read_ahead(offset, size, last)
        # A block held only in memory (full disk) may be dropped before we read it, and a cached
        # block may not read back (cut short, unreadable): either way it is fetched again.
        for _ in range(6):
            missing = [i for i in range(first, last + 1) if not self._available(i)]
            if missing:
                await self.ensure(missing, foreground=True)
                continue
            parts = self._blocks(first, last)
            if parts is not None:
                break
        else:
            raise FetchError(f"blocks {first}-{last} of {self.digest} could not be kept long enough to serve them")
        start = offset - first * bs
        if len(parts) == 1:
            block = parts[0]
            return block if start == 0 and size == len(block) else block[start:start + size]
        return b"".join(parts)[start:start + size]

    def _blocks(self, first: int, last: int) -> list[bytes] | None:
        parts = []
        for index in range(first, last + 1):
            try:
                parts.append(self._block(index))
            except CacheError as exc:
                log.warning("%s; fetching it again", exc)
                self.entry.forget(index)
                return None
        return parts

    def _read_ahead(self, offset: int, size: int, last: int) -> None:
        """Grow a window ahead of a sequential reader and refill it in big batches.

        Refilling only when less than half the window is left ahead makes each range request
        cover many blocks (per-request cost dominates on fast links); random access turns
        read-ahead off.
        """
        bs = self.block_size
        sequential = offset == 0 or (self._sequential_end - 4 * bs <= offset <= self._sequential_end + bs)
        end = offset + size
        if not sequential:
            self._window, self._sequential_end, self._ahead_until = 0, end, last
            return
        if end // bs > self._sequential_end // bs or offset == 0:
            self._window = min(max(1, self._window * 2), self.fetcher.policy.readahead_max)
        self._sequential_end = max(end, self._sequential_end)
        if self._ahead_until - last > self._window // 2:
            return
        start = max(last, self._ahead_until) + 1
        stop = min(last + self._window, self.entry.nblocks - 1)
        if start <= stop:
            self._ahead_until = stop
            self._schedule([i for i in range(start, stop + 1) if not self._available(i)])

    async def ensure(self, blocks: list[int], foreground: bool = True) -> None:
        """Make ``blocks`` available (cached or in memory), fetching what is missing."""
        self._schedule(blocks)
        if foreground:
            self.fetcher._foreground(+1)
        try:
            with trio.move_on_after(self.fetcher.policy.timeout) as scope:
                for index in blocks:
                    while not self._available(index):
                        event = self._inflight.get(index)
                        if event is None:
                            failure = self._failures.get(index)
                            if failure is None and not foreground:
                                break  # fetched, but not kept (full disk): nobody is waiting for it
                            raise FetchError(f"cannot fetch block {index} of {self.digest}: {failure or 'fetch ended without data'}")
                        await event.wait()
            if scope.cancelled_caught:
                raise FetchError(f"timed out after {self.fetcher.policy.timeout:g}s waiting for {self.digest}")
        finally:
            if foreground:
                self.fetcher._foreground(-1)

    # -- fetching -------------------------------------------------------------------------

    def _schedule(self, blocks: list[int]) -> None:
        todo = [i for i in blocks if i not in self._inflight and not self._available(i)]
        if not todo:
            return
        run: list[int] = []
        for index in todo:
            if run and (index != run[-1] + 1 or len(run) >= self.fetcher.policy.run_blocks):
                self._start_run(run)
                run = []
            run.append(index)
        self._start_run(run)

    def _start_run(self, run: list[int]) -> None:
        for index in run:
            self._inflight[index] = trio.Event()
            self._failures.pop(index, None)
        self.fetcher._nursery.start_soon(self._fetch_run, run[0], run[-1])

    def _store(self, index: int, data: bytes, fetched: bool = True) -> None:
        """Keep a fetched block in memory (recent reads) and in the cache. A cache that cannot
        take it (full disk) is logged, and the block is still served from memory."""
        self.fetcher.recent.put(self.entry.digest, index, data)
        try:
            self.entry.write_block(index, data)
        except CacheError as exc:
            self._cache_write_failed(exc)
        self._arrived(index, len(data), fetched)

    async def _store_behind(self, index: int, data: bytes) -> None:
        """Serve a block at once and write it to the cache in a worker thread, so a disk
        under writeback pressure does not stall the network or other readers. At most
        ``write_behind`` blocks wait for their write; past that, fetching waits for the disk."""
        await self.fetcher._write_slots.acquire()
        self._unwritten[index] = data
        self.fetcher.recent.put(self.entry.digest, index, data)
        self._arrived(index, len(data), True)
        self.fetcher._nursery.start_soon(self._write_block, index, data)

    async def _write_block(self, index: int, data: bytes) -> None:
        try:
            await trio.to_thread.run_sync(self.entry.write_block, index, data, self.expected is not None)
            self._maybe_verify()
        except CacheError as exc:
            self._cache_write_failed(exc)
        except Exception:  # runs in the fetcher's nursery: an escape would stop the daemon
            log.exception("unexpected error storing block %d of %s", index, self.digest)
        finally:
            self._unwritten.pop(index, None)
            self.fetcher._write_slots.release()

    def _cache_write_failed(self, exc: CacheError) -> None:
        self.fetcher.counters.cache_write_errors += 1
        if self.fetcher.counters.cache_write_errors == 1 or self.fetcher.counters.cache_write_errors % 1000 == 0:
            log.error("serving without caching: %s", exc)

    def _arrived(self, index: int, size: int, fetched: bool) -> None:
        if fetched:
            self.fetcher.counters.bytes_fetched += size
        event = self._inflight.pop(index, None)
        if event is not None:
            event.set()

    def _fail(self, first: int, last: int, exc: BaseException, shutting_down: bool = False) -> None:
        if shutting_down:
            log.debug("blocks %d-%d of %s not fetched: unmounting", first, last, self.digest)
        else:
            self.fetcher.counters.errors += 1
            log.error("giving up on blocks %d-%d of %s: %s", first, last, self.digest, exc)
        for index in range(first, last + 1):
            event = self._inflight.pop(index, None)
            if event is not None:
                self._failures[index] = exc
                event.set()

    async def _fetch_run(self, first: int, last: int) -> None:
        next_block, attempt = first, 0
        policy = self.fetcher.policy
        try:
            async with self.fetcher._limiter:
                while next_block <= last:
                    while next_block <= last and self.entry.has(next_block):
                        self._store_present(next_block)
                        next_block += 1
                    if next_block > last:
                        break
                    try:
                        next_block = await self._stream_run(next_block, last)
                    except (httpx.HTTPError, RegistryError, IntegrityError, OSError) as exc:
                        attempt += 1
                        if isinstance(exc, (AuthenticationError, NotFoundError)) or attempt >= policy.attempts:
                            self._fail(next_block, last, exc)
                            return
                        self.fetcher.counters.retries += 1
                        delay = min(5.0, 0.2 * 2 ** (attempt - 1))
                        log.warning("fetch of %s block %d failed (%s); retry %d in %.1fs", self.digest, next_block,
                                    exc or type(exc).__name__, attempt, delay)
                        await trio.sleep(delay)
        except Exception as exc:  # a bug or an unexpected error: fail these reads, keep the daemon
            log.exception("unexpected error fetching %s blocks %d-%d", self.digest, first, last)
            self._fail(first, last, exc)
            return
        finally:
            with trio.CancelScope(shield=True):
                if any(i in self._inflight for i in range(first, last + 1)):
                    self._fail(first, last, FetchError("fetch cancelled"), shutting_down=True)
        self._maybe_verify()

    def _store_present(self, index: int) -> None:
        event = self._inflight.pop(index, None)
        if event is not None:
            event.set()

    async def _stream_run(self, first: int, last: int) -> int:
        """Stream blocks [first, last] into the cache; returns the next block not stored."""
        bs, size = self.block_size, self.size
        start, end = first * bs, min((last + 1) * bs, size)
        index = first
        pieces: list[memoryview] = []  # of the block being assembled: joined once, one copy
        fill, need = 0, self.entry.block_length(index)
        hasher = self._block_hasher()
        self.fetcher.counters.requests += 1
        async with self.fetcher.client.stream_blob(self.fetcher.repository, self.digest, start, end) as response:
            async for chunk in response.aiter_raw():
                view = memoryview(chunk)
                while view:
                    if index > last:
                        raise IntegrityError(f"registry sent more than the {end - start} bytes asked of {self.digest}")
                    take = min(len(view), need - fill)
                    piece = view[:take]
                    pieces.append(piece)
                    if hasher is not None:
                        hasher.update(piece)
                    fill += take
                    view = view[take:]
                    if fill == need:
                        if hasher is not None:
                            self._check_block(index, hasher.digest())
                            hasher = self._block_hasher()
                        await self._store_behind(index, b"".join(pieces))
                        index += 1
                        pieces, fill = [], 0
                        if index <= last:
                            need = self.entry.block_length(index)
        if index <= last:
            raise FetchError(f"response for {self.digest} ended after {(index - first) * bs + fill} of {end - start} bytes")
        return index

    def _block_hasher(self) -> "hashlib._Hash | None":
        """Blocks are hashed piece by piece as they arrive, on the event loop: handing each
        block to a worker thread cost more here (about 0.25 ms a hop on two busy cores, a
        third of the hash itself) than the hash gains from running beside the loop."""
        return hashlib.sha256() if self.expected is not None else None

    def _check_block(self, index: int, digest: bytes) -> None:
        """A block must match the block index before anyone sees it."""
        if digest != self.expected[index]:
            self.fetcher.counters.integrity_errors += 1
            raise IntegrityError(f"block {index} of {self.digest} does not match the block index")

    def _maybe_verify(self) -> None:
        if self._verifying or self.entry.verified or not self.entry.complete:
            return
        if self.entry.all_checked:
            self.entry.mark_verified()
            return
        self._verifying = True
        self._verify_done = trio.Event()
        self.fetcher._nursery.start_soon(self._verify)

    async def verified(self) -> bool:
        """Whether the blob is complete and matches its digest, waiting for a check under
        way (``pull`` reports the outcome instead of hashing the blob a second time)."""
        self._maybe_verify()
        if self._verifying:
            await self._verify_done.wait()
        return self.entry.verified

    async def _verify(self) -> None:
        try:
            matches = await trio.to_thread.run_sync(self.entry.digest_matches)
            if matches:
                self.entry.mark_verified()
            else:
                self.entry.clear()
                self.fetcher.recent.drop(self.digest)
                for callback in self.fetcher.on_dropped:
                    await callback(self.digest)
                log.error("blob %s assembled from ranges does not match its digest; dropped it from the cache", self.digest)
        except CacheError as exc:
            log.error("could not verify %s: %s", self.digest, exc)
        except Exception:  # runs in the fetcher's nursery: an escape would stop the daemon
            log.exception("unexpected error verifying %s", self.digest)
        finally:
            self._verifying = False
            self._verify_done.set()

    def cached_fraction(self) -> float:
        """Held locally: on disk, or in memory with its cache write under way."""
        if not self.size:
            return 1.0
        pending = sum(self.entry.block_length(i) for i in list(self._unwritten) if not self.entry.has(i))
        return (self.entry.cached_bytes() + pending) / self.size

