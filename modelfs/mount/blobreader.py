"""Waiting for blocks and serving them: one :class:`BlobReader` per blob (or per file of a
compressed layer), on the trio loop that answers FUSE.

What a reader may see is decided per blob, once, by what vouches for its bytes: its
:class:`~.trust.Trust` (doc/INTEGRITY.md), which every path here consults:

- **index mode** (a block index the mount trusts): each block is matched against the index
  before it is served or cached, whatever ``--verify`` says; a block already cached but not
  matched under this index (stored by a lazy mount, a killed pull) is hashed from disk and
  adopted, or dropped.
- **whole mode** (no trusted index, the default): the blob is read once, in order, hashed
  whole, and no byte of it is served until the hash matches its digest. Readers wait for
  that (their deadline moves with the pass's progress).
- **lazy** (``--verify lazy``, opt-in, only for blobs without a trusted index): served
  unverified, then checked whole once complete.

Bytes that are dropped (a blob that fails its digest, a stream that fails, a damaged or
foreign block) leave by one path, :meth:`BlobReader.drop`: from the cache, from memory and,
if any were served, from the kernel's page cache of every file they were served as.

Where blocks come from is not the reader's business: a :class:`BlockSource` gets them (range
requests on worker threads, :mod:`.rangefetch`; or the stream of a compressed layer,
:mod:`.stream`) and hands them back through :meth:`BlobReader.deliver` and the pass calls.
The reader keeps the single flight (one ``trio.Event`` per block being fetched, all its
readers wait on it), the read-ahead (:mod:`.readahead`) and the deadlines: a read that waited
``timeout`` fails with EIO, and so, at once, does a read of the same block while that fetch
still runs (the kernel's retry of a failed readahead does not wait a second time).

Every block read back from the cache is checked against its stored checksum
(:mod:`.cache`); one that fails is dropped and fetched again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import trio

from ..errors import CacheError, FetchError, IntegrityError
from ..formats.blockindex import ALGORITHMS
from ..storage.entry import BlobEntry
from ..storage.store import BlockDamaged
from .readahead import ReadAhead
from .trust import Mode, Trust

if TYPE_CHECKING:
    from .fetcher import Fetcher

log = logging.getLogger(__name__)

# The kernel retries a page whose readahead failed at once: a read of the same block that
# comes this soon after another gave up on its fetch fails at once too, instead of waiting a
# second full timeout. A later read (an application retrying) waits again.
KERNEL_RETRY_WINDOW = 0.5

Block = bytes | bytearray | memoryview


class BlockSource(Protocol):
    """Gets blocks for readers. ``checks_whole``: the source itself checks what it delivers
    against the blob's digest (a compressed layer's stream), so the reader never hashes the
    blob again once complete."""

    checks_whole: bool

    def schedule(self, reader: BlobReader, blocks: list[int], for_reader: bool = True) -> None:
        """Start getting ``blocks`` (or, in whole mode, the pass that makes them servable).
        ``for_reader``: a reader wants them soon (held in memory until read), not prefetch."""


class BlobReader:
    def __init__(self, fetcher: Fetcher, entry: BlobEntry, source: BlockSource, expected: list[bytes] | None = None,
                 block_hash: Callable[[Block], bytes] | None = None) -> None:
        self.fetcher, self.entry, self.source = fetcher, entry, source
        self.stats = fetcher.stats
        self.trust = Trust.decide(expected, block_hash or ALGORITHMS["sha256"], fetcher.index_vouched, fetcher.lazy)
        self._served = False  # bytes went to a reader (the kernel may hold them) since the last drop
        self.block_size = entry.block_size
        self.readahead = ReadAhead(entry.block_size, entry.nblocks, fetcher.policy.readahead_max)
        self._inflight: dict[int, trio.Event] = {}
        self._failures: dict[int, BaseException] = {}
        self._timed_out: dict[int, tuple[trio.Event, float]] = {}  # a reader gave up on this fetch, and when
        self._verifying = False
        self._verify_done = trio.Event()
        # passes over the whole blob (whole mode, a layer stream): nothing served before one matches
        self.pass_running = False
        self.pass_generation = 0
        self._pass_outcome: tuple[int, BaseException | None] = (0, None)
        self._stalled: tuple[int, float] = (-1, 0.0)  # pass a reader gave up on, and when
        self._changed = trio.Event()  # set (and replaced) on every block of a pass's progress
        self._progress = 0

    @property
    def digest(self) -> str:
        return self.entry.digest

    @property
    def size(self) -> int:
        return self.entry.size

    @property
    def expected(self) -> list[bytes] | None:
        """Hash per block, from the block index this reader trusts (None: no index)."""
        return self.trust.expected

    @property
    def whole_mode(self) -> bool:
        """No trusted index and not lazy: bytes are served only once the blob checked whole."""
        return self.trust.mode is Mode.WHOLE

    @property
    def busy(self) -> bool:
        return bool(self._inflight) or self.pass_running or self._verifying

    def servable(self, index: int) -> bool:
        """Whether block ``index`` may be shown to a reader now (held checked in memory, or on
        disk with the trust this mount requires; its bytes are checked again when read)."""
        if (self.entry.digest, index) in self.fetcher.recent:
            return True
        if index in self._inflight:
            return False  # being fetched: not worth a look at the disk map
        return self.trust.accepts(self.entry, index)

    def _block(self, index: int) -> Block:
        data = self.fetcher.recent.get(self.entry.digest, index)
        return data if data is not None else self.entry.read_block(index)

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
        bs = self.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        if not self.whole_mode:
            self.readahead.max_blocks = self.fetcher.readahead_blocks
            ahead = self.readahead.after_read(offset, size)
            if ahead:
                self.source.schedule(self, [i for i in ahead if not self.servable(i)])
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
        self._served = True
        if len(parts) == 1:
            block = parts[0]
            return block if start == 0 and size == len(block) else memoryview(block)[start:start + size]
        return b"".join(parts)[start:start + size]

    def _blocks(self, first: int, last: int) -> list[Block] | None:
        parts = []
        for index in range(first, last + 1):
            try:
                parts.append(self._block(index))
            except BlockDamaged as exc:
                self.damaged(index, exc)
                return None
            except CacheError:  # gone meanwhile (evicted or cleared by another process): fetch again
                return None
        return parts

    def damaged(self, index: int, exc: Exception) -> None:
        """A cached block did not read back: drop it, so it is fetched again."""
        self.stats.damaged_blocks += 1
        log.warning("%s; fetching it again", exc)
        self.drop([index])

    def drop(self, blocks: Iterable[int] | None = None, evicted: bool = False) -> None:
        """The one way bytes of this blob leave (``blocks``, or all of it): from the cache
        (replaced files for the whole blob, so another process holding the old ones notices),
        from memory, and, if this reader served any bytes since the last drop, from the
        kernel's pages of every file they were served as (raw, tar member or file of a
        compressed layer alike: the FUSE layer maps this reader's key back to its inodes).

        ``evicted``: the cache already removed the files to free space; nothing was found
        wrong, so what the kernel holds is as right as it was and stays (it would otherwise
        be fetched again from the registry, the cache limit being about disk, not memory)."""
        which = None if blocks is None else list(blocks)
        if not evicted:
            try:
                if which is None:
                    self.entry.clear()
                else:
                    for index in which:
                        self.entry.forget(index)
            except CacheError as exc:
                log.error("%s", exc)
        self.fetcher.recent.drop(self.digest, which)
        if self._served and not evicted:
            self._served = False
            self.fetcher.pages_stale(self.digest)

    # -- waiting --------------------------------------------------------------------------

    async def ensure(self, blocks: list[int], foreground: bool = True) -> None:
        """Make ``blocks`` servable, fetching what is missing."""
        if foreground:
            self.fetcher.foreground(+1)
        try:
            if self.whole_mode:
                await self._ensure_whole(blocks)
            else:
                await self._ensure_blocks(blocks, foreground)
        finally:
            if foreground:
                self.fetcher.foreground(-1)

    async def _ensure_blocks(self, blocks: list[int], foreground: bool) -> None:
        self.source.schedule(self, blocks, foreground)
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

    async def _ensure_whole(self, blocks: list[int]) -> None:
        """Wait for the blob to be checked whole. The deadline moves while the pass makes
        progress: a large blob on a slow link is not a stalled one. Every reader waiting on a
        pass that fails gets its error; a later read starts a new pass."""
        timeout = self.fetcher.policy.timeout
        for _ in range(3):
            if all(self.servable(i) for i in blocks):
                return
            self.source.schedule(self, blocks)
            generation = self.pass_generation
            while self.pass_running and self.pass_generation == generation:
                if self._stalled[0] == generation and trio.current_time() - self._stalled[1] < KERNEL_RETRY_WINDOW:
                    raise FetchError(f"{self.digest}: its fetch has already made no progress for {timeout:g}s")
                seen = self._progress
                with trio.move_on_after(timeout):
                    await self._changed.wait()
                if self._progress == seen:
                    self._stalled = (generation, trio.current_time())
                    raise FetchError(f"timed out after {timeout:g}s waiting for {self.digest} (no progress)")
            failed_generation, failure = self._pass_outcome
            if failed_generation == generation and failure is not None:
                raise FetchError(f"cannot fetch {self.digest}: {failure}")
        if not all(self.servable(i) for i in blocks):
            raise FetchError(f"{self.digest} was checked but could not be kept long enough to serve it")

    # -- what sources call ----------------------------------------------------------------

    def claim(self, blocks: Iterable[int]) -> list[int]:
        """The blocks of ``blocks`` nobody fetches yet and that are not servable, now marked
        in flight (their readers wait on one event each)."""
        claimed = []
        for index in blocks:
            if index not in self._inflight and not self.servable(index):
                self._inflight[index] = trio.Event()
                self._failures.pop(index, None)
                claimed.append(index)
        self.stats.inflight_blocks += len(claimed)
        return claimed

    def deliver(self, index: int, data: Block, write_error: CacheError | None = None, for_reader: bool = True,
                fetched: bool = True) -> None:
        """A block that this reader's trust lets readers see now is here (matched against the
        index; or unchecked, where the trust serves blobs lazily), and was written to the
        cache (or could not be: ``write_error``). Held in memory for a reader that wants it
        soon, or that the cache could not give it. ``fetched``: count its bytes as fetched
        (a compressed layer's stream counts its own)."""
        if not self.trust.per_block:  # the index was found wrong while this block was on its way
            self.fail([index], IntegrityError(f"block {index} of {self.digest} is served only once its blob is "
                                              "checked whole"))
            self.fetcher.buffers.give_back(data)
            return
        if write_error is not None:
            self.fetcher.cache_write_failed(write_error)
        self.arrived(index, len(data), fetched)
        if for_reader or write_error is not None:
            self.fetcher.recent.put(self.entry.digest, index, data)
        else:
            self.fetcher.buffers.give_back(data)  # last: the view is released there
        if self.entry.complete_here:  # cheap: the full check reads the disk map
            self._maybe_verify()

    def arrived(self, index: int, size: int, fetched: bool) -> None:
        if fetched:
            self.stats.bytes_fetched += size
        event = self._inflight.pop(index, None)
        self._timed_out.pop(index, None)
        if event is not None:
            self.stats.inflight_blocks -= 1
            event.set()

    def fail(self, blocks: Iterable[int], exc: BaseException) -> None:
        """Wake the readers of ``blocks`` still in flight with ``exc``."""
        for index in blocks:
            event = self._inflight.pop(index, None)
            self._timed_out.pop(index, None)
            if event is not None:
                self.stats.inflight_blocks -= 1
                self._failures[index] = exc
                event.set()

    def fail_pending(self, exc: BaseException) -> None:
        self.fail(list(self._inflight), exc)

    def in_flight(self, index: int) -> bool:
        return index in self._inflight

    def settle_present(self, index: int) -> bool:
        """Whether block ``index`` needs no fetch: servable, or cached without this reader's
        trust (stored by another process: a lazy mount, a killed pull) and adopted now,
        hashed from disk against the index; one that does not match is dropped."""
        if not self.servable(index):
            if self.trust.mode is not Mode.INDEX or not self.entry.has(index):
                return False
            verdict = self._match_cached(index)
            if verdict is not True:
                if isinstance(verdict, BaseException):
                    self._foreign_block_wrong(index, verdict)
                return False
        self.arrived(index, 0, False)
        return True

    def _match_cached(self, index: int) -> bool | BaseException:
        """Hash a cached block against the index and adopt it if it matches (may run on a
        worker thread). True: adopted; False: not cached any more; the error otherwise (it
        did not read back, or it does not match)."""
        try:
            data, check = self.entry.read_checked(index)
        except BlockDamaged as exc:
            return exc
        except CacheError:
            return False
        index_hash = self.trust.index_hash(data)
        if index_hash is None or not self.trust.matches(index, index_hash):
            return IntegrityError(f"cached block {index} of {self.digest} does not match the block index")
        self.entry.adopt(index, index_hash, check)
        return True

    def _foreign_block_wrong(self, index: int, exc: BaseException) -> None:
        """A cached block failed this reader's trust: counted, dropped, fetched again."""
        if isinstance(exc, BlockDamaged):
            self.damaged(index, exc)
            return
        self.fetcher.wrong_bytes(f"cached block {index} of {self.digest}", fetched=False)
        log.warning("%s; fetching it again", exc)
        self.drop([index])

    def wrong_block(self, index: int) -> None:
        self.fetcher.wrong_bytes(f"block {index} of {self.digest}")

    def store(self, index: int, data: Block, index_hash: bytes | None = None) -> int | None:
        """Store a block that passed this reader's trust (``index_hash``: it matched the
        index) or that this reader hashes as part of the blob; returns the stored checksum.
        Runs on worker threads.

        Another process may have stored the block meanwhile, under a trust of its own (a
        lazy mount, a pass still checking the blob): theirs is kept only if its bytes equal
        ours, and then adopted under our index; otherwise it is replaced by ours. So what is
        on disk under a block this reader delivered is what it checked: a whole-blob check
        over the disk copy cannot fail on another process's bytes (and blame a correct
        index). A block being fetched is served to nobody here, so theirs was never served
        by this reader."""
        check = self.entry.write_block(index, data, index_hash)
        if check is not None:
            return check
        try:
            theirs, check = self.entry.read_checked(index)
            if theirs == data:
                if index_hash is not None:
                    self.entry.adopt(index, index_hash, check)
                return check
        except CacheError:
            pass
        self.entry.forget(index)
        return self.entry.write_block(index, data, index_hash)

    # passes over the whole blob

    def begin_pass(self) -> int:
        if not self.pass_running:
            self.pass_running = True
            self.pass_generation += 1
        return self.pass_generation

    def tick(self, fetched: int = 0) -> None:
        """A pass made progress (``fetched`` bytes came from the network)."""
        self.stats.bytes_fetched += fetched
        self._progress += 1
        self._changed.set()
        self._changed = trio.Event()

    def end_pass(self, failure: BaseException | None) -> None:
        self._pass_outcome = (self.pass_generation, failure)
        self.pass_running = False
        if failure is not None:
            self.fail_pending(failure)
        self.tick()

    def digest_mismatch(self) -> None:
        """The blob does not match its digest: drop every byte of it, wherever it is held."""
        self.fetcher.wrong_bytes(f"blob {self.digest}")
        log.error("blob %s does not match its digest; dropped it from the cache", self.digest)
        self.drop()

    # -- checking a complete blob ---------------------------------------------------------

    def _maybe_verify(self) -> None:
        """A complete blob not yet checked whole is hashed once, unless a block index the
        manifest vouches for matched every block, or its source checks it."""
        if self._verifying or self.pass_running or self.source.checks_whole or not self.entry.complete:
            return
        if self.entry.verified or self.trust.covers(self.entry):
            return
        self._verifying = True
        self._verify_done = trio.Event()
        self.fetcher.spawn(self._verify)

    async def verified(self) -> bool:
        """Whether the blob is complete and vouched for, waiting for a check under way."""
        self._maybe_verify()
        if self._verifying:
            await self._verify_done.wait()
        return self.entry.complete and (self.entry.verified or self.trust.covers(self.entry))

    async def settle(self) -> bool:
        """For ``pull``: read every cached block back (dropping damaged ones), fetch what is
        missing, and check the blob; True once every block is on disk and vouched for."""
        for _ in range(3):
            for index, exc in await trio.to_thread.run_sync(self._read_back):
                self.damaged(index, exc)
            missing = [i for i in range(self.entry.nblocks) if not self.servable(i)]
            if missing:
                await self.ensure(missing, foreground=False)
            if self.entry.complete and await self.verified():
                return True
        return False

    def _read_back(self) -> list[tuple[int, BlockDamaged]]:
        """Every cached block read back against its checksum (on a worker thread): those
        that fail, for :meth:`damaged` to drop on the loop."""
        failed = []
        for index in range(self.entry.nblocks):
            if self.entry.has(index):
                try:
                    self.entry.read_block(index)
                except BlockDamaged as exc:
                    failed.append((index, exc))
                except CacheError:
                    continue  # gone meanwhile
        return failed

    async def _verify(self) -> None:
        try:
            if self.trust.mode is Mode.INDEX and not await self._settle_against_index():
                return  # a block was dropped: fetched again when read, then checked anew
            if self.trust.covers(self.entry):
                return
            matches, checks = await trio.to_thread.run_sync(self._hash_whole)
            if matches is None:
                return
            if matches:
                await trio.to_thread.run_sync(self.entry.mark_whole, checks)
            else:
                if self.trust.mode is Mode.INDEX:  # every block matched it: the index is wrong
                    log.error("the block index of %s vouched for blocks of a blob that does not match its digest; "
                              "no longer trusting it for this blob", self.digest)
                    self.trust = self.trust.without_index()
                self.digest_mismatch()
        except CacheError as exc:
            log.error("could not verify %s: %s", self.digest, exc)
        except Exception:  # runs in the fetcher's nursery: an escape would stop the daemon
            log.exception("unexpected error verifying %s", self.digest)
        finally:
            self._verifying = False
            self._verify_done.set()

    async def _settle_against_index(self) -> bool:
        """Before the blob is hashed whole (or instead, with a vouched index): every cached
        block this reader's index has not matched yet (another process stored it, under its
        own trust) is hashed against the index and adopted, or dropped. True if every block
        is now matched; only then can a failing whole-blob hash blame the index."""
        pending = [i for i in range(self.entry.nblocks) if not self.trust.accepts(self.entry, i)]
        verdicts = await trio.to_thread.run_sync(lambda: [(i, self._match_cached(i)) for i in pending])
        settled = True
        for index, verdict in verdicts:
            if verdict is not True:
                settled = False
                if isinstance(verdict, BaseException):
                    self._foreign_block_wrong(index, verdict)
        return settled

    def _hash_whole(self) -> tuple[bool | None, dict[int, int]]:
        """Hash the blob from disk (on a worker thread): whether it matches its digest, with
        each block's checksum for ``mark_whole``; None if a block did not read back (dropped,
        so it is fetched again, and the blob checked once complete again)."""
        hasher = hashlib.sha256()
        checks: dict[int, int] = {}
        for index in range(self.entry.nblocks):
            try:
                data, checks[index] = self.entry.read_checked(index)
            except BlockDamaged as exc:
                trio.from_thread.run_sync(self.damaged, index, exc)
                return None, checks
            except CacheError:
                return None, checks
            hasher.update(data)
        return "sha256:" + hasher.hexdigest() == self.digest, checks

    def cached_fraction(self) -> float:
        """Held locally: on disk, or checked in memory."""
        if not self.size:
            return 1.0
        pending = sum(self.entry.block_length(i) for i in self.fetcher.recent.indexes(self.digest) if not self.entry.has(i))
        return (self.entry.cached_bytes() + pending) / self.size


def call_soon(token: trio.lowlevel.TrioToken, function: Callable[..., object], *args: object) -> None:
    """Run ``function(*args)`` on the loop, from a worker thread, without waiting for it: a
    worker never stalls on a busy loop. An error in ``function`` is logged, never raised into
    trio's runner (which would end the daemon)."""
    token.run_sync_soon(_logged, function, args)


def _logged(function: Callable[..., object], args: tuple[object, ...]) -> None:
    try:
        function(*args)
    except Exception:
        log.exception("unexpected error in %s", getattr(function, "__qualname__", function))


def check_block(reader: BlobReader, index: int, data: Block, token: trio.lowlevel.TrioToken) -> bytes | None:
    """The block's index hash, after it matched the index (None without an index). Runs on
    worker threads; a mismatch is counted on the loop and raised (nobody sees the bytes)."""
    trust = reader.trust
    digest = trust.index_hash(data)
    if digest is None:
        return None
    if not trust.matches(index, digest):
        call_soon(token, reader.wrong_block, index)
        raise IntegrityError(f"block {index} of {reader.digest} does not match the block index")
    return digest
