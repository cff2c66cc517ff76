"""Range requests into a block sink, on worker threads: the per-byte work of a mount.

The trio loop that answers FUSE only coordinates: it asks the control plane (httpx) where a
blob can be read (:class:`~modelfs.registry.ranges.BlobLocation`), hands the range to a
worker thread, and watches it. The worker receives each block into its own buffer
(``readinto``, no copies), and calls the sink, still on the worker, which checks the block
(BLAKE3 or sha256, GIL released), writes it to the cache (``pwrite``, GIL released) and only
then tells the loop that the block is there. So receiving, checking and storing run in
parallel on as many cores as there are workers, and a block reaches a reader only checked.

A transfer that delivers no block within the timeout is aborted (its socket shut down, so
the worker returns at once): a trickling server cannot hold a worker for hours. Cancelling
the fetch (unmount) aborts it the same way, so no worker outlives the mount's nursery.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from ..errors import TRANSIENT, CacheError, ConnectionLostError, FetchError, IntegrityError, UnavailableError
from ..registry import single_attempt
from ..registry.protocol import BlobLocator, RangeReader
from ..registry.ranges import BlobLocation, LocationMoved, LocationRejected, RangeRefused, Transfer
from .blobreader import BlobReader, call_soon, check_block
from .cache import REPLACED_ROUNDS, FilesReplaced, aligned_buffer
from .claims import PeerClaims, peer_wait
from .readahead import RequestSizer, plan_runs

if TYPE_CHECKING:
    from .fetcher import Fetcher

log = logging.getLogger(__name__)

WHOLE_ROUNDS = 3  # whole passes over a blob whose digest does not match before its reads fail

BlockSink = Callable[[int, memoryview], None]  # (position in the range, block); runs on the worker thread


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, as a container or cgroup sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class RangeFetcher:
    """The range requests of one mount: blob locations, worker threads, one watchdog over
    the transfers in flight, and the request sizing learned from how they went."""

    def __init__(self, client: BlobLocator, reader: RangeReader, repository: str, nursery: trio.Nursery, timeout: float,
                 workers: int, block_size: int, window_cap: int,
                 new_buffer: Callable[[int], memoryview] = aligned_buffer) -> None:
        self.client, self.reader, self.repository, self.timeout = client, reader, repository, timeout
        self.workers = max(1, workers)
        self.sizer = RequestSizer(block_size, self.workers, window_cap)
        # threads: a worker waiting on a slow connection costs nothing, so the slow-link
        # parallelism gets a thread per request even past the number of cores
        self.threads = trio.CapacityLimiter(max(self.workers, self.sizer.slow_parallel))
        self.slots = trio.CapacityLimiter(self.sizer.parallel)  # range requests in flight
        self._nursery = nursery
        self._new_buffer = new_buffer
        self._locations: dict[str, BlobLocation] = {}
        self._refused: set[str] = set()  # blobs whose next location comes from a probe of the registry
        self._active: set[Transfer] = set()
        self._watching = False
        self._emptied = trio.Event()

    def close(self) -> None:
        self.reader.close()

    async def location(self, digest: str) -> BlobLocation:
        """Where ``digest`` is read now: at first where the client would send the request,
        with no request of its own; after a refusal, what the registry answers to a probe
        (auth renewed, redirects followed). Reused until it expires or fails.

        Asked within the mount's timeout: the caller holds a request slot, and a probe (or the
        token fetch behind it) answered a byte at a time held every slot for as long as the
        trickle went on, long after the registry healed."""
        found = self._locations.get(digest)
        if found is None or time.monotonic() >= found.expires:
            with trio.move_on_after(self.timeout) as deadline:
                if digest in self._refused:
                    with single_attempt():  # the fetch that asked retries, by the one policy
                        found = await self.client.locate_blob(self.repository, digest)
                    self._refused.discard(digest)
                else:
                    found = await self.client.blob_location(self.repository, digest)
            if deadline.cancelled_caught or found is None:
                raise UnavailableError(f"{digest}: no answer from the registry on where to read it within "
                                       f"{self.timeout:g}s")
            self._locations[digest] = found
        return found

    def forget_locations(self) -> None:
        self._locations.clear()

    def _location_failed(self, digest: str, location: BlobLocation, exc: Exception) -> None:
        if self._locations.get(digest) is location:
            del self._locations[digest]
        if isinstance(exc, LocationRejected):
            self._refused.add(digest)
            return
        self.client.location_failed(location, exc)

    async def fetch(self, digest: str, start: int, lengths: Sequence[int], sink: BlockSink) -> None:
        """Receive bytes ``start`` .. ``start + sum(lengths)`` of ``digest`` block by block into
        ``sink`` on a worker thread, following redirects. Raises what the transfer met (the
        caller retries; the next attempt resolves the location again)."""
        location = await self.location(digest)
        started = time.monotonic()
        reprobed = False
        for _ in range(MAX_REDIRECTS):
            transfer = Transfer()
            self._active.add(transfer)
            if not self._watching:
                self._watching = True
                self._nursery.start_soon(self._watch)
            try:
                await trio.to_thread.run_sync(self.reader.read_range, location, start, lengths, sink, transfer, digest,
                                              self._new_buffer, limiter=self.threads)
                break
            except LocationMoved as moved:
                location = self._locations[digest] = self.client.moved_location(location, moved.url)
            except LocationRejected as exc:
                self._location_failed(digest, location, exc)
                if not location.redirected or reprobed:
                    raise
                # a presigned URL past its expiry, as storage says: ask the registry afresh, now
                log.info("%s; asking the registry where to read it again", exc)
                reprobed = True
                location = await self.location(digest)
            except (ConnectionLostError, RangeRefused) as exc:
                self._location_failed(digest, location, exc)
                if transfer.reason == CANCELLED:
                    await trio.lowlevel.checkpoint()  # unmounting: raise Cancelled, not a fetch error
                raise
            finally:
                self._active.discard(transfer)
                if not self._active:
                    self._emptied.set()
        else:
            raise FetchError(f"{digest}: more than {MAX_REDIRECTS} redirects for one range")
        self.sizer.record(sum(lengths), time.monotonic() - started)
        self.slots.total_tokens = self.sizer.parallel

    async def _watch(self) -> None:
        """Abort a transfer when no block of it arrived within the timeout, and every one when
        the mount's nursery is cancelled (unmount): either way its worker returns at once."""
        try:
            while self._active:
                self._emptied = trio.Event()
                with trio.move_on_after(min(1.0, self.timeout / 4)):
                    await self._emptied.wait()  # nothing left to watch: end now (a pull's nursery can close)
                now = time.monotonic()
                for transfer in list(self._active):
                    if now - transfer.last_progress > self.timeout:
                        transfer.abort(f"no block arrived within {self.timeout:g}s (server stalled or trickling)")
        except trio.Cancelled:
            for transfer in list(self._active):
                transfer.abort(CANCELLED)
            raise
        finally:
            self._watching = False


CANCELLED = "cancelled"
MAX_REDIRECTS = 5


class RangeSource:
    """Blocks of registry blobs, by range requests (:class:`~.blobreader.BlockSource`).

    - Index mode and lazy: missing blocks are cut into runs (:func:`plan_runs`, sized by the
      :class:`RequestSizer`), each one range request on a worker, every block checked there
      against the index before it is written and delivered. A failed run resumes after its
      last delivered block.
    - Whole mode: one pass over the blob in order. Cached blocks are read back (checked) and
      hashed, missing ones fetched and hashed as they arrive, on a worker thread; the blocks
      are stored unverified and marked checked only once the blob matched its digest.
    """

    checks_whole = False

    def __init__(self, fetcher: Fetcher, ranges: RangeFetcher) -> None:
        self.fetcher, self.ranges = fetcher, ranges

    def schedule(self, reader: BlobReader, blocks: list[int], for_reader: bool = True) -> None:
        if reader.whole_mode:
            if not reader.pass_running:
                generation = reader.begin_pass()
                self.fetcher.spawn(self._run_whole, reader, generation)
            return
        claimed = reader.claim(blocks)
        for first, last in plan_runs(claimed, self.ranges.sizer.run_blocks):
            self.fetcher.spawn(self._fetch_run, reader, first, last, for_reader)

    # -- runs (index mode, lazy) ----------------------------------------------------------

    async def _fetch_run(self, reader: BlobReader, first: int, last: int, for_reader: bool) -> None:
        position = [first]  # next block not delivered; advanced on the worker thread
        attempt = 0
        try:
            async with self.ranges.slots:
                with contextlib.closing(_RunClaims(reader)) as claims:
                    while position[0] <= last:
                        while position[0] <= last and reader.settle_present(position[0]):
                            position[0] += 1
                        if position[0] > last:
                            break
                        start = position[0]
                        stop = await claims.claim(start, last)
                        if stop is None:
                            continue  # another process fetched it (or let go): look in the cache again
                        try:
                            await self._receive_run(reader, position, stop, for_reader)
                        except Exception as exc:
                            # a worker that failed, for whatever reason (a bug included), is
                            # replaced by the next attempt; what it delivered stays delivered
                            if not isinstance(exc, TRANSIENT):
                                log.exception("worker fetching %s blocks %d-%d failed", reader.digest, position[0], last)
                            attempt += 1
                            if not await self.fetcher.retry_or_give_up(attempt, exc, f"{reader.digest} block {position[0]}"):
                                self.fetcher.give_up(reader, range(position[0], last + 1), exc)
                                return
                        finally:
                            claims.release(start, stop)
        except Exception as exc:  # a bug or an unexpected error: fail these reads, keep the daemon
            log.exception("unexpected error fetching %s blocks %d-%d", reader.digest, first, last)
            reader.fail(range(first, last + 1), exc)
        finally:  # cancelled (unmounting): no reader may wait on these blocks for ever
            if any(reader.in_flight(i) for i in range(first, last + 1)):
                log.debug("blocks %d-%d of %s not fetched: unmounting", first, last, reader.digest)
                reader.fail(range(first, last + 1), FetchError("fetch cancelled"))

    async def _receive_run(self, reader: BlobReader, position: list[int], last: int, for_reader: bool) -> None:
        entry = reader.entry
        first = position[0]
        token = trio.lowlevel.current_trio_token()

        def sink(offset: int, data: memoryview) -> None:  # on the worker thread
            index = first + offset
            index_hash = check_block(reader, index, data, token)
            write_error = None
            try:
                reader.store(index, data, index_hash)
            except CacheError as exc:
                write_error = exc
            call_soon(token, reader.deliver, index, data, write_error, for_reader)
            position[0] = index + 1

        self.fetcher.stats.requests += 1
        await self.ranges.fetch(reader.digest, first * entry.block_size,
                                [entry.block_length(i) for i in range(first, last + 1)], sink)

    # -- whole mode -----------------------------------------------------------------------

    async def _run_whole(self, reader: BlobReader, generation: int) -> None:
        failure: BaseException | None = None
        try:
            mismatches = replaced = 0
            while True:
                try:
                    if await self._fetch_whole(reader):
                        return
                except FilesReplaced as exc:  # pruned under the check: check again, readers keep waiting
                    replaced += 1
                    if replaced >= REPLACED_ROUNDS:
                        raise
                    log.info("%s; checking it again", exc)
                    continue
                mismatches += 1  # bytes flipped on the way: fetched again, a bounded number of times
                if mismatches >= WHOLE_ROUNDS:
                    break
                log.warning("fetching %s again after its digest did not match", reader.digest)
            failure = IntegrityError(f"blob {reader.digest} does not match its digest ({WHOLE_ROUNDS} times); not serving it")
        except TRANSIENT as exc:
            failure = exc
            self.fetcher.stats.errors += 1
            log.error("giving up on %s: %s", reader.digest, exc)
        except Exception as exc:  # a bug: fail these reads, keep the daemon
            failure = exc
            log.exception("unexpected error fetching %s", reader.digest)
        finally:
            reader.end_pass(failure)

    async def _fetch_whole(self, reader: BlobReader) -> bool:
        """One ordered pass: cached blocks are read (and checked) from disk, missing ones
        fetched; everything is hashed in order. True once the blob matched and its blocks
        are marked checked."""
        entry = reader.entry
        hasher = hashlib.sha256()
        checks: dict[int, int] = {}
        position = [0]  # the hasher holds every block before this one
        attempt = 0
        token = trio.lowlevel.current_trio_token()
        files = await trio.to_thread.run_sync(entry.files_id)

        def sink(offset: int, data: memoryview) -> None:  # on the worker thread
            index = position[0]
            hasher.update(data)
            try:
                check = reader.store(index, data)
                if check is not None:
                    checks[index] = check
            except CacheError as exc:
                call_soon(token, self.fetcher.cache_write_failed, exc)
            position[0] = index + 1
            call_soon(token, reader.tick, len(data))
            self.fetcher.buffers.give_back(data)  # hashed and stored: nobody serves it before the blob checks out

        async with self.ranges.slots:
            while position[0] < entry.nblocks:
                if entry.has(position[0]):
                    position[0] = await trio.to_thread.run_sync(self._hash_cached, reader, position[0], hasher, checks, token)
                    reader.tick()
                    continue
                stop = position[0]
                while stop + 1 < entry.nblocks and not entry.has(stop + 1):
                    stop += 1
                try:
                    self.fetcher.stats.requests += 1
                    await self.ranges.fetch(reader.digest, position[0] * entry.block_size,
                                            [entry.block_length(i) for i in range(position[0], stop + 1)], sink)
                    attempt = 0
                except TRANSIENT as exc:
                    attempt += 1
                    if not await self.fetcher.retry_or_give_up(attempt, exc, f"{reader.digest} block {position[0]}"):
                        raise
        if "sha256:" + hasher.hexdigest() != entry.digest or len(checks) != entry.nblocks:
            if len(checks) != entry.nblocks:
                raise CacheError(f"the cache could not keep every block of {reader.digest} (is its disk full?); "
                                 "without a block index it is served only once kept and checked whole")
            reader.digest_mismatch()
            return False
        replaced = await trio.to_thread.run_sync(entry.files_id) != files
        if replaced or not await trio.to_thread.run_sync(entry.mark_whole, checks):
            raise FilesReplaced(f"the cache files of {reader.digest} were replaced while it was checked whole")
        log.info("%s checked whole (%d bytes)", reader.digest, reader.size)
        return True

    @staticmethod
    def _hash_cached(reader: BlobReader, index: int, hasher: hashlib._Hash, checks: dict[int, int],
                     token: trio.lowlevel.TrioToken) -> int:
        """Hash the cached blocks from ``index`` on (on a worker thread: a large cached prefix
        must not hold up the event loop); returns the first block not cached, or one that
        was damaged (dropped here, so it is fetched)."""
        entry = reader.entry
        while index < entry.nblocks and entry.has(index):
            try:
                data, check = entry.read_checked(index)
            except CacheError as exc:
                call_soon(token, reader.damaged, index, exc)
                break
            hasher.update(data)
            checks[index] = check
            index += 1
        return index


class _RunClaims:
    """The claims of one run on blocks other processes may be fetching (see claims.py): a
    peer is waited on for :func:`~.claims.peer_wait` of the mount's timeout in all per run,
    then ignored. Without a claims file (it cannot be opened) the run fetches regardless."""

    def __init__(self, reader: BlobReader) -> None:
        self.digest = reader.digest
        self.claims: PeerClaims | None = None
        self.patience: float | None = None  # when waiting on peers ends
        self.wait = peer_wait(reader.fetcher.policy.timeout)
        try:
            self.claims = PeerClaims(reader.entry.claims_path)
        except OSError as exc:
            log.debug("no claims file for %s (%s): fetching without looking at other processes", self.digest, exc)

    async def claim(self, start: int, last: int) -> int | None:
        """The last block of ``start..last`` to fetch now, or None: look in the cache again."""
        if self.claims is None:
            return last
        stop = self.claims.take(start, last)
        if stop >= start:
            return stop
        if self.patience is None:
            self.patience = trio.current_time() + self.wait
        if await self.claims.wait_for_peer(start, self.patience):
            return None
        log.info("another process has held block %d of %s for over %gs; fetching the rest of this run anyway",
                 start, self.digest, self.wait)
        self.close()
        return last

    def release(self, start: int, stop: int) -> None:
        if self.claims is not None and stop >= start:
            self.claims.release(start, stop)

    def close(self) -> None:
        if self.claims is not None:
            self.claims.close()
            self.claims = None
