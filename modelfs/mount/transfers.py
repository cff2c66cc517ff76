"""Range requests on worker threads, each into a block sink: the per-byte work of a mount.

The trio loop that answers FUSE only coordinates: it asks the control plane (httpx) where a
blob can be read (:class:`~modelfs.registry.ranges.BlobLocation`), hands the range to a
worker thread, and watches it. The worker receives each block into its own buffer
(``readinto``, no copies), and calls the sink, still on the worker, which checks the block
(BLAKE3 or sha256, GIL released), writes it to the cache (``pwrite``, GIL released) and only
then tells the loop that the block is there. So receiving, checking and storing run in
parallel on as many cores as there are workers, and a block reaches a reader only checked.

A transfer that delivers no block within the stall window is aborted (its socket shut down,
so the worker returns at once): a trickling server cannot hold a worker for hours. The
watchdog reads trio's clock (a test's virtual one), the workers too when they mark progress. Cancelling
the fetch (unmount) aborts it the same way, so no worker outlives the mount's nursery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import trio

from ..errors import ConnectionLostError, FetchError, IntegrityError, RegistryError, UnavailableError
from ..registry.protocol import BlobLocator, OnBlock, RangeReader
from ..registry.ranges import BlobLocation, LocationMoved, LocationRejected, Transfer
from ..retry import ONE_ATTEMPT, RANGE_REDIRECTS
from ..storage.direct import aligned_buffer
from .readahead import RequestSizer
from .slots import RequestSlots

log = logging.getLogger(__name__)

CANCELLED = "cancelled"


class Transfers:
    """The range requests of one mount: blob locations, worker threads, one watchdog over
    the transfers in flight, and the request sizing learned from how they went."""

    def __init__(self, client: BlobLocator, reader: RangeReader, repository: str, spawn: Callable[..., None],
                 workers: int, block_size: int, window_cap: int, *, stall_window: float, lookup_deadline: float,
                 new_buffer: Callable[[int], memoryview] = aligned_buffer) -> None:
        self.client, self.reader, self.repository = client, reader, repository
        self.stall_window, self.lookup_deadline = stall_window, lookup_deadline
        self._clock = trio.lowlevel.current_clock()
        self.workers = max(1, workers)
        self.sizer = RequestSizer(block_size, self.workers, window_cap)
        # threads: a worker waiting on a slow connection costs nothing, so the slow-link
        # parallelism gets a thread per request even past the number of cores
        self.threads = trio.CapacityLimiter(max(self.workers, self.sizer.slow_parallel))
        self.slots = RequestSlots(self.sizer.parallel)  # range requests in flight, reads first
        self._spawn = spawn  # the mount's nursery: the watchdog is cancelled with it
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

        Asked within the read deadline: the caller holds a request slot, and a probe (or the
        token fetch behind it) answered a byte at a time held every slot for as long as the
        trickle went on, long after the registry healed."""
        found = self._locations.get(digest)
        if found is None or time.monotonic() >= found.expires:
            with trio.move_on_after(self.lookup_deadline) as deadline:
                if digest in self._refused:
                    # sent once: the fetch that asked retries, by the one policy
                    found = await self.client.locate_blob(self.repository, digest, retry=ONE_ATTEMPT)
                    self._refused.discard(digest)
                else:
                    found = await self.client.blob_location(self.repository, digest)
            if deadline.cancelled_caught or found is None:
                raise UnavailableError(f"{digest}: no answer from the registry on where to read it within "
                                       f"{self.lookup_deadline:g}s")
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

    async def fetch(self, digest: str, start: int, lengths: Sequence[int], on_block: OnBlock) -> None:
        """Receive bytes ``start`` .. ``start + sum(lengths)`` of ``digest`` block by block into
        ``on_block`` on a worker thread, following redirects. Raises what the transfer met (the
        caller retries; the next attempt resolves the location again)."""
        location = await self.location(digest)
        started = time.monotonic()
        reprobed = False
        for _ in range(RANGE_REDIRECTS):
            transfer = Transfer(self._clock.current_time)
            self._active.add(transfer)
            if not self._watching:
                self._watching = True
                self._spawn(self._watch)
            try:
                await trio.to_thread.run_sync(self.reader.read_range, location, start, lengths, on_block, transfer, digest,
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
            except (ConnectionLostError, RegistryError, IntegrityError) as exc:
                # the source failed this range, however (it refused, dropped the connection,
                # answered another range or more bytes than asked): a mirror is left out a
                # while, and the retry reads from the next source
                self._location_failed(digest, location, exc)
                if transfer.reason == CANCELLED:
                    await trio.lowlevel.checkpoint()  # unmounting: raise Cancelled, not a fetch error
                raise
            finally:
                self._active.discard(transfer)
                if not self._active:
                    self._emptied.set()
        else:
            raise FetchError(f"{digest}: more than {RANGE_REDIRECTS} redirects for one range")
        self.sizer.record(sum(lengths), time.monotonic() - started)
        self.slots.total_tokens = self.sizer.parallel

    async def _watch(self) -> None:
        """Abort a transfer when no block of it arrived within the stall window, and every one when
        the mount's nursery is cancelled (unmount): either way its worker returns at once."""
        try:
            while self._active:
                self._emptied = trio.Event()
                with trio.move_on_after(min(1.0, self.stall_window / 4)):
                    await self._emptied.wait()  # nothing left to watch: end now (a pull's nursery can close)
                now = self._clock.current_time()
                for transfer in list(self._active):
                    if now - transfer.last_progress > self.stall_window:
                        transfer.abort(f"no block arrived within {self.stall_window:g}s (server stalled or trickling)")
        except trio.Cancelled:
            for transfer in list(self._active):
                transfer.abort(CANCELLED)
            raise
        finally:
            self._watching = False
