"""Blocks of a registry blob fetched run by run (index mode and lazy): missing blocks are cut
into runs (:func:`~.readahead.plan_runs`, sized by the :class:`~.readahead.RequestSizer`),
each one range request on a worker thread (:class:`~.transfers.Transfers`), every block
checked there against the reader's trust before it is written and delivered
(:meth:`~.sink.BlockSink.receive`).

A failed run resumes after its last delivered block: what a dead worker delivered stays
delivered. Other processes fetching the same blocks are waited on through their claims
(claims.py), for a share of the read deadline at most.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from ..errors import EXPECTED, FetchError
from ..storage.claims import PeerClaims, peer_wait
from .context import FetchContext
from .readahead import plan_runs
from .sink import BlockSink
from .transfers import Transfers

log = logging.getLogger(__name__)


class RangeRuns:
    def __init__(self, ctx: FetchContext, transfers: Transfers) -> None:
        self.ctx, self.transfers = ctx, transfers

    def schedule(self, sink: BlockSink, blocks: list[int], for_reader: bool = True) -> None:
        claimed = sink.claim(blocks)
        for first, last in plan_runs(claimed, self.transfers.sizer.run_blocks):
            self.ctx.spawn(self._fetch_run, sink, first, last, for_reader)

    async def _fetch_run(self, sink: BlockSink, first: int, last: int, for_reader: bool) -> None:
        position = [first]  # next block not delivered; advanced on the worker thread
        attempt = 0
        try:
            async with self.transfers.slots.held(for_reader) as slot:
                with contextlib.closing(_RunClaims(sink, self.ctx.read_deadline)) as claims:
                    while position[0] <= last:
                        while position[0] <= last and sink.settle_present(position[0]):
                            position[0] += 1
                        if position[0] > last:
                            break
                        start = position[0]
                        stop = await claims.claim(start, last)
                        if stop is None:
                            continue  # another process fetched it (or let go): look in the cache again
                        try:
                            await self._receive_run(sink, position, stop, for_reader)
                        except Exception as exc:
                            # a worker that failed, for whatever reason (a bug included), is
                            # replaced by the next attempt; what it delivered stays delivered
                            if not isinstance(exc, EXPECTED):
                                log.exception("worker fetching %s blocks %d-%d failed", sink.digest, position[0], last)
                            attempt += 1
                            async with slot.given_up():  # another run may use it meanwhile (a read first)
                                again = await self.ctx.retry.again(attempt, exc, f"{sink.digest} block {position[0]}")
                            if not again:
                                self.ctx.retry.give_up(sink, range(position[0], last + 1), exc)
                                return
                        finally:
                            claims.release(start, stop)
        except Exception as exc:  # a bug or an unexpected error: fail these reads, keep the daemon
            log.exception("unexpected error fetching %s blocks %d-%d", sink.digest, first, last)
            sink.fail(range(position[0], last + 1), exc)
        finally:  # cancelled (unmounting): no reader may wait on these blocks for ever
            # Only the blocks this run still owes (from ``position`` on): one it delivered may
            # have been dropped and claimed again since (read back damaged, on the loop, before
            # this task got here), and that fetch is another run's to end, not this one's.
            owed = range(position[0], last + 1)
            if any(sink.in_flight(i) for i in owed):
                log.debug("blocks %d-%d of %s not fetched: unmounting", owed.start, last, sink.digest)
                sink.fail(owed, FetchError("fetch cancelled"))

    async def _receive_run(self, sink: BlockSink, position: list[int], last: int, for_reader: bool) -> None:
        first = position[0]

        def on_block(offset: int, data: memoryview) -> None:  # on the worker thread
            sink.receive(first + offset, data, for_reader)
            position[0] = first + offset + 1

        self.ctx.stats.requests += 1
        await self.transfers.fetch(sink.digest, first * sink.block_size,
                                   [sink.block_length(i) for i in range(first, last + 1)], on_block)


class _RunClaims:
    """The claims of one run on blocks other processes may be fetching (see claims.py): a
    peer is waited on for :func:`~.claims.peer_wait` of the read deadline in all per run,
    then ignored. Without a claims file (it cannot be opened) the run fetches regardless."""

    def __init__(self, sink: BlockSink, read_deadline: float) -> None:
        self.digest = sink.digest
        self.claims: PeerClaims | None = None
        self.patience: float | None = None  # when waiting on peers ends
        self.wait = peer_wait(read_deadline)
        try:
            self.claims = PeerClaims(sink.claims_path)
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
