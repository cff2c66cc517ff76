"""A registry blob read whole, in order (whole mode: no trusted index): cached blocks are read
back (checked) and hashed, missing ones fetched by ranges and hashed as they arrive, on a
worker thread. The blocks are stored unverified and marked checked only once the blob matched
its digest; nothing of it is served before.

A blob that does not match is fetched again, ``WHOLE_ROUNDS`` passes at most (bytes flipped
on the way); a pass whose cache files were replaced under it (``cache prune``) starts again,
``REPLACED_ROUNDS`` at most, without failing the readers waiting for it.
"""

from __future__ import annotations

import hashlib
import logging

import trio

from ..errors import EXPECTED, CacheError, IntegrityError
from ..retry import REPLACED_ROUNDS, WHOLE_ROUNDS
from ..storage.store import FilesReplaced
from .context import FetchContext, call_soon
from .sink import PassSink
from .transfers import Transfers

log = logging.getLogger(__name__)


class WholePass:
    def __init__(self, ctx: FetchContext, transfers: Transfers) -> None:
        self.ctx, self.transfers = ctx, transfers

    def start(self, sink: PassSink) -> None:
        """A pass over the blob, unless one runs."""
        if not sink.pass_running:
            sink.begin_pass()
            self.ctx.spawn(self._run, sink)

    async def _run(self, sink: PassSink) -> None:
        failure: BaseException | None = None
        try:
            mismatches = replaced = 0
            while True:
                try:
                    if await self._fetch_whole(sink):
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
                log.warning("fetching %s again after its digest did not match", sink.digest)
            failure = IntegrityError(f"blob {sink.digest} does not match its digest ({WHOLE_ROUNDS} times); not serving it")
        except EXPECTED as exc:
            failure = exc
            self.ctx.stats.errors += 1
            log.error("giving up on %s: %s", sink.digest, exc)
        except Exception as exc:  # a bug: fail these reads, keep the daemon
            failure = exc
            log.exception("unexpected error fetching %s", sink.digest)
        finally:
            sink.end_pass(failure)

    async def _fetch_whole(self, sink: PassSink) -> bool:
        """One ordered pass: cached blocks are read (and checked) from disk, missing ones
        fetched; everything is hashed in order. True once the blob matched and its blocks
        are marked checked."""
        hasher = hashlib.sha256()
        checks: dict[int, int] = {}
        position = [0]  # the hasher holds every block before this one
        attempt = 0
        token = trio.lowlevel.current_trio_token()
        files = await trio.to_thread.run_sync(sink.files_id)

        def on_block(offset: int, data: memoryview) -> None:  # on the worker thread
            index = position[0]
            hasher.update(data)
            try:
                check = sink.store(index, data)
                if check is not None:
                    checks[index] = check
            except CacheError as exc:
                call_soon(token, self.ctx.cache_write_failed, exc)
            position[0] = index + 1
            call_soon(token, sink.tick, len(data))
            self.ctx.buffers.give_back(data)  # hashed and stored: nobody serves it before the blob checks out

        async with self.transfers.slots.held() as slot:
            while position[0] < sink.nblocks:
                if sink.stored(position[0]):
                    position[0] = await trio.to_thread.run_sync(self._hash_cached, sink, position[0], hasher, checks,
                                                                token)
                    sink.tick()
                    continue
                stop = position[0]
                while stop + 1 < sink.nblocks and not sink.stored(stop + 1):
                    stop += 1
                try:
                    self.ctx.stats.requests += 1
                    await self.transfers.fetch(sink.digest, position[0] * sink.block_size,
                                               [sink.block_length(i) for i in range(position[0], stop + 1)], on_block)
                    attempt = 0
                except EXPECTED as exc:
                    attempt += 1
                    async with slot.given_up():  # other runs use it while this one backs off
                        again = await self.ctx.retry.again(attempt, exc, f"{sink.digest} block {position[0]}")
                    if not again:
                        raise
        return await self._conclude(sink, hasher, checks, files)

    async def _conclude(self, sink: PassSink, hasher: hashlib._Hash, checks: dict[int, int],
                        files: tuple[int, int]) -> bool:
        if "sha256:" + hasher.hexdigest() != sink.digest or len(checks) != sink.nblocks:
            if len(checks) != sink.nblocks:
                raise CacheError(f"the cache could not keep every block of {sink.digest} (is its disk full?); "
                                 "without a block index it is served only once kept and checked whole")
            sink.digest_mismatch()
            return False
        replaced = await trio.to_thread.run_sync(sink.files_id) != files
        if replaced or not await trio.to_thread.run_sync(sink.mark_whole, checks):
            raise FilesReplaced(f"the cache files of {sink.digest} were replaced while it was checked whole")
        log.info("%s checked whole (%d bytes)", sink.digest, sink.size)
        return True

    @staticmethod
    def _hash_cached(sink: PassSink, index: int, hasher: hashlib._Hash, checks: dict[int, int],
                     token: trio.lowlevel.TrioToken) -> int:
        """Hash the cached blocks from ``index`` on (on a worker thread: a large cached prefix
        must not hold up the event loop); returns the first block not cached, or one that
        was damaged (dropped here, so it is fetched)."""
        while index < sink.nblocks and sink.stored(index):
            try:
                data, check = sink.read_stored(index)
            except CacheError as exc:
                call_soon(token, sink.damaged, index, exc)
                break
            hasher.update(data)
            checks[index] = check
            index += 1
        return index
