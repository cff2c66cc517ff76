"""The side of a :class:`~.blobreader.BlobReader` its source feeds: the one implementation of
:class:`~.sink.ReaderSink`. Every block and every pass goes through the reader's trust here:
a fetched block is checked before it is stored or delivered, a block another process cached
is adopted only once it matched, and nothing reaches a reader that the trust does not let it
see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio

from ..errors import CacheError, IntegrityError
from .blob import HeldBlob, OfBlob
from .context import call_soon
from .flights import BlockFlights
from .passes import WholePasses
from .trust import Block, Mode
from .wholecheck import WholeCheck


class BlobFeed(OfBlob):
    def __init__(self, blob: HeldBlob, flights: BlockFlights, passes: WholePasses, check: WholeCheck,
                 expected_soon: Callable[[int], bool] = lambda index: False) -> None:
        self.blob, self.flights, self.passes, self.check = blob, flights, passes, check
        self.expected_soon = expected_soon  # a reader's stream reads this block next (its read-ahead says)
        self.ctx = blob.ctx
        self._token = trio.lowlevel.current_trio_token()

    # -- the blob's shape and trust -------------------------------------------------------


    @property
    def block_size(self) -> int:
        return self.blob.entry.block_size

    @property
    def claims_path(self) -> str:
        return self.blob.entry.claims_path

    @property
    def serves_unchecked(self) -> bool:
        return self.blob.trust.serves_unchecked

    @property
    def verified(self) -> bool:
        return self.blob.entry.verified

    def servable(self, index: int) -> bool:
        """Whether block ``index`` may be shown to a reader now (held checked in memory, or on
        disk with the trust this mount requires; its bytes are checked again when read)."""
        if self.blob.in_memory(index):
            return True
        if self.flights.in_flight(index):
            return False  # being fetched: not worth a look at the disk map
        return self.blob.trust.accepts(self.blob.entry, index)

    # -- block by block (index mode, lazy) ------------------------------------------------

    def claim(self, blocks: Iterable[int]) -> list[int]:
        return self.flights.claim(blocks, lambda index: not self.servable(index))

    def in_flight(self, index: int) -> bool:
        return self.flights.in_flight(index)

    def settle_present(self, index: int) -> bool:
        if not self.servable(index):
            blob = self.blob
            if blob.trust.mode is not Mode.INDEX or not blob.entry.has(index):
                return False
            verdict = blob.match_cached(index)
            if verdict is not True:
                if isinstance(verdict, BaseException):
                    blob.foreign_block_wrong(index, verdict)
                return False
        self._arrived(index, 0, False)
        return True

    def receive(self, index: int, data: memoryview, for_reader: bool) -> None:
        trust = self.blob.trust
        index_hash = trust.index_hash(data)
        if index_hash is not None and not trust.matches(index, index_hash):
            call_soon(self._token, self.ctx.wrong_bytes, f"block {index} of {self.digest}", True)
            raise IntegrityError(f"block {index} of {self.digest} does not match the block index")
        write_error = None
        try:
            self.blob.store(index, data, index_hash)
        except CacheError as exc:
            write_error = exc
        call_soon(self._token, self._delivered, index, data, write_error, for_reader, True)

    def deliver(self, index: int, data: Block, for_reader: bool = True, fetched: bool = True) -> None:
        self._delivered(index, data, None, for_reader, fetched)

    def _delivered(self, index: int, data: Block, write_error: CacheError | None, for_reader: bool,
                   fetched: bool) -> None:
        """Held in memory for a reader that wants it soon (it asked, or one of its streams
        reads it next: prefetch follows a reader and fetches just ahead of it), or that the
        cache could not give it (``write_error``); else let go at once, and read back from
        disk when wanted. ``fetched``: count its bytes as fetched (a compressed layer's
        stream counts its own)."""
        if not self.blob.trust.per_block:  # the index was found wrong while this block was on its way
            self.fail([index], IntegrityError(f"block {index} of {self.digest} is served only once its blob is "
                                              "checked whole"))
            self.ctx.buffers.give_back(data)
            return
        if write_error is not None:
            self.ctx.cache_write_failed(write_error)
        self._arrived(index, len(data), fetched)
        if for_reader or write_error is not None or self.expected_soon(index):
            self.ctx.recent.put(self.digest, index, data)
        else:
            self.ctx.buffers.give_back(data)  # last: the view is released there
        if self.blob.entry.complete_here:  # cheap: the full check reads the disk map
            self.check.maybe_start()

    def _arrived(self, index: int, size: int, fetched: bool) -> None:
        if fetched:
            self.ctx.stats.bytes_fetched += size
        self.flights.arrived(index)

    def fail(self, blocks: Iterable[int], exc: BaseException) -> None:
        self.flights.fail(blocks, exc)

    def fail_pending(self, exc: BaseException) -> None:
        self.flights.fail(self.flights.pending(), exc)

    # -- passes over the whole blob -------------------------------------------------------

    @property
    def pass_running(self) -> bool:
        return self.passes.running

    def begin_pass(self) -> int:
        return self.passes.begin()

    def tick(self, fetched: int = 0) -> None:
        self.ctx.stats.bytes_fetched += fetched
        self.passes.tick()

    def end_pass(self, failure: BaseException | None) -> None:
        self.passes.end(failure)
        if failure is not None:
            self.fail_pending(failure)

    def stored(self, index: int) -> bool:
        return self.blob.entry.has(index)

    def store(self, index: int, data: Block, index_hash: bytes | None = None) -> int | None:
        return self.blob.store(index, data, index_hash)

    def read_stored(self, index: int) -> tuple[bytes, int]:
        return self.blob.entry.read_checked(index)

    def files_id(self) -> tuple[int, int]:
        return self.blob.entry.files_id()

    def mark_whole(self, checks: dict[int, int]) -> bool:
        return self.blob.entry.mark_whole(checks)

    def damaged(self, index: int, exc: Exception) -> None:
        self.blob.damaged(index, exc)

    def digest_mismatch(self) -> None:
        self.blob.digest_mismatch()

    def drop(self) -> None:
        self.blob.drop()

    # -- what a compressed layer's stream also needs --------------------------------------

    def held_checked(self) -> bool:
        entry, expected = self.blob.entry, self.blob.trust.expected
        return all(entry.trusted(i, expected[i] if expected else None) for i in range(entry.nblocks))

    def reload_stored(self) -> int:
        entry = self.blob.entry
        entry.reload()
        return sum(1 for i in range(entry.nblocks) if entry.entry_at(i).present)

    def peer_progress(self) -> None:
        if self.blob.trust.serves_unchecked:
            for index in self.flights.pending():
                if self.blob.entry.entry_at(index).present:
                    self._arrived(index, 0, False)
        self.passes.tick()
