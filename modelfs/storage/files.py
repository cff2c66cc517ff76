"""The two files of one cached blob, and the locks on them: opened, checked, replaced, never
emptied in place.

**Files are replaced, never emptied in place.** Clearing or evicting a blob renames fresh
files over the old ones (or unlinks them); another process that holds the old files keeps
reading valid bytes and notices the new inode within ``RECHECK_SECONDS`` (always before a
write), then reopens. The map is replaced first: a reader that opens the new map with the old
data sees no blocks; one that meets a block of the other pair fails its checksum. A map of
another format or blob (an older modelfs, a torn first write) is replaced the same way,
never rewritten under a reader.

Writers of one blob serialise on an ``flock`` of its current map, and the threads of one
process on a mutex as well: an ``flock`` alone would not exclude threads sharing one file
description. Block writes may run in worker threads (so a slow disk never stalls the event
loop); every use of the descriptors holds the mutex.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable

from ..errors import CacheError
from .direct import O_DIRECT, refused
from .mapformat import ENTRY, HEADER_SIZE, POLICY_UNDECIDED, BlockMap, Header
from .store import RECHECK_SECONDS, BlobPaths, Files
from .window import BlockWindow

log = logging.getLogger(__name__)


class BlobFiles:
    """The map and data files of one blob, open or not, and the map loaded from them."""

    def __init__(self, paths: BlobPaths, digest: str, blocks: BlockMap, window: BlockWindow,
                 on_open: Callable[[BlobFiles], None] | None = None) -> None:
        self.paths, self.digest, self.map = paths, digest, blocks
        self._window = window
        self._on_open = on_open  # the cache's count of open files
        self.mutex = threading.RLock()
        self.map_fd = self.data_fd = self._direct_fd = -1
        self.direct_ok = bool(O_DIRECT)  # until the filesystem refuses it
        self.inode: Files = (0, 0)
        self._checked_at = 0.0
        with self.mutex:
            self.open()

    def open(self) -> None:
        """Open the current files (creating them if absent) and load the map. Mutex held."""
        where = os.path.dirname(self.paths.map)
        for _ in range(2):
            try:
                self.map_fd = os.open(self.paths.map, os.O_RDWR | os.O_CREAT, 0o644)
                self.data_fd = os.open(self.paths.data, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self.close_fds()
                raise CacheError(f"cannot open cache files for {self.digest} in {where}: {exc.strerror}") from None
            try:
                with self.flock():
                    loaded = self._load_or_init()
                if loaded:
                    break
                # a map of another format or blob: replaced, never emptied under another reader
                log.warning("cache map for %s is unreadable, stale or of another format; starting it afresh", self.digest)
                self.close_fds()
                self.replace()
            except OSError as exc:
                self.close_fds()
                raise CacheError(f"cannot set up the cache map for {self.digest} in {where}: {exc.strerror}") from None
        inode = (os.fstat(self.map_fd).st_ino, os.fstat(self.data_fd).st_ino)
        if inode != self.inode:  # other files (replaced, evicted): no copy of the old ones is served
            self._window.drop(self.paths.data)
        self.inode = inode
        self._checked_at = time.monotonic()
        if self._on_open is not None:
            self._on_open(self)

    def _load_or_init(self) -> bool:
        """Load the map; a new (empty) one is set up here. False: it holds something else."""
        raw = os.pread(self.map_fd, HEADER_SIZE, 0)
        if raw:
            found = Header.decode(raw)
            if found is None or not found.same_blob(self.map.header()):
                return False
            self.map.load(found.policy, os.pread(self.map_fd, found.nblocks * ENTRY.size, HEADER_SIZE))
            return True
        self.map.load(POLICY_UNDECIDED)
        os.pwrite(self.map_fd, self.map.header().encode(), 0)
        os.pwrite(self.map_fd, self.map.entries(), HEADER_SIZE)
        return True

    def replace(self) -> None:
        """Rename fresh files over the blob's, the map first (see the module docstring)."""
        fresh = Header.of(self.map.size, self.map.block_size)
        for path, header in ((self.paths.map, True), (self.paths.data, False)):
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.new"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if header:
                    os.pwrite(fd, fresh.encode(), 0)
                    os.ftruncate(fd, fresh.map_size)
            finally:
                os.close(fd)
            os.replace(tmp, path)

    def close_fds(self) -> None:
        for fd in (self.map_fd, self.data_fd, self._direct_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.map_fd = self.data_fd = self._direct_fd = -1

    def close(self) -> None:
        with self.mutex:
            self.close_fds()

    def release(self) -> bool:
        """Close the files (they are reopened on next use); False if a thread is using them."""
        if not self.mutex.acquire(blocking=False):
            return False
        try:
            self.close_fds()
            return True
        finally:
            self.mutex.release()

    @property
    def is_open(self) -> bool:
        return self.map_fd >= 0

    def direct_descriptor(self) -> int:
        """The data file opened for O_DIRECT writes (mutex held), next to the buffered one."""
        if self._direct_fd < 0:
            try:
                self._direct_fd = os.open(self.paths.data, os.O_WRONLY | O_DIRECT)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                refused(exc, self.digest)
                self.direct_ok = False
                return self.data_fd
            if os.fstat(self._direct_fd).st_ino != os.fstat(self.data_fd).st_ino:  # replaced since we opened
                os.close(self._direct_fd)
                self._direct_fd = -1
                return self.data_fd
        return self._direct_fd

    def replaced(self) -> bool:
        """Whether the paths no longer name the files we hold (cleared or evicted elsewhere)."""
        try:
            return (os.stat(self.paths.map).st_ino, os.stat(self.paths.data).st_ino) != self.inode
        except FileNotFoundError:
            return True

    def stale(self) -> bool:
        """Whether :meth:`current` may have something to do (cheap, without the mutex)."""
        return self.map_fd < 0 or time.monotonic() - self._checked_at >= RECHECK_SECONDS

    def current(self, force: bool = False) -> None:
        """Make sure we use the blob's current files. Called with the mutex held."""
        if self.map_fd < 0:
            self.open()
            return
        now = time.monotonic()
        if not force and now - self._checked_at < RECHECK_SECONDS:
            return
        self._checked_at = now
        if self.replaced():
            log.debug("cache files of %s were replaced by another process; reopening", self.digest)
            self.close_fds()
            self.open()

    def flock(self) -> _Flock:
        return _Flock(self.map_fd, self.mutex)

    def writing(self) -> _WriteLock:
        return _WriteLock(self)


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

    def __init__(self, files: BlobFiles) -> None:
        self.files = files

    def __enter__(self) -> None:
        files = self.files
        files.mutex.acquire()
        try:
            files.current()
            for _ in range(100):
                fcntl.flock(files.map_fd, fcntl.LOCK_EX)
                if not files.replaced():
                    return
                fcntl.flock(files.map_fd, fcntl.LOCK_UN)
                files.current(force=True)
            raise CacheError(f"cache files of {files.digest} keep being replaced; giving up")
        except BaseException:
            files.mutex.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self.files.map_fd >= 0:
                fcntl.flock(self.files.map_fd, fcntl.LOCK_UN)
        finally:
            self.files.mutex.release()
