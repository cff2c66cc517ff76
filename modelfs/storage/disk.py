"""A blob's blocks on disk: the store of every blob whose files could be set up.

Blocks go to the ``.data`` file, then their entry to the ``.map`` (:mod:`.mapformat`), so an
entry never names bytes that were not written first; a power cut between the two leaves a
hole its entry names, which fails its checksum when read back and is fetched again. This is
why block writes need no fsync: a block that did not reach the disk cannot pass. Only the
mark that a blob was checked whole (``WHOLE``) waits for its data to be flushed, since that
mark outlives the check. (Mountpoint for S3 checks its cache blocks with CRC32C for the same
reason.) Files and locks: :mod:`.files`.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from ..errors import CacheError
from .direct import DIRECT_ALIGNMENT, is_aligned, refused
from .files import BlobFiles
from .mapformat import (
    ABSENT,
    EMPTY_ENTRY,
    ENTRY,
    HEADER_SIZE,
    INDEXED,
    POLICY_LZ4,
    PRESENT,
    WHOLE,
    BlockMap,
    Buffer,
    Entry,
    Header,
    checksum,
    encode_block,
    entry_offset,
)
from .store import BlobPaths, BlockDamaged, Files
from .window import BlockWindow

log = logging.getLogger(__name__)


class DiskStore:
    """:class:`~.store.BlobStore` over the blob's files in the cache directory."""

    def __init__(self, directory: str, digest: str, size: int, block_size: int, window: BlockWindow,
                 on_open: Callable[[BlobFiles], None] | None = None) -> None:
        self.digest = digest
        self.paths = BlobPaths.under(directory, digest)
        self.map = BlockMap(Header.of(size, block_size))
        self._files = BlobFiles(self.paths, digest, self.map, window, on_open)

    @property
    def is_open(self) -> bool:
        return self._files.is_open

    @property
    def files(self) -> Files:
        return self._files.inode

    def files_id(self) -> Files:
        try:
            with self._files.mutex:
                self._files.current(force=True)
                return self._files.inode
        except OSError as exc:
            raise CacheError(f"cannot open cache files for {self.digest}: {exc.strerror}") from None

    def refresh(self) -> None:
        if self._files.stale():
            with self._files.mutex:
                self._files.current()

    def replaced(self) -> bool:
        return self._files.replaced()

    def read_entry(self, index: int) -> Entry:
        with self._files.mutex:
            self._files.current()
            raw = os.pread(self._files.map_fd, ENTRY.size, entry_offset(index))
        raw = raw if len(raw) == ENTRY.size else EMPTY_ENTRY
        self.map.set(index, raw)
        return Entry.decode(raw)

    def reload(self) -> None:
        try:
            with self._files.mutex:
                self._files.current(force=True)
                if self._files.map_fd < 0:
                    return
                raw = os.pread(self._files.map_fd, self.map.nblocks * ENTRY.size, HEADER_SIZE)
        except OSError as exc:
            raise CacheError(f"cannot read the cache map of {self.digest}: {exc.strerror}") from None
        raw = raw.ljust(self.map.nblocks * ENTRY.size, b"\0")
        for index in range(self.map.nblocks):
            self.map.set(index, raw[index * ENTRY.size:(index + 1) * ENTRY.size])

    def read(self, index: int) -> tuple[bytes, Entry, Files]:
        """The block's stored bytes, the entry and the files they were read with. The read
        itself runs outside the mutex, on a duplicate of the descriptor (the same open file,
        so the same files even if they are replaced or released meanwhile): readers of one
        blob on several worker threads read the disk in parallel, not one after another."""
        try:
            with self._files.mutex:
                self._files.current()
                entry = self.map.get(index)  # of the files we now hold (another process may have replaced them)
                if not entry.present:
                    raise CacheError(f"block {index} of {self.digest} is not cached")
                files = self._files.inode
                fd = os.dup(self._files.data_fd)
            try:
                data = os.pread(fd, entry.length, index * self.map.block_size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise BlockDamaged(f"cannot read cache data for {self.digest} block {index}: {exc.strerror}") from None
        return data, entry, files

    def write(self, index: int, data: Buffer, index_hash: bytes | None) -> int | None:
        """Data first, then its map entry. The data is written without the locks held, on a
        descriptor of its own (the files may be closed or reopened meanwhile), so workers
        storing other blocks of the blob, or other processes, do not wait for this disk
        write. Two writers of the same block that race both write its slot; the map entry
        that lands first stays, and if its checksum does not fit the bytes that landed last,
        the block fails its check when read and is fetched again: a rare race costs a fetch,
        never a wrong byte."""
        files = self._files
        try:
            for _ in range(3):
                with files.writing():
                    if self.read_entry(index).present:
                        return None
                    payload, flags = self._encode(data)
                    direct = files.direct_ok and len(payload) % DIRECT_ALIGNMENT == 0 and is_aligned(payload)
                    fd = os.dup(files.direct_descriptor() if direct else files.data_fd)
                    inode = files.inode
                try:
                    check = checksum(payload)  # while the bytes are still in the CPU's cache
                    written = os.pwrite(fd, payload, index * self.map.block_size)
                except OSError as exc:
                    if not direct or exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    refused(exc, self.digest)
                    files.direct_ok = False
                    continue
                finally:
                    os.close(fd)
                if written != len(payload):  # a nearly full disk takes what fits and says so only here
                    raise CacheError(f"cannot write to the cache for {self.digest}: No space left on device "
                                     f"(wrote {written} of {len(payload)} bytes of block {index})")
                with files.writing():
                    if files.inode != inode:
                        continue  # the files were replaced while we wrote: into the current ones
                    if self.read_entry(index).present:
                        return None
                    flags |= PRESENT | (INDEXED if index_hash is not None else 0)
                    self._put(index, Entry(len(payload), flags, check, index_hash or bytes(32)))
                    return check
            raise CacheError(f"cache files of {self.digest} keep being replaced; giving up on block {index}")
        except OSError as exc:
            raise CacheError(f"cannot write to the cache for {self.digest}: {exc.strerror}") from None

    def _encode(self, data: Buffer) -> tuple[Buffer, int]:
        """The block as stored under the blob's lz4 policy; its first block decides the
        policy, which is then kept in the map's header. Write lock held."""
        encoded = encode_block(data, self.map.policy)
        if encoded.policy != self.map.policy:
            self.map.policy = encoded.policy
            os.pwrite(self._files.map_fd, self.map.header().encode(), 0)
            log.debug("cache policy for %s: %s", self.digest, "lz4" if encoded.policy == POLICY_LZ4 else "raw")
        return encoded.payload, encoded.flags

    def _put(self, index: int, entry: Entry) -> None:
        raw = entry.encode()
        os.pwrite(self._files.map_fd, raw, entry_offset(index))
        self.map.set(index, raw)

    def forget(self, index: int) -> None:
        try:
            with self._files.writing():
                self._put(index, ABSENT)
        except OSError as exc:
            raise CacheError(f"cannot update the cache map for {self.digest}: {exc.strerror}") from None

    def upgrade(self, checks: dict[int, int], flag: int, index_hash: bytes | None = None) -> int:
        """Only entries still holding the bytes that were checked (same checksum): a block
        replaced meanwhile by another process keeps its own trust."""
        upgraded = 0
        try:
            with self._files.writing():
                for index, check in checks.items():
                    entry = self.read_entry(index)
                    if entry.present and entry.check == check:
                        self._put(index, Entry(entry.length, entry.flags | flag, check,
                                               index_hash if index_hash is not None else entry.index_hash))
                        upgraded += 1
        except OSError as exc:
            raise CacheError(f"cannot update the cache map for {self.digest}: {exc.strerror}") from None
        return upgraded

    def mark_whole(self, checks: dict[int, int]) -> bool:
        try:
            with self._files.mutex:
                self._files.current()
                os.fdatasync(self._files.data_fd)
        except OSError as exc:
            raise CacheError(f"cannot flush the cache data of {self.digest}: {exc.strerror}") from None
        return self.upgrade(checks, WHOLE) == self.map.nblocks

    def clear(self) -> None:
        try:
            with self._files.mutex:
                self._files.replace()
                self._files.close_fds()
                self._files.open()
        except OSError as exc:
            raise CacheError(f"cannot clear the cache of {self.digest}: {exc.strerror}") from None

    def release(self) -> bool:
        return self._files.release()

    def close(self) -> None:
        self._files.close()
