"""Turns "bytes [a, b) of blob D" into checked, cached blocks.

What a reader may see is decided per blob by what vouches for its bytes (README,
"Integrity"):

- **index mode** (the blob has a block index the mount trusts): missing blocks are fetched as
  contiguous runs (``run_blocks`` per range request, up to ``parallel`` in flight), each block
  hashed as it arrives and matched against the index before it is stored or served. A block
  already cached but not yet matched is hashed from disk and adopted, or dropped.
- **whole mode** (no trusted index, the default): the blob is streamed once, in order, hashed
  whole, and no byte of it is served until the hash matches its digest. Readers wait for
  that (their deadline moves with the stream's progress).
- **lazy** (``--verify lazy``, opt-in): blobs without an index are fetched by runs and served
  unverified, then checked whole once complete.

Every block read back from the cache is checked against its stored checksum
(:mod:`modelfs.mount.cache`); one that fails is dropped and fetched again. Single flight: a block
being fetched has one ``trio.Event`` all its readers wait on. Read-ahead: a reader moving
forward doubles its window. Prefetch: a background pass that steps aside whenever a process
is waiting on a read. A fetch that delivers no block within ``timeout`` is abandoned and
retried (a trickling server cannot hold a slot for hours); a read that waited ``timeout``
fails with EIO, and so, at once, does a read of the same block while that fetch still runs
(the kernel's retry of a failed readahead does not wait a second time).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import httpx
import trio

from .blockindex import ALGORITHMS, TrustedIndex
from ..config import VERIFY_MODES  # noqa: F401  (re-exported: the modes a mount knows)
from .cache import BlobEntry, BlockCache, BlockDamaged
from ..errors import AuthenticationError, CacheError, IntegrityError, ModelfsError, NotFoundError, RegistryError
from ..registry import RegistryClient

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
    timeout: float = 120.0  # a read waiting longer than this fails with EIO; so does a silent fetch
    attempts: int = 5
    prefetch_workers: int = 4
    recent_blocks: int = 48  # just-fetched blocks kept in memory: the reader usually wants them next
    write_behind: int = 64  # blocks served from memory while their cache write is under way
    verify: str = "full"  # or "lazy": serve bytes of blobs without a trusted index before they are checked


class RecentBlocks:
    """Just-fetched, checked blocks in memory, one budget for the whole process: the reader
    that caused a fetch usually wants the block next, and a cache that cannot store it (full
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
    damaged_blocks: int = 0  # cached blocks that failed their checksum when read back


TRANSIENT = (httpx.HTTPError, ModelfsError, OSError)
# The kernel retries a page whose readahead failed at once: a read of the same block that
# comes this soon after another gave up on its fetch fails at once too, instead of waiting a
# second full timeout. A later read (an application retrying) waits again.
KERNEL_RETRY_WINDOW = 0.5
WHOLE_ROUNDS = 3  # whole passes over a blob whose digest does not match before its reads fail


class StallGuard:
    """A cancel scope for one response that fires when less than ``quantum`` bytes arrived
    in ``seconds``: a server that trickles (a few KB/s never trips a read timeout) cannot hold
    a fetch slot for hours."""

    def __init__(self, seconds: float, quantum: int = 1 << 20) -> None:
        self.seconds, self.quantum = seconds, quantum
        self.scope = trio.CancelScope(deadline=trio.current_time() + seconds)
        self._fed = 0

    def fed(self, size: int) -> None:
        self._fed += size
        if self._fed >= self.quantum:
            self._fed = 0
            self.scope.deadline = trio.current_time() + self.seconds

    @property
    def fired(self) -> bool:
        return self.scope.cancelled_caught


class Fetcher:
    def __init__(self, cache: BlockCache, client: RegistryClient, repository: str, nursery: trio.Nursery,
                 policy: FetchPolicy | None = None, index: TrustedIndex | None = None) -> None:
        self.cache, self.client, self.repository = cache, client, repository
        self.block_index = index.index if index else None
        self.index_vouched = bool(index and index.vouched)  # named by the manifest: no whole-blob hash needed
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

    @property
    def lazy(self) -> bool:
        return self.policy.verify == "lazy"

    def reader(self, digest: str, size: int) -> "BlobReader":
        found = self._readers.get(digest)
        if found is None:
            entry = self.cache.entry(digest, size)
            expected = self.block_index.for_blob(digest, entry.block_size) if self.block_index else None
            if expected is not None and len(expected) != entry.nblocks:
                log.warning("block index of %s has %d blocks, blob has %d; not using it", digest, len(expected), entry.nblocks)
                expected = None
            found = self._readers[digest] = BlobReader(self, entry, expected,
                                                       self.block_index.block_hash if self.block_index else None)
        return found

    def pinned(self) -> set[str]:
        """Blobs eviction must leave alone: a fetch is in flight or a read is waiting."""
        return {digest for digest, reader in self._readers.items() if reader.busy}

    def forget(self, digest: str) -> None:
        """Drop in-memory blocks of an evicted blob so reads go back to the registry."""
        self.recent.drop(digest)

    def wrong_bytes(self, what: str) -> None:
        """Count bytes that failed their check, and stop reading through mirrors for a while."""
        self.counters.integrity_errors += 1
        suspect = getattr(self.client, "suspect", None)
        if suspect is not None:
            suspect(what)

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
                    missing = [i for i in range(reader.entry.nblocks) if not reader.servable(i)]
                    if progress:
                        progress(reader.entry.size - sum(reader.entry.block_length(i) for i in missing))
                    step = reader.entry.nblocks if reader.whole_mode else self.policy.run_blocks
                    for start in range(0, len(missing), max(step, 1)):
                        await send.send((reader, missing[start:start + step]))


class BlobReader:
    def __init__(self, fetcher: Fetcher, entry: BlobEntry, expected: list[bytes] | None = None,
                 block_hash: Callable[[bytes], bytes] | None = None) -> None:
        self.fetcher, self.entry = fetcher, entry
        self.expected = expected  # hash per block, from a block index the mount trusts
        self.block_hash = block_hash or ALGORITHMS["sha256"]  # the index's algorithm
        self.block_size = entry.block_size
        self._inflight: dict[int, trio.Event] = {}
        self._failures: dict[int, BaseException] = {}
        self._timed_out: dict[int, tuple[trio.Event, float]] = {}  # a reader gave up on this fetch, and when
        self._sequential_end = 0
        self._window = 0
        self._ahead_until = -1
        self._verifying = False
        self._verify_done = trio.Event()
        self._unwritten: dict[int, bytes] = {}  # checked blocks served from here until the cache write lands
        # whole mode: one ordered stream, hashed whole, nothing served before it matches
        self._whole_running = False
        self._whole_generation = 0
        self._whole_outcome: tuple[int, BaseException | None] = (0, None)
        self._stalled: tuple[int, float] = (-1, 0.0)  # pass a reader gave up on, and when
        self._changed = trio.Event()  # set (and replaced) on every block of whole-mode progress
        self._progress = 0
        self._pending_writes = 0
        self._writes_done = trio.Event()
        self._writes_done.set()

    @property
    def digest(self) -> str:
        return self.entry.digest

    @property
    def size(self) -> int:
        return self.entry.size

    @property
    def lazy(self) -> bool:
        return self.fetcher.lazy

    @property
    def whole_mode(self) -> bool:
        """No trusted index and not lazy: bytes are served only once the blob checked whole."""
        return self.expected is None and not self.lazy

    @property
    def busy(self) -> bool:
        return bool(self._inflight) or self._whole_running or self._verifying

    def servable(self, index: int) -> bool:
        """Whether block ``index`` may be shown to a reader now (held checked in memory, or on
        disk with the trust this mount requires; its bytes are checked again when read)."""
        if index in self._unwritten or (self.entry.digest, index) in self.fetcher.recent:
            return True
        if self.lazy:
            return self.entry.has(index)
        return self.entry.trusted(index, self.expected[index] if self.expected else None)

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
        if not self.whole_mode:
            self._read_ahead(offset, size, last)
        # A block held only in memory (full disk) may be dropped before we read it, and a cached
        # block may not read back (damaged, cut short): either way it is fetched again.
        for _ in range(6):
            missing = [i for i in range(first, last + 1) if not self.servable(i)]
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
            except BlockDamaged as exc:
                self._damaged(index, exc)
                return None
            except CacheError:  # gone meanwhile (evicted or cleared by another process): fetch again
                return None
        return parts

    def _damaged(self, index: int, exc: Exception) -> None:
        self.fetcher.counters.damaged_blocks += 1
        log.warning("%s; fetching it again", exc)
        try:
            self.entry.forget(index)
        except CacheError as forget_error:
            log.error("%s", forget_error)

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
            self._schedule([i for i in range(start, stop + 1) if not self.servable(i)])

    async def ensure(self, blocks: list[int], foreground: bool = True) -> None:
        """Make ``blocks`` servable, fetching what is missing."""
        if foreground:
            self.fetcher._foreground(+1)
        try:
            if self.whole_mode:
                await self._ensure_whole(blocks)
            else:
                await self._ensure_runs(blocks, foreground)
        finally:
            if foreground:
                self.fetcher._foreground(-1)

    async def _ensure_runs(self, blocks: list[int], foreground: bool) -> None:
        self._schedule(blocks)
        timeout = self.fetcher.policy.timeout
        waiting: trio.Event | None = None
        index = -1
        with trio.move_on_after(timeout) as scope:
            for index in blocks:
                while not self.servable(index):
                    waiting = self._inflight.get(index)
                    if waiting is None:
                        failure = self._failures.get(index)
                        if failure is None and not foreground:
                            break  # fetched, but not kept (full disk): nobody is waiting for it
                        raise FetchError(f"cannot fetch block {index} of {self.digest}: {failure or 'fetch ended without data'}")
                    gave_up = self._timed_out.get(index)
                    if gave_up and gave_up[0] is waiting and trio.current_time() - gave_up[1] < KERNEL_RETRY_WINDOW:
                        raise FetchError(f"block {index} of {self.digest}: its fetch has already run past the "
                                         f"{timeout:g}s timeout")
                    await waiting.wait()
        if scope.cancelled_caught:
            if waiting is not None and self._inflight.get(index) is waiting:
                self._timed_out[index] = (waiting, trio.current_time())
            raise FetchError(f"timed out after {timeout:g}s waiting for {self.digest}")

    # -- fetching by runs (index mode, lazy) ----------------------------------------------

    def _schedule(self, blocks: list[int]) -> None:
        if self.whole_mode:
            self._start_whole()
            return
        todo = [i for i in blocks if i not in self._inflight and not self.servable(i)]
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

    async def _store_behind(self, index: int, data: bytes, index_hash: bytes | None) -> None:
        """Serve a block at once (it was checked) and write it to the cache in a worker thread,
        so a disk under writeback pressure does not stall the network or other readers. At
        most ``write_behind`` blocks wait for their write; past that, fetching waits."""
        await self.fetcher._write_slots.acquire()
        self._unwritten[index] = data
        self.fetcher.recent.put(self.entry.digest, index, data)
        self._arrived(index, len(data), True)
        self.fetcher._nursery.start_soon(self._write_block, index, data, index_hash)

    async def _write_block(self, index: int, data: bytes, index_hash: bytes | None) -> None:
        try:
            await trio.to_thread.run_sync(self.entry.write_block, index, data, index_hash)
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
        self._timed_out.pop(index, None)
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
            self._timed_out.pop(index, None)
            if event is not None:
                self._failures[index] = exc
                event.set()

    async def _retry_or_give_up(self, attempt: int, exc: BaseException, where: int) -> bool:
        """Back off before another attempt; False once the policy gives up (or must not retry)."""
        if isinstance(exc, (AuthenticationError, NotFoundError)) or attempt >= self.fetcher.policy.attempts:
            return False
        self.fetcher.counters.retries += 1
        delay = min(5.0, 0.2 * 2 ** (attempt - 1))
        log.warning("fetch of %s block %d failed (%s); retry %d in %.1fs", self.digest, where,
                    exc or type(exc).__name__, attempt, delay)
        await trio.sleep(delay)
        return True

    async def _fetch_run(self, first: int, last: int) -> None:
        next_block, attempt = first, 0
        try:
            async with self.fetcher._limiter:
                while next_block <= last:
                    while next_block <= last and self._settle_present(next_block):
                        next_block += 1
                    if next_block > last:
                        break
                    try:
                        next_block = await self._stream_run(next_block, last)
                    except TRANSIENT as exc:
                        attempt += 1
                        if not await self._retry_or_give_up(attempt, exc, next_block):
                            self._fail(next_block, last, exc)
                            return
        except Exception as exc:  # a bug or an unexpected error: fail these reads, keep the daemon
            log.exception("unexpected error fetching %s blocks %d-%d", self.digest, first, last)
            self._fail(first, last, exc)
            return
        finally:
            with trio.CancelScope(shield=True):
                if any(i in self._inflight for i in range(first, last + 1)):
                    self._fail(first, last, FetchError("fetch cancelled"), shutting_down=True)
        self._maybe_verify()

    def _settle_present(self, index: int) -> bool:
        """A block already usable ends its wait. One cached but not matched against our index
        (stored by a lazy mount, or under another index) is hashed from disk: adopted if it
        matches, dropped if not. False: it must be fetched."""
        if not self.servable(index):
            if self.expected is None or not self.entry.has(index):
                return False
            try:
                data, check = self.entry.read_checked(index)
            except CacheError as exc:
                self._damaged(index, exc)
                return False
            if self.block_hash(data) != self.expected[index]:
                log.warning("cached block %d of %s does not match the block index; fetching it again", index, self.digest)
                self.entry.forget(index)
                return False
            self.entry.adopt(index, self.expected[index], check)
        event = self._inflight.pop(index, None)
        self._timed_out.pop(index, None)
        if event is not None:
            event.set()
        return True

    async def _stream_run(self, first: int, last: int) -> int:
        """Stream blocks [first, last]: each checked against the index (if any) before it is
        served or cached. Returns the next block not stored."""
        async def keep(index: int, data: bytes) -> None:
            digest = None
            if self.expected is not None:
                digest = self.block_hash(data)
                self._check_block(index, digest)
            await self._store_behind(index, data, digest)

        await self._receive_range(first, last, keep)
        return last + 1

    async def _receive_range(self, first: int, last: int, on_block: Callable[[int, bytes], Awaitable[None]]) -> None:
        """One range request for blocks [first, last], each handed to ``on_block`` whole, in
        order, as it arrives. A response that delivers no block within the timeout is
        abandoned (FetchError); so is one that ends early or sends more than asked."""
        bs = self.block_size
        start, end = first * bs, min((last + 1) * bs, self.size)
        index, fill = first, 0
        pieces: list[memoryview] = []  # of the block being assembled: joined once, one copy
        need = self.entry.block_length(index)
        self.fetcher.counters.requests += 1
        guard = StallGuard(self.fetcher.policy.timeout, bs)
        with guard.scope:
            async with self.fetcher.client.stream_blob(self.fetcher.repository, self.digest, start, end) as response:
                async for chunk in response.aiter_raw():
                    view = memoryview(chunk)
                    while view:
                        if index > last:
                            raise IntegrityError(f"registry sent more than the {end - start} bytes asked of {self.digest}")
                        take = min(len(view), need - fill)
                        pieces.append(view[:take])
                        fill += take
                        view = view[take:]
                        if fill == need:
                            await on_block(index, b"".join(pieces))
                            guard.fed(need)
                            index += 1
                            pieces, fill = [], 0
                            if index <= last:
                                need = self.entry.block_length(index)
        if guard.fired:
            raise FetchError(f"{self.digest}: no block arrived within {guard.seconds:g}s (server stalled or trickling)")
        if index <= last:
            raise FetchError(f"response for {self.digest} ended after {(index - first) * bs + fill} of {end - start} bytes")

    def _check_block(self, index: int, digest: bytes) -> None:
        """A block must match the block index before anyone sees it."""
        assert self.expected is not None
        if digest != self.expected[index]:
            self.fetcher.wrong_bytes(f"block {index} of {self.digest}")
            raise IntegrityError(f"block {index} of {self.digest} does not match the block index")

    # -- whole mode -----------------------------------------------------------------------

    def _start_whole(self) -> None:
        if not self._whole_running:
            self._whole_running = True
            self._whole_generation += 1
            self.fetcher._nursery.start_soon(self._run_whole, self._whole_generation)

    def _tick(self) -> None:
        self._progress += 1
        self._changed.set()
        self._changed = trio.Event()

    async def _ensure_whole(self, blocks: list[int]) -> None:
        """Wait for the blob to be checked whole. The deadline moves while the stream makes
        progress: a large blob on a slow link is not a stalled one. Every reader waiting on a
        pass that fails gets its error; a later read starts a new pass."""
        timeout = self.fetcher.policy.timeout
        for _ in range(3):
            if all(self.servable(i) for i in blocks):
                return
            self._start_whole()
            generation = self._whole_generation
            while self._whole_running and self._whole_generation == generation:
                if self._stalled[0] == generation and trio.current_time() - self._stalled[1] < KERNEL_RETRY_WINDOW:
                    raise FetchError(f"{self.digest}: its fetch has already made no progress for {timeout:g}s")
                seen = self._progress
                with trio.move_on_after(timeout):
                    await self._changed.wait()
                if self._progress == seen:
                    self._stalled = (generation, trio.current_time())
                    raise FetchError(f"timed out after {timeout:g}s waiting for {self.digest} (no progress)")
            failed_generation, failure = self._whole_outcome
            if failed_generation == generation and failure is not None:
                raise FetchError(f"cannot fetch {self.digest}: {failure}")
        if not all(self.servable(i) for i in blocks):
            raise FetchError(f"{self.digest} was checked but could not be kept long enough to serve it")

    async def _run_whole(self, generation: int) -> None:
        failure: BaseException | None = None
        try:
            for round_ in range(1, WHOLE_ROUNDS + 1):  # bytes flipped on the way: fetched again, a bounded number of times
                if await self._fetch_whole():
                    return
                if round_ < WHOLE_ROUNDS:
                    log.warning("fetching %s again after its digest did not match", self.digest)
            failure = IntegrityError(f"blob {self.digest} does not match its digest ({WHOLE_ROUNDS} times); not serving it")
        except TRANSIENT as exc:
            failure = exc
            self.fetcher.counters.errors += 1
            log.error("giving up on %s: %s", self.digest, exc)
        except Exception as exc:  # a bug: fail these reads, keep the daemon
            failure = exc
            log.exception("unexpected error fetching %s", self.digest)
        finally:
            self._whole_outcome = (generation, failure)
            self._whole_running = False
            self._tick()

    async def _fetch_whole(self) -> bool:
        """One ordered pass: cached blocks are read (and checked) from disk, missing ones
        streamed; everything is hashed in order. True once the blob matched and its blocks
        are marked checked."""
        hasher = hashlib.sha256()
        checks: dict[int, int] = {}
        index, attempt = 0, 0

        async def hashed(block: int, data: bytes) -> None:
            nonlocal index
            hasher.update(data)
            self.fetcher.counters.bytes_fetched += len(data)
            await self._keep_unverified(block, data, checks)
            self._tick()
            index = block + 1

        async with self.fetcher._limiter:
            while index < self.entry.nblocks:
                if self.entry.has(index):
                    index = await trio.to_thread.run_sync(self._hash_cached, index, hasher, checks)
                    self._tick()
                    continue
                stop = index
                while stop + 1 < self.entry.nblocks and not self.entry.has(stop + 1):
                    stop += 1
                try:
                    await self._receive_range(index, stop, hashed)
                    attempt = 0
                except TRANSIENT as exc:
                    attempt += 1
                    # the hasher holds every block before ``index`` (kept current by ``hashed``): resume there
                    if not await self._retry_or_give_up(attempt, exc, index):
                        raise
            await self._writes_done.wait()
        if "sha256:" + hasher.hexdigest() != self.entry.digest or len(checks) != self.entry.nblocks:
            if len(checks) != self.entry.nblocks:
                raise CacheError(f"the cache could not keep every block of {self.digest} (is its disk full?); "
                                 "without a block index it is served only once kept and checked whole")
            self._digest_mismatch()
            return False
        if not await trio.to_thread.run_sync(self.entry.mark_whole, checks):
            raise CacheError(f"blocks of {self.digest} changed under its check; fetching again")
        log.info("%s checked whole (%d bytes)", self.digest, self.size)
        return True

    def _hash_cached(self, index: int, hasher: "hashlib._Hash", checks: dict[int, int]) -> int:
        """Hash the cached blocks from ``index`` on (in a worker thread: a large cached prefix
        must not hold up the event loop); returns the first block not cached, or one that
        was damaged (dropped here, so it is fetched)."""
        while index < self.entry.nblocks and self.entry.has(index):
            try:
                data, check = self.entry.read_checked(index)
            except CacheError as exc:
                self._damaged(index, exc)
                break
            hasher.update(data)
            checks[index] = check
            index += 1
        return index

    async def _keep_unverified(self, index: int, data: bytes, checks: dict[int, int]) -> None:
        """Write a block of a blob still being checked, behind the stream (a worker thread)."""
        await self.fetcher._write_slots.acquire()
        self._pending_writes += 1
        if self._writes_done.is_set():
            self._writes_done = trio.Event()
        self.fetcher._nursery.start_soon(self._write_unverified, index, data, checks)

    async def _write_unverified(self, index: int, data: bytes, checks: dict[int, int]) -> None:
        try:
            check = await trio.to_thread.run_sync(self._write_or_match, index, data)
            if check is not None:
                checks[index] = check
        except CacheError as exc:
            self._cache_write_failed(exc)
        except Exception:
            log.exception("unexpected error storing block %d of %s", index, self.digest)
        finally:
            self.fetcher._write_slots.release()
            self._pending_writes -= 1
            if not self._pending_writes:
                self._writes_done.set()

    def _write_or_match(self, index: int, data: bytes) -> int | None:
        """Store a block; if another process stored it meanwhile, use theirs only if equal."""
        check = self.entry.write_block(index, data)
        if check is not None:
            return check
        try:
            theirs, check = self.entry.read_checked(index)
            if theirs == data:
                return check
        except CacheError:
            pass
        self.entry.forget(index)
        return self.entry.write_block(index, data)

    def _digest_mismatch(self) -> None:
        self.fetcher.wrong_bytes(f"blob {self.digest}")
        log.error("blob %s does not match its digest; dropped it from the cache", self.digest)
        self.entry.clear()
        self.fetcher.recent.drop(self.digest)
        for callback in self.fetcher.on_dropped:
            self.fetcher._nursery.start_soon(callback, self.digest)

    # -- checking a complete blob ---------------------------------------------------------

    def _index_covers_all(self) -> bool:
        return (self.expected is not None and self.fetcher.index_vouched
                and all(self.entry.trusted(i, self.expected[i]) for i in range(self.entry.nblocks)))

    def _maybe_verify(self) -> None:
        """A complete blob not yet checked whole is hashed once, unless a block index the
        manifest vouches for matched every block."""
        if self._verifying or self._whole_running or not self.entry.complete:
            return
        if self.entry.verified or self._index_covers_all():
            return
        self._verifying = True
        self._verify_done = trio.Event()
        self.fetcher._nursery.start_soon(self._verify)

    async def verified(self) -> bool:
        """Whether the blob is complete and vouched for, waiting for a check under way."""
        self._maybe_verify()
        if self._verifying:
            await self._verify_done.wait()
        return self.entry.complete and (self.entry.verified or self._index_covers_all())

    async def settle(self) -> bool:
        """For ``pull``: read every cached block back (dropping damaged ones), fetch what is
        missing, and check the blob; True once every block is on disk and vouched for."""
        for _ in range(3):
            dropped = await trio.to_thread.run_sync(self.entry.scrub)
            self.fetcher.counters.damaged_blocks += dropped
            missing = [i for i in range(self.entry.nblocks) if not self.servable(i)]
            if missing:
                await self.ensure(missing, foreground=False)
                await self.fetcher.flush()
            if self.entry.complete and await self.verified():
                return True
        return False

    async def _verify(self) -> None:
        try:
            matches, checks = await trio.to_thread.run_sync(self.entry.digest_matches)
            if matches:
                await trio.to_thread.run_sync(self.entry.mark_whole, checks)
            else:
                if self.expected is not None:
                    log.error("the block index of %s vouched for blocks of a blob that does not match its digest; "
                              "no longer trusting it for this blob", self.digest)
                    self.expected = None
                self._digest_mismatch()
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
