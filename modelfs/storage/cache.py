"""The persistent block cache, shared by every mount and by ``pull``: one directory, every
blob's files content-addressed in it so any process that needs blob D finds them::

    blobs/sha256/<hex>.data   sparse file: block i lives at offset i * block_size
    blobs/sha256/<hex>.map    header + one 48-byte entry per block (mapformat.py)
    blobs/sha256/<hex>.claims empty: locks on it say which blocks a process is fetching (claims.py)
    models/<hex>.json         what makes up each model pulled or mounted (records.py)

:class:`BlockCache` hands out one :class:`~.entry.BlobEntry` per blob, over its files
(:mod:`.disk`) or, when they cannot be set up, over no disk at all (:mod:`.memory`); keeps the
number of open files within a budget; and says what each blob costs on disk, for ``cache
stats`` and eviction. Eviction removes files rather than emptying them, so another process
reading a blob keeps valid bytes (see :mod:`.files`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

from ..errors import CacheError
from .disk import DiskStore
from .entry import BlobEntry, VolatileEntry
from .files import BlobFiles
from .mapformat import ENTRY, HEADER_SIZE, Header, usage
from .records import ModelRecords
from .store import BlobPaths
from .window import BlockWindow, shared_window

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1 << 20


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
        header = Header.decode(handle.read(HEADER_SIZE))
        if header is None or not header.block_size:
            raise OSError("not a modelfs map")
        raw = handle.read(header.nblocks * ENTRY.size)
    cached, verified = usage(header, raw)
    return header.size, cached, verified


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
    """One cache directory: an entry per blob asked for, open files within a budget, and
    what each blob costs on disk. Any number of processes may share the directory."""

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
        self._open: OrderedDict[str, BlobFiles] = OrderedDict()  # least recently opened first
        self._open_lock = threading.Lock()
        self.max_open = max_open or _open_file_budget()
        self.records = ModelRecords(root)  # what makes up each model, for stats and offline mounts

    def entry(self, digest: str, size: int) -> BlobEntry:
        found = self._entries.get(digest)
        if found is None:
            try:
                store = DiskStore(self._dir, digest, size, self.block_size, self.window, self._opened)
                found = BlobEntry(store, self.window)
                touch(found.map_path)
            except CacheError as exc:
                log.error("%s; serving %s from memory, without caching it", exc, digest)
                found = VolatileEntry(digest, size, self.block_size, str(exc), self.window)
            self._entries[digest] = found
        return found

    def holds(self, digest: str) -> bool:
        """Whether the cache has files for ``digest`` (without creating them)."""
        return digest in self._entries or os.path.exists(BlobPaths.under(self._dir, digest).map)

    def claims_path(self, digest: str) -> str:
        """The claims file of ``digest`` (see claims.py), also for blobs held only as derived entries."""
        return BlobPaths.under(self._dir, digest).claims

    def _opened(self, files: BlobFiles) -> None:
        """Keep at most ``max_open`` blobs' files open, closing the least recently opened
        (an entry reopens its files on next use)."""
        with self._open_lock:  # entries open their files from worker threads too
            self._open[files.digest] = files
            self._open.move_to_end(files.digest)
            excess = len(self._open) - self.max_open
            closed: list[str] = []
            for digest, other in self._open.items():  # the oldest first, only as far as needed: a
                if len(closed) >= excess:  # copy of all 4,096 per open cost 3 s per 20,000 blobs
                    break
                if other is not files and (not other.is_open or other.release()):
                    closed.append(digest)
            for digest in closed:
                del self._open[digest]

    def release_replaced(self) -> int:
        """Close the files of blobs evicted or cleared by another process (``cache prune``,
        another mount's size limit), so their disk space is freed now rather than at this
        process's next read of them. Returns how many were let go."""
        released = 0
        for entry in list(self._entries.values()):
            if entry.is_open and entry.store.replaced() and entry.release():
                released += 1
        return released

    def open_files(self) -> int:
        return sum(2 for e in self._entries.values() if e.is_open)

    def evict(self, digest: str) -> None:
        """Free a blob's disk space: its files are removed. A process holding them (this one
        or another) keeps valid bytes and notices within RECHECK_SECONDS, then reopens."""
        paths = BlobPaths.under(self._dir, digest)
        self.window.drop(paths.data)
        for path in (paths.map, paths.data, paths.claims):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        entry = self._entries.get(digest)
        if entry is not None:
            entry.close()

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

    def close(self) -> None:
        for entry in self._entries.values():
            entry.close()
        self._entries.clear()
        self._open.clear()


# A mount past its size limit evicts down to 90% of it, not to the limit itself, so that the
# next blocks fetched do not start another eviction straight away.
PRUNE_TO = 0.9


@dataclass(frozen=True)
class Pruned:
    before: int  # bytes on disk before
    evicted: list[BlobUsage]  # least recently used first

    @property
    def freed(self) -> int:
        return sum(blob.disk_bytes for blob in self.evicted)

    @property
    def left(self) -> int:
        return self.before - self.freed


def prune(cache: BlockCache, keep: int, *, over: int | None = None, pinned: Collection[str] = ()) -> Pruned:
    """Evict least recently used blobs until at most ``keep`` bytes stay on disk, leaving
    ``pinned`` ones alone; and only if more than ``over`` bytes are there, when given. The one
    eviction loop: ``modelfs cache prune`` (keep what was asked) and a mount's size limit (past
    the limit, down to ``PRUNE_TO`` of it, never a blob a read is waiting on) both run it.
    Eviction removes files rather than emptying them, so another process reading a blob keeps
    valid bytes (see :meth:`BlockCache.evict`)."""
    usage = cache.usage()
    total = sum(blob.disk_bytes for blob in usage)
    evicted: list[BlobUsage] = []
    if over is not None and total <= over:
        return Pruned(total, evicted)
    left = total
    for blob in usage:
        if left <= keep:
            break
        if blob.digest in pinned:
            continue
        cache.evict(blob.digest)
        evicted.append(blob)
        left -= blob.disk_bytes
    return Pruned(total, evicted)
