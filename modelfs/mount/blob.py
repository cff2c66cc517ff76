"""One blob as a mount holds it: its cache entry, what vouches for its bytes (its
:class:`~.trust.Trust`), the checked blocks in memory, and the one path by which bytes leave.

Bytes that are dropped (a blob that fails its digest, a stream that fails, a damaged or
foreign block) leave by :meth:`HeldBlob.drop`: from the cache, from memory and, if any were
served, from the kernel's page cache of every file they were served as.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..errors import CacheError, IntegrityError
from ..storage.store import BlockDamaged
from .context import FetchContext
from .sink import StoredBlob
from .trust import Block, Trust

log = logging.getLogger(__name__)


class HeldBlob:
    def __init__(self, ctx: FetchContext, entry: StoredBlob, trust: Trust) -> None:
        self.ctx, self.entry, self.trust = ctx, entry, trust
        self.served = False  # bytes went to a reader (the kernel may hold them) since the last drop
        self.drops = 0  # times bytes of it were dropped: a read-back begun before one is not served

    @property
    def digest(self) -> str:
        return self.entry.digest

    def in_memory(self, index: int) -> bool:
        return (self.entry.digest, index) in self.ctx.recent

    def held(self, index: int) -> Block | None:
        """The block, checked, if memory holds it (just fetched, or in the window): a lookup
        for the serving loop; None, and it is read back on a worker (:mod:`.readback`)."""
        data = self.ctx.recent.get(self.entry.digest, index)
        return data if data is not None else self.entry.held_block(index)

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
        self.drops += 1
        if not evicted:
            try:
                if which is None:
                    self.entry.clear()
                else:
                    for index in which:
                        self.entry.forget(index)
            except CacheError as exc:
                log.error("%s", exc)
        self.ctx.recent.drop(self.digest, which)
        if self.served and not evicted:
            self.served = False
            self.ctx.pages_stale(self.digest)

    def damaged(self, index: int, exc: Exception) -> None:
        """A cached block did not read back: drop it, so it is fetched again."""
        self.ctx.stats.damaged_blocks += 1
        log.warning("%s; fetching it again", exc)
        self.drop([index])

    def digest_mismatch(self) -> None:
        """The blob does not match its digest: drop every byte of it, wherever it is held."""
        self.ctx.wrong_bytes(f"blob {self.digest}", True)
        log.error("blob %s does not match its digest; dropped it from the cache", self.digest)
        self.drop()

    def foreign_block_wrong(self, index: int, exc: BaseException) -> None:
        """A cached block failed this reader's trust: counted, dropped, fetched again."""
        if isinstance(exc, BlockDamaged):
            self.damaged(index, exc)
            return
        self.ctx.wrong_bytes(f"cached block {index} of {self.digest}", False)
        log.warning("%s; fetching it again", exc)
        self.drop([index])

    def match_cached(self, index: int) -> bool | BaseException:
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

    def cached_fraction(self) -> float:
        """Held locally: on disk, or checked in memory."""
        if not self.entry.size:
            return 1.0
        pending = sum(self.entry.block_length(i) for i in self.ctx.recent.indexes(self.digest) if not self.entry.has(i))
        return (self.entry.cached_bytes() + pending) / self.entry.size


class OfBlob:
    """What a reader and the sink its source feeds both say of their blob, said once: each
    holds the same :class:`HeldBlob`."""

    blob: HeldBlob

    @property
    def digest(self) -> str:
        return self.blob.entry.digest

    @property
    def size(self) -> int:
        return self.blob.entry.size

    @property
    def nblocks(self) -> int:
        return self.blob.entry.nblocks

    def block_length(self, index: int) -> int:
        return self.blob.entry.block_length(index)

    @property
    def trust(self) -> Trust:
        return self.blob.trust
