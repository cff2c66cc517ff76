"""Where one blob's blocks rest: the interface :class:`~.entry.BlobEntry` is given, and its errors.

Two implementations, as a cache interface with a disk and an in-memory implementation
(mountpoint-s3's ``data_cache``): :class:`~.disk.DiskStore`, the blob's ``.data`` and ``.map``
files; and :class:`~.memory.NoDisk`, for a blob whose files cannot be set up (a full or
read-only cache disk), where nothing is stored and blocks checked on arrival are served from
memory by the reader. The entry decides what is served (checksums, trust, the window); a
store only keeps bytes and map entries, and says which files hold them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from ..errors import CacheError
from .mapformat import BlockMap, Buffer, Entry

RECHECK_SECONDS = 0.5  # how stale a reader's view of "are these still the blob's files" may get
Files = tuple[int, int]  # the inodes of a blob's map and data files: which files hold it


class BlockDamaged(CacheError):
    """A cached block does not read back as it was stored; it is dropped and fetched again."""


class FilesReplaced(CacheError):
    """The files of a blob being checked whole were replaced by another process meanwhile
    (``cache prune``, another mount's eviction): what the check stored is gone, so it starts
    again instead of failing the reads waiting for it."""


@dataclass(frozen=True)
class BlobPaths:
    """A blob's files under the cache's ``blobs/sha256``, content-addressed so any process
    that needs blob D finds them: data, map, and claims (see :mod:`.claims`)."""

    data: str
    map: str
    claims: str

    @classmethod
    def under(cls, directory: str, digest: str) -> BlobPaths:
        stem = os.path.join(directory, digest.split(":", 1)[1])
        return cls(f"{stem}.data", f"{stem}.map", f"{stem}.claims")


class BlobStore(Protocol):
    """One blob's stored blocks and map. Methods are synchronous and short; any may run in a
    worker thread."""

    digest: str
    paths: BlobPaths
    map: BlockMap  # the entries as this process last read them; the store keeps it current

    @property
    def is_open(self) -> bool:
        """Whether files are held open now (they are reopened on next use)."""

    @property
    def files(self) -> Files:
        """The files held now, as last looked at: part of the version a copy in memory is valid for."""

    def files_id(self) -> Files:
        """The files that hold the blob now, looked at on disk just now."""

    def refresh(self) -> None:
        """Use the blob's current files, looking at the disk at most every RECHECK_SECONDS."""

    def replaced(self) -> bool:
        """Whether the files held are no longer the blob's (cleared or evicted elsewhere)."""

    def read_entry(self, index: int) -> Entry:
        """Block ``index``'s entry as it rests now (another process may have stored it)."""

    def reload(self) -> None:
        """Every entry as it rests now."""

    def read(self, index: int) -> tuple[bytes, Entry, Files]:
        """The stored bytes of a present block, unchecked, with the entry and the files they
        were read under; CacheError if it is not stored, BlockDamaged if it cannot be read."""

    def write(self, index: int, data: Buffer, index_hash: bytes | None) -> int | None:
        """Store a block: its stored checksum, or None if it was there already."""

    def forget(self, index: int) -> None:
        """Drop a block (its entry) so it is fetched again."""

    def upgrade(self, checks: dict[int, int], flag: int, index_hash: bytes | None = None) -> int:
        """Add ``flag`` to the blocks still stored with these checksums; how many were."""

    def mark_whole(self, checks: dict[int, int]) -> bool:
        """The blob matched its digest with these blocks: flush, then flag every one WHOLE.
        True if every block of the blob now is."""

    def clear(self) -> None:
        """Drop every block, replacing the files rather than emptying them."""

    def release(self) -> bool:
        """Close the files; False if a thread is using them."""

    def close(self) -> None:
        """Close the files (they are reopened on next use)."""
