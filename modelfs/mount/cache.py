"""The persistent block cache, shared by every mount and by ``pull``: self-checking.

Layout under the cache root, content-addressed so any process that needs blob D finds it::

    blobs/sha256/<hex>.data   sparse file: block i lives at offset i * block_size
    blobs/sha256/<hex>.map    header + one 48-byte entry per block
    blobs/sha256/<hex>.claims empty: locks on it say which blocks a process is fetching (claims.py)

A map entry holds the block's stored length, flags, an xxh3-64 checksum of the stored bytes
and, for a block matched against a block index on arrival, that block's index hash. Nothing
on disk is trusted because a flag says so:

- **Every block read back is checked** against its checksum before anyone sees it. A flipped
  byte, a hole left by a power cut (the map entry landed, the data did not), a torn write or
  a map entry whose length is wrong all fail the check; the block is dropped and fetched
  again. This is why block writes need no fsync: a block that did not reach the disk cannot
  pass. (Mountpoint for S3 checks its cache blocks with CRC32C for the same reason.)
  A block read and checked stays in memory, in one bounded window for the process
  (:mod:`.window`), under the version it was read as: the next small read of it (a tar
  header, a 4 KiB page) costs a lookup, not another 1 MiB read back, check and decompression.
- **Trust is recorded per block**, never per blob: ``WHOLE`` means the block was part of the
  blob when its sha256 matched the digest (set only on blocks whose checksum is the one that
  was hashed); ``INDEXED`` means its index hash was computed on arrival and is kept in the entry,
  so a mount trusts it only if *its own* trusted index has the same hash for that block. A
  block with neither flag was stored unverified (``--verify lazy``, or bytes of a blob still
  being checked whole) and is served by default to no one.
- **Files are replaced, never emptied in place.** Clearing or evicting a blob renames fresh
  files over the old ones (or unlinks them); another process that holds the old files keeps
  reading valid bytes and notices the new inode within ``RECHECK_SECONDS`` (always before a
  write), then reopens. Writers of one blob serialise on an ``flock`` of its current map.

Whether a blob's blocks are lz4-compressed is decided once per blob from its first written
block (weights do not compress, tokenizers do), so incompressible data never pays.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lz4.block
import xxhash

from ..errors import CacheError
from .window import BlockWindow, shared_window

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1 << 20
_MAGIC = b"MFSMAP02"
_HEADER = struct.Struct("<8sIQII")  # magic, block_size, blob_size, nblocks, lz4 policy
_HEADER_SIZE = 64
_ENTRY = struct.Struct("<IIQ32s")  # stored length, flags, xxh3-64 of the stored bytes, index hash
PRESENT, LZ4, INDEXED, WHOLE = 1, 2, 4, 8
_POLICY_UNDECIDED, _POLICY_LZ4, _POLICY_RAW = 0, 1, 2
_LZ4_WORTH_IT = 0.85
RECHECK_SECONDS = 0.5  # how stale a reader's view of "are these still the blob's files" may get
# Full raw blocks are written with O_DIRECT where the filesystem takes it. The kernel already
# keeps the mounted files' pages (FUSE page cache); a second copy of the same bytes in the
# page cache of the cache file costs a memcpy per byte and memory. Measured on the build
# machine: 1 GiB buffered, 0.3-1.1 CPU-s (a copy into new page-cache pages, then writeback);
# with O_DIRECT, 0.11 s. A filesystem that refuses it (tmpfs, some FUSE) gets buffered writes.
DIRECT_ALIGNMENT = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_EMPTY_ENTRY = bytes(_ENTRY.size)


def default_cache_dir() -> str:
    if os.geteuid() == 0:
        return "/var/cache/modelfs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "modelfs")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """What each stored block is checked against when read back: xxh3-64 (0.02 s/GiB here,
    against 0.5 s for zlib's crc32), guarding against bit rot and torn writes, not attackers."""
    return xxhash.xxh3_64_intdigest(data)


class BlockDamaged(CacheError):
    """A cached block does not read back as it was stored; it is dropped and fetched again."""


class FilesReplaced(CacheError):
    """The files of a blob being checked whole were replaced by another process meanwhile
    (``cache prune``, another mount's eviction): what the check stored is gone, so it starts
    again instead of failing the reads waiting for it."""



@dataclass(frozen=True)
class BlobStats:
    digest: str
    size: int
    cached_bytes: int
    stored_bytes: int
    complete: bool
    verified: bool


@dataclass(frozen=True)
class Entry:
    length: int
    flags: int
    check: int
    index_hash: bytes

    @property
    def present(self) -> bool:
        return bool(self.flags & PRESENT)

    @property
    def checked(self) -> bool:
        """Present and checked: whole with its blob, or against a block index."""
        return self.present and bool(self.flags & (WHOLE | INDEXED))


def aligned_buffer(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes at a page-aligned address: a block received into
    it can be written to the cache with O_DIRECT, and served, with no copy."""
    backing = bytearray(size + DIRECT_ALIGNMENT)
    skip = -_address(backing) % DIRECT_ALIGNMENT
    return memoryview(backing)[skip:skip + size]


def _address(buffer: bytearray | memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def is_aligned(buffer: bytes | bytearray | memoryview) -> bool:
    if isinstance(buffer, bytes) or (isinstance(buffer, memoryview) and buffer.readonly) or not len(buffer):
        return False  # read-only buffers: not ours to hand to the disk directly
    return _address(buffer) % DIRECT_ALIGNMENT == 0


def _decode_entry(raw: bytes | bytearray, at: int = 0) -> Entry:
    return Entry(*_ENTRY.unpack_from(raw, at))


class BlobEntry:
    """One blob's cached blocks. Methods are synchronous and short. Block writes may run in
    a worker thread (so a slow disk never stalls the event loop); every use of the files
    holds an in-process lock, and every change also the map's ``flock``, which alone would not
    exclude threads sharing one file description."""

    def __init__(self, directory: str, digest: str, size: int, block_size: int,
                 on_open: Callable[[BlobEntry], None] | None = None, window: BlockWindow | None = None) -> None:
        self.digest, self.size = digest, size
        self._window = window if window is not None else shared_window()
        hexpart = digest.split(":", 1)[1]
        self.data_path = os.path.join(directory, f"{hexpart}.data")
        self.map_path = os.path.join(directory, f"{hexpart}.map")
        self.claims_path = os.path.join(directory, f"{hexpart}.claims")  # see claims.py
        self.block_size = block_size
        self.nblocks = -(-size // block_size)
        self._mutex = threading.RLock()
        self._count_lock = threading.Lock()
        self._map_fd = self._data_fd = self._direct_fd = -1
        self._direct_ok = bool(_O_DIRECT)  # until the filesystem refuses it
        self._inode = (0, 0)
        self._checked_at = 0.0
        self._policy = _POLICY_UNDECIDED
        self._raw = bytearray(self.nblocks * _ENTRY.size)
        self._present = 0
        self._scan_from = 0  # blocks before this are known present (see ``complete``)
        self._on_open = on_open  # the cache's count of open files
        with self._mutex:
            self._open()

    # -- files ----------------------------------------------------------------------------

    def _open(self) -> None:
        """Open the current files (creating them if absent) and load the map."""
        for _ in range(2):
            try:
                self._map_fd = os.open(self.map_path, os.O_RDWR | os.O_CREAT, 0o644)
                self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self._close_fds()
                raise CacheError(f"cannot open cache files for {self.digest} in {os.path.dirname(self.map_path)}: "
                                 f"{exc.strerror}") from None
            try:
                with self._flock():
                    loaded = self._load_or_init()
                if loaded:
                    break
                # a map of another format or blob: replaced, never emptied under another reader
                log.warning("cache map for %s is unreadable, stale or of another format; starting it afresh", self.digest)
                self._close_fds()
                self._replace_files()
            except OSError as exc:
                self._close_fds()
                raise CacheError(f"cannot set up the cache map for {self.digest} in {os.path.dirname(self.map_path)}: "
                                 f"{exc.strerror}") from None
        inode = (os.fstat(self._map_fd).st_ino, os.fstat(self._data_fd).st_ino)
        if inode != self._inode:  # other files (replaced, evicted): no copy of the old ones is served
            self._window.drop(self.data_path)
        self._inode = inode
        self._checked_at = time.monotonic()
        if self._on_open is not None:
            self._on_open(self)

    def _close_fds(self) -> None:
        for fd in (self._map_fd, self._data_fd, self._direct_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._map_fd = self._data_fd = self._direct_fd = -1

    def _direct_descriptor(self) -> int:
        """The data file opened for O_DIRECT writes (mutex held), next to the buffered one."""
        if self._direct_fd < 0:
            try:
                self._direct_fd = os.open(self.data_path, os.O_WRONLY | _O_DIRECT)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                log.info("cache filesystem refuses O_DIRECT (%s); writing %s through the page cache", exc.strerror,
                         self.digest)
                self._direct_ok = False
                return self._data_fd
            if os.fstat(self._direct_fd).st_ino != os.fstat(self._data_fd).st_ino:  # replaced since we opened
                os.close(self._direct_fd)
                self._direct_fd = -1
                return self._data_fd
        return self._direct_fd

    def _replaced(self) -> bool:
        """Whether the paths no longer name the files we hold (cleared or evicted elsewhere)."""
        try:
            return (os.stat(self.map_path).st_ino, os.stat(self.data_path).st_ino) != self._inode
        except FileNotFoundError:
            return True

    def _current(self, force: bool = False) -> None:
        """Make sure we use the blob's current files. Called with the mutex held."""
        if self._map_fd < 0:
            self._open()
            return
        now = time.monotonic()
        if not force and now - self._checked_at < RECHECK_SECONDS:
            return
        self._checked_at = now
        if self._replaced():
            log.debug("cache files of %s were replaced by another process; reopening", self.digest)
            self._close_fds()
            self._open()

    def release(self) -> bool:
        """Close the files (they are reopened on next use); False if a thread is using them."""
        if not self._mutex.acquire(blocking=False):
            return False
        try:
            self._close_fds()
            return True
        finally:
            self._mutex.release()

    @property
    def is_open(self) -> bool:
        return self._map_fd >= 0

    def files_id(self) -> tuple[int, int]:
        """Which files hold the blob now (their inodes): a check over the whole blob compares
        this before and after, since blocks it stored are gone once another process replaced
        the files (``cache prune``, another mount's eviction, a digest mismatch elsewhere)."""
        try:
            with self._mutex:
                self._current(force=True)
                return self._inode
        except OSError as exc:
            raise CacheError(f"cannot open cache files for {self.digest}: {exc.strerror}") from None

    def reload(self) -> None:
        """Re-read every map entry from disk: blocks and trust another process recorded, also
        on blocks this process already saw present (``entry`` re-reads only absent ones)."""
        try:
            with self._mutex:
                self._current(force=True)
                if self._map_fd < 0:
                    return
                raw = os.pread(self._map_fd, self.nblocks * _ENTRY.size, _HEADER_SIZE)
        except OSError as exc:
            raise CacheError(f"cannot read the cache map of {self.digest}: {exc.strerror}") from None
        raw = raw.ljust(self.nblocks * _ENTRY.size, b"\0")
        for index in range(self.nblocks):
            self._set_raw(index, raw[index * _ENTRY.size:(index + 1) * _ENTRY.size])

    def _flock(self) -> _Flock:
        return _Flock(self._map_fd, self._mutex)

    def _writing(self) -> _WriteLock:
        return _WriteLock(self)

    def _load_or_init(self) -> bool:
        """Load the map; a new (empty) one is set up here. False: it holds something else."""
        header = os.pread(self._map_fd, _HEADER_SIZE, 0)
        if header:
            if len(header) < _HEADER.size:
                return False
            magic, bs, size, nblocks, policy = _HEADER.unpack_from(header)
            if not (magic == _MAGIC and bs == self.block_size and size == self.size and nblocks == self.nblocks):
                return False
            raw = os.pread(self._map_fd, nblocks * _ENTRY.size, _HEADER_SIZE)
            self._policy = policy
            self._raw = bytearray(raw.ljust(nblocks * _ENTRY.size, b"\0"))
            self._recount()
            return True
        self._policy = _POLICY_UNDECIDED
        self._raw = bytearray(self.nblocks * _ENTRY.size)
        self._recount()
        os.pwrite(self._map_fd, self._header(), 0)
        os.pwrite(self._map_fd, bytes(self._raw), _HEADER_SIZE)
        return True

    def _recount(self) -> None:
        with self._count_lock:
            self._present = sum(1 for i in range(self.nblocks) if self._raw[i * _ENTRY.size + 4] & PRESENT)
            self._scan_from = 0

    def _header(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.block_size, self.size, self.nblocks, self._policy).ljust(_HEADER_SIZE, b"\0")

    def _entry_offset(self, index: int) -> int:
        return _HEADER_SIZE + index * _ENTRY.size

    def entry_at(self, index: int) -> Entry:
        return _decode_entry(self._raw, index * _ENTRY.size)

    def _refresh_entry(self, index: int) -> Entry:
        """Re-read one entry from disk (another process may have stored the block)."""
        with self._mutex:
            self._current()
            raw = os.pread(self._map_fd, _ENTRY.size, self._entry_offset(index))
        raw = raw if len(raw) == _ENTRY.size else _EMPTY_ENTRY
        self._set_raw(index, raw)
        return _decode_entry(raw)

    def _set_raw(self, index: int, raw: bytes) -> None:
        """The event loop refreshes entries while a worker thread may be storing one; a lock
        of its own keeps the present count exact."""
        at = index * _ENTRY.size
        with self._count_lock:
            was = bool(self._raw[at + 4] & PRESENT)
            now = bool(raw[4] & PRESENT)
            self._raw[at:at + _ENTRY.size] = raw
            self._present += now - was
            if was and not now:
                self._scan_from = min(self._scan_from, index)

    def _put_entry(self, index: int, entry: Entry) -> None:
        raw = _ENTRY.pack(entry.length, entry.flags, entry.check, entry.index_hash)
        os.pwrite(self._map_fd, raw, self._entry_offset(index))
        self._set_raw(index, raw)

    # -- blocks ---------------------------------------------------------------------------

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def entry(self, index: int) -> Entry:
        """The block's entry, re-read from disk when ours says absent (and all of ours
        dropped once the blob's files were replaced by another process)."""
        if self._map_fd < 0 or time.monotonic() - self._checked_at >= RECHECK_SECONDS:
            with self._mutex:
                self._current()
        found = self.entry_at(index)
        return found if found.present else self._refresh_entry(index)

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
                self.data_path, index, held, self._version(self._refresh_entry(index)))):
            return held.data
        data, version, _ = self._read_back(index)
        self._window.put(self.data_path, index, version, data)
        return data

    def _version(self, entry: Entry) -> tuple[int, int, int, int]:
        """What a copy in the window is valid for: these files, this stored length and checksum."""
        return (*self._inode, entry.length, entry.check)

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
        try:
            with self._mutex:
                self._current()
                entry = self.entry_at(index)  # of the files we now hold (another process may have replaced them)
                if not entry.present:
                    raise CacheError(f"block {index} of {self.digest} is not cached")
                version = self._version(entry)
                data = os.pread(self._data_fd, entry.length, index * self.block_size)
        except OSError as exc:
            raise BlockDamaged(f"cannot read cache data for {self.digest} block {index}: {exc.strerror}") from None
        if len(data) != entry.length or checksum(data) != entry.check:
            raise BlockDamaged(f"cached block {index} of {self.digest} is damaged (does not match its checksum)")
        if entry.flags & LZ4:
            try:
                data = lz4.block.decompress(data, uncompressed_size=self.block_length(index))
            except lz4.block.LZ4BlockError:
                raise BlockDamaged(f"cached block {index} of {self.digest} does not decompress") from None
        if len(data) != self.block_length(index):
            raise BlockDamaged(f"cached block {index} of {self.digest} has {len(data)} bytes, expected "
                               f"{self.block_length(index)}")
        return data, version, entry.check

    def write_block(self, index: int, data: bytes | bytearray | memoryview, index_hash: bytes | None = None) -> int | None:
        """Store a block: data first, then its map entry. ``index_hash``: the block's hash,
        matched by the caller against a block index (trust "checked whole" is only ever added
        afterwards, by :meth:`mark_whole`). Returns the stored checksum, or None if the block was already there
        (another process stored it meanwhile; its copy stays, with the trust it has).

        The data is written without the locks held, on a descriptor of its own (the entry may
        close or reopen its files meanwhile), so workers storing other blocks of the blob, or
        other processes, do not wait for this disk write. Two writers of the same block that
        race both write its slot; the map entry that lands first stays, and if its checksum
        does not fit the bytes that landed last, the block fails its check when read and is
        fetched again: a rare race costs a fetch, never a wrong byte."""
        if len(data) != self.block_length(index):
            raise CacheError(f"block {index} of {self.digest} has {len(data)} bytes, expected {self.block_length(index)}")
        offset = index * self.block_size
        try:
            for _ in range(3):
                with self._writing():
                    if self._refresh_entry(index).present:
                        return None
                    payload, flags = self._encode(data)
                    direct = self._direct_ok and len(payload) % DIRECT_ALIGNMENT == 0 and is_aligned(payload)
                    fd = os.dup(self._direct_descriptor() if direct else self._data_fd)
                    files = self._inode
                try:
                    check = checksum(payload)  # while the bytes are still in the CPU's cache
                    written = os.pwrite(fd, payload, offset)
                except OSError as exc:
                    if not direct or exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    log.info("cache filesystem refuses O_DIRECT (%s); writing %s through the page cache",
                             exc.strerror, self.digest)
                    self._direct_ok = False
                    continue
                finally:
                    os.close(fd)
                if written != len(payload):  # a nearly full disk takes what fits and says so only here
                    raise CacheError(f"cannot write to the cache for {self.digest}: No space left on device "
                                     f"(wrote {written} of {len(payload)} bytes of block {index})")
                with self._writing():
                    if self._inode != files:
                        continue  # the files were replaced while we wrote: into the current ones
                    if self._refresh_entry(index).present:
                        return None
                    flags |= PRESENT | (INDEXED if index_hash is not None else 0)
                    self._put_entry(index, Entry(len(payload), flags, check, index_hash or bytes(32)))
                    return check
            raise CacheError(f"cache files of {self.digest} keep being replaced; giving up on block {index}")
        except OSError as exc:
            raise CacheError(f"cannot write to the cache for {self.digest}: {exc.strerror}") from None

    def forget(self, index: int) -> None:
        """Drop a block that does not read back, so it is fetched again."""
        self._window.drop(self.data_path, index)
        try:
            with self._writing():
                self._put_entry(index, Entry(0, 0, 0, bytes(32)))
        except OSError as exc:
            raise CacheError(f"cannot update the cache map for {self.digest}: {exc.strerror}") from None
        finally:
            self._window.drop(self.data_path, index)  # a reader may have put it back meanwhile

    def adopt(self, index: int, index_hash: bytes, check: int) -> None:
        """Record that a block already stored (with checksum ``check``) matched the block index."""
        self._upgrade({index: check}, INDEXED, index_hash)

    def _upgrade(self, checks: dict[int, int], flag: int, index_hash: bytes | None = None) -> int:
        """Add ``flag`` to the entries still holding the bytes that were checked (same
        checksum): a block replaced meanwhile by another process keeps its own trust."""
        upgraded = 0
        try:
            with self._writing():
                for index, check in checks.items():
                    entry = self._refresh_entry(index)
                    if entry.present and entry.check == check:
                        self._put_entry(index, Entry(entry.length, entry.flags | flag, check,
                                                     index_hash if index_hash is not None else entry.index_hash))
                        upgraded += 1
        except OSError as exc:
            raise CacheError(f"cannot update the cache map for {self.digest}: {exc.strerror}") from None
        return upgraded

    def _encode(self, data: bytes | bytearray | memoryview) -> tuple[bytes | bytearray | memoryview, int]:
        if self._policy == _POLICY_RAW:
            return data, 0
        packed = lz4.block.compress(data, store_size=False)
        if self._policy == _POLICY_UNDECIDED:
            self._policy = _POLICY_LZ4 if len(packed) < _LZ4_WORTH_IT * len(data) else _POLICY_RAW
            os.pwrite(self._map_fd, self._header(), 0)
            log.debug("cache policy for %s: %s", self.digest, "lz4" if self._policy == _POLICY_LZ4 else "raw")
        if len(packed) < len(data):
            return packed, LZ4
        return data, 0

    # -- whole blob -----------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Cheap on every call: the count says so, or blocks another process stored are
        found by scanning on from the first block not known present."""
        if self._present >= self.nblocks:
            return True
        while self._scan_from < self.nblocks and self.has(self._scan_from):
            self._scan_from += 1
        return self._scan_from >= self.nblocks

    @property
    def complete_here(self) -> bool:
        """Every block is present as far as this process knows (no look at the disk: for a
        check after each stored block; :attr:`complete` also finds other processes' blocks)."""
        return self._present >= self.nblocks

    @property
    def verified(self) -> bool:
        """Every block is present and was part of the blob when it matched its digest."""
        return all(self.entry(i).flags & WHOLE for i in range(self.nblocks))

    def cached_bytes(self) -> int:
        """Bytes present, from the count of present blocks (cheap: status asks every second)."""
        if not self._present:
            return 0
        last = self.nblocks - 1
        short = self.block_size - self.block_length(last) if self.entry_at(last).present else 0
        return self._present * self.block_size - short

    def stored_bytes(self) -> int:
        return sum(self.entry_at(i).length for i in range(self.nblocks))

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
        try:
            with self._mutex:
                self._current()
                os.fdatasync(self._data_fd)
        except OSError as exc:
            raise CacheError(f"cannot flush the cache data of {self.digest}: {exc.strerror}") from None
        return self._upgrade(checks, WHOLE) == self.nblocks

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
        keeps reading consistent bytes until it notices (see the module docstring)."""
        self._window.drop(self.data_path)
        try:
            with self._mutex:
                self._replace_files()
                self._close_fds()
                self._open()
        except OSError as exc:
            raise CacheError(f"cannot clear the cache of {self.digest}: {exc.strerror}") from None

    def _replace_files(self) -> None:
        """Rename fresh files over the blob's (the map first: a reader that opens the new map
        with the old data sees no blocks; one that meets a block of the other pair fails its
        checksum)."""
        for path, header in ((self.map_path, True), (self.data_path, False)):
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.new"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if header:
                    os.pwrite(fd, _HEADER.pack(_MAGIC, self.block_size, self.size, self.nblocks,
                                               _POLICY_UNDECIDED).ljust(_HEADER_SIZE, b"\0"), 0)
                    os.ftruncate(fd, _HEADER_SIZE + self.nblocks * _ENTRY.size)
            finally:
                os.close(fd)
            os.replace(tmp, path)

    def stats(self) -> BlobStats:
        return BlobStats(self.digest, self.size, self.cached_bytes(), self.stored_bytes(), self.complete, self.verified)

    def close(self) -> None:
        with self._mutex:
            self._close_fds()


class VolatileEntry(BlobEntry):
    """A blob whose cache files cannot be set up (a full or read-only cache disk): nothing is
    stored, and blocks checked on arrival are served from memory. A blob that can only be
    checked whole cannot be served this way; its reads fail with the reason."""

    def __init__(self, digest: str, size: int, block_size: int, reason: str, window: BlockWindow | None = None) -> None:
        self.reason = reason
        super().__init__(os.devnull, digest, size, block_size, window=window)

    def _open(self) -> None:
        self._checked_at = time.monotonic()

    def _current(self, force: bool = False) -> None:
        return None

    def _refresh_entry(self, index: int) -> Entry:
        return self.entry_at(index)

    def write_block(self, index: int, data: bytes | bytearray | memoryview, index_hash: bytes | None = None) -> int | None:
        raise CacheError(f"the cache cannot store {self.digest}: {self.reason}")

    def forget(self, index: int) -> None:
        return None

    def _upgrade(self, checks: dict[int, int], flag: int, index_hash: bytes | None = None) -> int:
        return 0

    def mark_whole(self, checks: dict[int, int]) -> bool:
        return False

    def clear(self) -> None:
        return None


class _Flock:
    """Excludes other processes (flock) and other threads of this one (the mutex)."""

    def __init__(self, fd: int, mutex: threading.RLock) -> None:
        self.fd, self.mutex = fd, mutex

    def __enter__(self) -> None:
        self.mutex.acquire()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.mutex.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.mutex.release()


class _WriteLock:
    """The mutex and the flock of the blob's *current* map: after taking the flock the path
    is checked again, since another process may have replaced the files meanwhile."""

    def __init__(self, entry: BlobEntry) -> None:
        self.entry = entry

    def __enter__(self) -> None:
        entry = self.entry
        entry._mutex.acquire()
        try:
            entry._current()
            for _ in range(100):
                fcntl.flock(entry._map_fd, fcntl.LOCK_EX)
                if not entry._replaced():
                    return
                fcntl.flock(entry._map_fd, fcntl.LOCK_UN)
                entry._current(force=True)
            raise CacheError(f"cache files of {entry.digest} keep being replaced; giving up")
        except BaseException:
            entry._mutex.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self.entry._map_fd >= 0:
                fcntl.flock(self.entry._map_fd, fcntl.LOCK_UN)
        finally:
            self.entry._mutex.release()


@dataclass(frozen=True)
class BlobUsage:
    digest: str
    size: int
    cached_bytes: int
    disk_bytes: int
    verified: bool
    last_used: float


def touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _read_header(map_path: str) -> tuple[int, int, bool]:
    """(blob size, cached bytes, every block checked: whole or against a block index) from a
    map file, read only. For ``cache stats``; mounts decide trust block by block."""
    with open(map_path, "rb") as handle:
        header = handle.read(_HEADER_SIZE)
        if len(header) < _HEADER.size:
            raise OSError("not a modelfs map")
        magic, bs, size, nblocks, _policy = _HEADER.unpack_from(header)
        if magic != _MAGIC or not bs:
            raise OSError("not a modelfs map")
        raw = handle.read(nblocks * _ENTRY.size)
    entries = [_decode_entry(raw, i * _ENTRY.size) for i in range(len(raw) // _ENTRY.size)]
    cached = sum(min(bs, size - i * bs) for i, e in enumerate(entries) if e.present)
    verified = len(entries) == nblocks and all(e.checked for e in entries)
    return size, cached, verified


def _open_file_budget() -> int:
    """Blobs whose files stay open at once (two descriptors each): a model of thousands of
    one-file layers must not run the process out of descriptors. A quarter of the limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:  # what systemd and most shells allow: raise the soft limit to the hard one
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
            soft = hard if hard != resource.RLIM_INFINITY else 1 << 20
        except (ValueError, OSError):
            pass
    return max(8, min(4096, (soft if soft != resource.RLIM_INFINITY else 1 << 16) // 8))


class BlockCache:
    def __init__(self, root: str, block_size: int = DEFAULT_BLOCK_SIZE, max_open: int | None = None,
                 window: BlockWindow | None = None) -> None:
        self.root = root
        self.block_size = block_size
        self.window = window if window is not None else shared_window()  # one byte bound per process
        self._dir = os.path.join(root, "blobs", "sha256")
        if os.path.exists(root) and not os.path.isdir(root):
            raise CacheError(f"cache directory {root} is not a directory (use --cache-dir)")
        try:
            os.makedirs(self._dir, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create cache directory {self._dir}: {exc.strerror} (use --cache-dir)") from None
        self._entries: dict[str, BlobEntry] = {}
        self._open: OrderedDict[str, BlobEntry] = OrderedDict()  # least recently opened first
        self._open_lock = threading.Lock()
        self.max_open = max_open or _open_file_budget()

    def entry(self, digest: str, size: int) -> BlobEntry:
        found = self._entries.get(digest)
        if found is None:
            try:
                found = BlobEntry(self._dir, digest, size, self.block_size, self._opened, self.window)
                touch(found.map_path)
            except CacheError as exc:
                log.error("%s; serving %s from memory, without caching it", exc, digest)
                found = VolatileEntry(digest, size, self.block_size, str(exc), self.window)
            self._entries[digest] = found
        return found

    def holds(self, digest: str) -> bool:
        """Whether the cache has files for ``digest`` (without creating them)."""
        return digest in self._entries or os.path.exists(os.path.join(self._dir, digest.split(":", 1)[1] + ".map"))

    def claims_path(self, digest: str) -> str:
        """The claims file of ``digest`` (see claims.py), also for blobs held only as derived entries."""
        return os.path.join(self._dir, digest.split(":", 1)[1] + ".claims")

    def _opened(self, entry: BlobEntry) -> None:
        """Keep at most ``max_open`` blobs' files open, closing the least recently opened
        (an entry reopens its files on next use)."""
        with self._open_lock:  # entries open their files from worker threads too
            self._open[entry.digest] = entry
            self._open.move_to_end(entry.digest)
            excess = len(self._open) - self.max_open
            closed: list[str] = []
            for digest, other in self._open.items():  # the oldest first, only as far as needed: a
                if len(closed) >= excess:  # copy of all 4,096 per open cost 3 s per 20,000 blobs
                    break
                if other is not entry and (not other.is_open or other.release()):
                    closed.append(digest)
            for digest in closed:
                del self._open[digest]

    def release_replaced(self) -> int:
        """Close the files of blobs evicted or cleared by another process (``cache prune``,
        another mount's size limit), so their disk space is freed now rather than at this
        process's next read of them. Returns how many were let go."""
        released = 0
        for entry in list(self._entries.values()):
            if entry.is_open and entry._replaced() and entry.release():
                released += 1
        return released

    def open_files(self) -> int:
        return sum(2 for e in self._entries.values() if e.is_open)

    def evict(self, digest: str) -> None:
        """Free a blob's disk space: its files are removed. A process holding them (this one
        or another) keeps valid bytes and notices within RECHECK_SECONDS, then reopens."""
        hexpart = digest.split(":", 1)[1]
        self.window.drop(os.path.join(self._dir, hexpart + ".data"))
        for suffix in (".map", ".data", ".claims"):
            try:
                os.unlink(os.path.join(self._dir, hexpart + suffix))
            except FileNotFoundError:
                pass
        entry = self._entries.get(digest)
        if entry is not None:
            with entry._mutex:
                entry._close_fds()

    def usage(self) -> list[BlobUsage]:
        """Every cached blob with its bytes on disk and last use, least recently used first."""
        found = []
        for name in os.listdir(self._dir):
            if not name.endswith(".map"):
                continue
            hexpart = name[:-4]
            try:
                map_stat = os.stat(os.path.join(self._dir, name))
                data_stat = os.stat(os.path.join(self._dir, hexpart + ".data"))
                header = _read_header(os.path.join(self._dir, name))
            except OSError:
                continue
            found.append(BlobUsage("sha256:" + hexpart, header[0], header[1], data_stat.st_blocks * 512,
                                   header[2], max(map_stat.st_mtime, data_stat.st_mtime)))
        return sorted(found, key=lambda u: u.last_used)

    def record_model(self, reference: str, digest: str, layers: list[tuple[str, int, str]],
                     manifest: bytes = b"", media_type: str = "", config: bytes = b"", index: bytes = b"") -> None:
        """Remember which blobs make up a model (``cache stats``) and, with its manifest and
        config, enough to mount it again while the registry cannot be reached. A disk too
        full to take the record costs only that: it is logged, and nothing is left behind."""
        directory = os.path.join(self.root, "models")
        doc = {"reference": reference, "digest": digest, "recorded": time.time(),
               "layers": [{"digest": d, "size": n, "path": p} for d, n, p in layers]}
        if manifest:
            doc.update(manifest=base64.b64encode(manifest).decode(), media_type=media_type,
                       config=base64.b64encode(config).decode())  # bytes exactly: digests are checked on use
        if index:
            doc["index"] = base64.b64encode(index).decode()
        tmp = os.path.join(directory, f".{digest[7:]}.{os.getpid()}.tmp")
        try:
            os.makedirs(directory, exist_ok=True)
            with open(tmp, "w") as handle:
                json.dump(doc, handle)
            os.replace(tmp, os.path.join(directory, digest[7:] + ".json"))
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise CacheError(f"cannot record {reference} in {directory}: {exc.strerror}") from None
            log.warning("cannot record %s in the cache (%s); an offline mount will not find it", reference, exc.strerror)

    def recorded_model(self, reference: str, digest: str | None = None) -> dict | None:
        """The newest record of ``reference`` (or of ``digest``) that kept its manifest."""
        found = [m for m in self.models() if m.get("manifest")
                 and (m.get("digest") == digest if digest else m.get("reference") == reference)]
        return max(found, key=lambda m: m.get("recorded", 0), default=None)

    def forget_models(self) -> int:
        """Delete every model record (``cache prune --all``); returns how many there were."""
        directory = os.path.join(self.root, "models")
        count = 0
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name.endswith(".json"):
                try:
                    os.unlink(os.path.join(directory, name))
                    count += 1
                except OSError:
                    continue
        return count

    def models(self) -> list[dict]:
        directory = os.path.join(self.root, "models")
        out = []
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            if name.endswith(".json"):
                try:
                    with open(os.path.join(directory, name)) as handle:
                        out.append(json.load(handle))
                except (OSError, ValueError):
                    continue
        return out

    def close(self) -> None:
        for entry in self._entries.values():
            entry.close()
        self._entries.clear()
        self._open.clear()
