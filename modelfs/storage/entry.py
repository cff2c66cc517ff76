"""One blob's cached blocks: what is served from the cache, and with what trust.

A map entry holds the block's stored length, flags, an xxh3-64 checksum of the stored bytes
and, for a block matched against a block index on arrival, that block's index hash
(:mod:`.mapformat`). Nothing on disk is trusted because a flag says so:

- **Every block read back is checked** against its checksum before anyone sees it. A flipped
  byte, a hole left by a power cut (the map entry landed, the data did not), a torn write or
  a map entry whose length is wrong all fail the check; the block is dropped and fetched
  again. A block read and checked stays in memory, in one bounded window for the process
  (:mod:`.window`), under the version it was read as: the next small read of it (a tar
  header, a 4 KiB page) costs a lookup, not another 1 MiB read back, check and decompression.
- **Trust is recorded per block**, never per blob: ``WHOLE`` means the block was part of the
  blob when its sha256 matched the digest (set only on blocks whose checksum is the one that
  was hashed); ``INDEXED`` means its index hash was computed on arrival and is kept in the entry,
  so a mount trusts it only if *its own* trusted index has the same hash for that block. A
  block with neither flag was stored unverified (``--verify lazy``, or bytes of a blob still
  being checked whole) and is served by default to no one.

Where the blocks rest is the store's business (:mod:`.store`): the blob's files
(:class:`~.disk.DiskStore`), or nowhere when they cannot be set up (:class:`~.memory.NoDisk`).
The entry is the same over either.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import CacheError
from .mapformat import INDEXED, WHOLE, Buffer, Entry, Undecodable, checksum, decode_block
from .memory import NoDisk
from .store import RECHECK_SECONDS, BlobStore, BlockDamaged, Files
from .window import BlockWindow, shared_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlobStats:
    digest: str
    size: int
    cached_bytes: int
    stored_bytes: int
    complete: bool
    verified: bool


class BlobEntry:
    """One blob's cached blocks over its store. Methods are synchronous and short; block
    writes and whole-blob passes may run in worker threads (the store locks)."""

    def __init__(self, store: BlobStore, window: BlockWindow | None = None) -> None:
        self.store = store
        self.digest, self.size = store.digest, store.map.size
        self.block_size, self.nblocks = store.map.block_size, store.map.nblocks
        self.data_path, self.map_path, self.claims_path = store.paths.data, store.paths.map, store.paths.claims
        self._window = window if window is not None else shared_window()

    # -- files ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.store.is_open

    def release(self) -> bool:
        """Close the files (they are reopened on next use); False if a thread is using them."""
        return self.store.release()

    def files_id(self) -> Files:
        """Which files hold the blob now (their inodes): a check over the whole blob compares
        this before and after, since blocks it stored are gone once another process replaced
        the files (``cache prune``, another mount's eviction, a digest mismatch elsewhere)."""
        return self.store.files_id()

    def reload(self) -> None:
        """Re-read every map entry from disk: blocks and trust another process recorded, also
        on blocks this process already saw present (``entry`` re-reads only absent ones)."""
        self.store.reload()

    # -- blocks ---------------------------------------------------------------------------

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def entry_at(self, index: int) -> Entry:
        return self.store.map.get(index)

    def entry(self, index: int) -> Entry:
        """The block's entry, re-read from disk when ours says absent (and all of ours
        dropped once the blob's files were replaced by another process)."""
        self.store.refresh()
        found = self.store.map.get(index)
        return found if found.present else self.store.read_entry(index)

    def has(self, index: int) -> bool:
        return self.entry(index).present

    def trusted(self, index: int, expected: bytes | None) -> bool:
        """Present and vouched for: checked whole with its blob, or matched on arrival against
        the same block hash the caller trusts."""
        entry = self.entry(index)
        if not entry.present:
            return False
        return bool(entry.flags & WHOLE) or (expected is not None and bool(entry.flags & INDEXED)
                                             and entry.index_hash == expected)

    def read_block(self, index: int) -> bytes:
        """The block's bytes, checked against the checksum stored with them; a block that does
        not check out raises :class:`BlockDamaged` (the caller drops it and fetches again).

        For readers: a block read back stays in the window (see the module docstring), and
        is served from there while the map still names the same files, length and checksum
        (looked at on disk again once ``RECHECK_SECONDS`` have passed since last time)."""
        entry = self.entry(index)  # the files rechecked on schedule; refreshed from disk if absent here
        held = self._window.get(self.data_path, index, self._version(entry)) if entry.present else None
        if held is not None and (self._window.fresh(held, RECHECK_SECONDS) or self._window.confirm(
                self.data_path, index, held, self._version(self.store.read_entry(index)))):
            return held.data
        data, version, _ = self._read_back(index)
        self._window.put(self.data_path, index, version, data)
        return data

    def held_block(self, index: int) -> bytes | None:
        """The block's checked copy in the window, if one is held under the version the map
        names now and was confirmed within ``RECHECK_SECONDS``; else None, and the caller
        reads it with :meth:`read_block` (on a worker thread: it may read the disk). Cheap
        enough for the serving loop: a lookup, no I/O beyond what :meth:`entry` does."""
        entry = self.entry(index)  # the files rechecked on schedule, as read_block does
        if not entry.present:
            return None
        held = self._window.get(self.data_path, index, self._version(entry))
        return held.data if held is not None and self._window.fresh(held, RECHECK_SECONDS) else None

    def _version(self, entry: Entry, files: Files | None = None) -> tuple[int, int, int, int]:
        """What a copy in the window is valid for: these files, this stored length and checksum."""
        return (*(files if files is not None else self.store.files), entry.length, entry.check)

    def read_checked(self, index: int) -> tuple[bytes, int]:
        """The block's bytes and the checksum they matched: what a caller that records trust
        for these very bytes (``adopt``, ``mark_whole``) must pass on, since the entry may be
        replaced by another process the moment after. Always read back from disk (a pass over
        the whole blob, ``scrub``), and not kept: a scan must not push out what readers use."""
        data, _, check = self._read_back(index)
        return data, check

    def _read_back(self, index: int) -> tuple[bytes, tuple[int, int, int, int], int]:
        """Read the block from disk and check it: (bytes, the version they were read as, checksum)."""
        self.entry(index)  # refreshed from disk if absent here
        data, entry, files = self.store.read(index)
        if len(data) != entry.length or checksum(data) != entry.check:
            raise BlockDamaged(f"cached block {index} of {self.digest} is damaged (does not match its checksum)")
        try:
            data = decode_block(data, entry.flags, self.block_length(index))
        except Undecodable:
            raise BlockDamaged(f"cached block {index} of {self.digest} does not decompress") from None
        if len(data) != self.block_length(index):
            raise BlockDamaged(f"cached block {index} of {self.digest} has {len(data)} bytes, expected "
                               f"{self.block_length(index)}")
        return data, self._version(entry, files), entry.check

    def write_block(self, index: int, data: Buffer, index_hash: bytes | None = None) -> int | None:
        """Store a block: data first, then its map entry. ``index_hash``: the block's hash,
        matched by the caller against a block index (trust "checked whole" is only ever added
        afterwards, by :meth:`mark_whole`). Returns the stored checksum, or None if the block
        was already there (another process stored it meanwhile; its copy stays, with the
        trust it has). How writers of one block race: :meth:`.disk.DiskStore.write`."""
        if len(data) != self.block_length(index):
            raise CacheError(f"block {index} of {self.digest} has {len(data)} bytes, expected {self.block_length(index)}")
        return self.store.write(index, data, index_hash)

    def forget(self, index: int) -> None:
        """Drop a block that does not read back, so it is fetched again."""
        self._window.drop(self.data_path, index)
        try:
            self.store.forget(index)
        finally:
            self._window.drop(self.data_path, index)  # a reader may have put it back meanwhile

    def adopt(self, index: int, index_hash: bytes, check: int) -> None:
        """Record that a block already stored (with checksum ``check``) matched the block index."""
        self.store.upgrade({index: check}, INDEXED, index_hash)

    # -- whole blob -----------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Cheap on every call: the count says so, or blocks another process stored are
        found by scanning on from the first block not known present."""
        return self.store.map.complete(self.has)

    @property
    def complete_here(self) -> bool:
        """Every block is present as far as this process knows (no look at the disk: for a
        check after each stored block; :attr:`complete` also finds other processes' blocks)."""
        return self.store.map.present >= self.nblocks

    @property
    def verified(self) -> bool:
        """Every block is present and was part of the blob when it matched its digest."""
        return all(self.entry(i).flags & WHOLE for i in range(self.nblocks))

    def cached_bytes(self) -> int:
        """Bytes present, from the count of present blocks (cheap: status asks every second)."""
        return self.store.map.cached_bytes()

    def stored_bytes(self) -> int:
        return self.store.map.stored_bytes()

    def blocks_with_checks(self) -> Iterator[tuple[int, bytes, int]]:
        """(index, bytes, stored checksum) of every block, each checked as it is read."""
        for index in range(self.nblocks):
            data, check = self.read_checked(index)
            yield index, data, check

    def digest_matches(self) -> tuple[bool, dict[int, int]]:
        """Hash the complete blob (pure reads, so it may run in a worker thread); also returns
        the checksum of each block hashed, for :meth:`mark_whole`."""
        hasher = hashlib.sha256()
        checks = {}
        for index, block, check in self.blocks_with_checks():
            hasher.update(block)
            checks[index] = check
        return "sha256:" + hasher.hexdigest() == self.digest, checks

    def mark_whole(self, checks: dict[int, int]) -> bool:
        """The blob matched its digest with these blocks: flush the data, then record it."""
        return self.store.mark_whole(checks)

    def verify(self) -> bool:
        """Check a complete blob; on mismatch drop it so it is fetched again."""
        matches, checks = self.digest_matches()
        if matches and self.mark_whole(checks):
            return True
        if not matches:
            log.error("cached blob %s does not match its digest; dropping it", self.digest)
            self.clear()
        return False

    def scrub(self) -> int:
        """Read every present block back from disk (not from the window); drop those that fail
        their check. Returns how many."""
        dropped = 0
        for index in range(self.nblocks):
            if not self.has(index):
                continue
            try:
                self.read_checked(index)
            except BlockDamaged as exc:
                log.warning("%s; dropping it", exc)
                self.forget(index)
                dropped += 1
        return dropped

    def clear(self) -> None:
        """Drop every block by putting fresh, empty files in place; whoever holds the old ones
        keeps reading consistent bytes until it notices (see :mod:`.files`)."""
        self._window.drop(self.data_path)
        self.store.clear()

    def stats(self) -> BlobStats:
        return BlobStats(self.digest, self.size, self.cached_bytes(), self.stored_bytes(), self.complete, self.verified)

    def close(self) -> None:
        self.store.close()


class VolatileEntry(BlobEntry):
    """A blob whose cache files cannot be set up (a full or read-only cache disk): an entry
    over :class:`~.memory.NoDisk`. This class only names the case and keeps the reason;
    everything it does differently, its store does."""

    def __init__(self, digest: str, size: int, block_size: int, reason: str, window: BlockWindow | None = None) -> None:
        self.reason = reason
        super().__init__(NoDisk(digest, size, block_size, reason), window)
