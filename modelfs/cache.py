"""The persistent block cache, shared by every mount and by ``pull``.

Layout under the cache root, content-addressed so any process that needs blob D finds it::

    blobs/sha256/<hex>.data   sparse file: block i lives at offset i * block_size
    blobs/sha256/<hex>.map    header + one 32-bit entry per block

A map entry is ``stored_length << 1 | lz4_flag`` (0 = absent). The data of a block is
written *before* its map entry, so a crash can lose a block but never make the map claim one
that is not on disk. Writers of one blob serialise on an ``flock`` of its map file; readers
in another process see new blocks by re-reading the entry when their in-memory copy says
absent. Whether a blob's blocks are lz4-compressed is decided once per blob from its first
written block (weights do not compress, tokenizers do), so incompressible data never pays.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import struct
import threading
from array import array
from dataclasses import dataclass

import lz4.block

from .errors import CacheError

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1 << 20
_MAGIC = b"MFSMAP01"
_HEADER = struct.Struct("<8sIQIII")  # magic, block_size, blob_size, nblocks, policy, verified
_HEADER_SIZE = 64
_ENTRY = 4
_POLICY_UNDECIDED, _POLICY_LZ4, _POLICY_RAW = 0, 1, 2
_LZ4_WORTH_IT = 0.85


def default_cache_dir() -> str:
    if os.geteuid() == 0:
        return "/var/cache/modelfs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "modelfs")


@dataclass(frozen=True)
class BlobStats:
    digest: str
    size: int
    cached_bytes: int
    stored_bytes: int
    complete: bool
    verified: bool


class BlobEntry:
    """One blob's cached blocks. Methods are synchronous and short. Block writes may run in
    a worker thread (so a slow disk never stalls the event loop); every change to the map or
    data files therefore holds both an in-process lock and the map's ``flock``, which alone
    would not exclude threads sharing one file description."""

    def __init__(self, directory: str, digest: str, size: int, block_size: int) -> None:
        self.digest, self.size = digest, size
        hexpart = digest.split(":", 1)[1]
        self.data_path = os.path.join(directory, f"{hexpart}.data")
        self.map_path = os.path.join(directory, f"{hexpart}.map")
        self._mutex = threading.RLock()
        self._count_lock = threading.Lock()
        self._checked: set[int] = set()
        self._scan_from = 0  # blocks before this are known present (see ``complete``)
        try:
            self._map_fd = os.open(self.map_path, os.O_RDWR | os.O_CREAT, 0o644)
            self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CacheError(f"cannot open cache files for {digest} in {directory}: {exc.strerror}") from None
        try:
            with self._locked():
                self._load_or_init(block_size)
        except OSError as exc:
            self.close()
            raise CacheError(f"cannot set up the cache map for {digest} in {directory}: {exc.strerror}") from None

    # -- map file -------------------------------------------------------------------------

    def _locked(self) -> "_Flock":
        return _Flock(self._map_fd, self._mutex)

    def _load_or_init(self, block_size: int) -> None:
        header = os.pread(self._map_fd, _HEADER_SIZE, 0)
        if len(header) >= _HEADER.size:
            magic, bs, size, nblocks, policy, verified = _HEADER.unpack_from(header)
            if magic == _MAGIC and bs > 0 and size == self.size and nblocks == -(-size // bs):
                self.block_size, self.nblocks, self._policy, self.verified = bs, nblocks, policy, bool(verified)
                raw = os.pread(self._map_fd, nblocks * _ENTRY, _HEADER_SIZE)
                self._entries = array("I", raw.ljust(nblocks * _ENTRY, b"\0"))
                self._present = sum(1 for e in self._entries if e)
                return
            log.warning("cache map for %s is unreadable or stale; starting it afresh", self.digest)
        self.block_size = block_size
        self.nblocks = -(-self.size // block_size)
        self._policy, self.verified = _POLICY_UNDECIDED, False
        self._entries = array("I", bytes(self.nblocks * _ENTRY))
        self._present = 0
        os.ftruncate(self._map_fd, 0)
        os.ftruncate(self._data_fd, 0)
        os.pwrite(self._map_fd, self._header(), 0)
        os.pwrite(self._map_fd, self._entries.tobytes(), _HEADER_SIZE)

    def _header(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.block_size, self.size, self.nblocks, self._policy, int(self.verified)).ljust(_HEADER_SIZE, b"\0")

    def _refresh_entry(self, index: int) -> int:
        raw = os.pread(self._map_fd, _ENTRY, _HEADER_SIZE + index * _ENTRY)
        value = struct.unpack("<I", raw)[0] if len(raw) == _ENTRY else 0
        if value != self._entries[index]:
            self._set_entry(index, value)
        return value

    def _set_entry(self, index: int, value: int) -> None:
        """The event loop refreshes entries while a worker thread may be storing one; a lock
        of its own (not the write lock, held through a whole block write) keeps the count exact."""
        with self._count_lock:
            if value and not self._entries[index]:
                self._present += 1
            self._entries[index] = value

    # -- blocks ---------------------------------------------------------------------------

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def has(self, index: int) -> bool:
        return bool(self._entries[index] or self._refresh_entry(index))

    def missing(self, first: int, last: int) -> list[int]:
        return [i for i in range(first, last + 1) if not self.has(i)]

    def read_block(self, index: int) -> bytes:
        entry = self._entries[index] or self._refresh_entry(index)
        if not entry:
            raise CacheError(f"block {index} of {self.digest} is not cached")
        stored, compressed = entry >> 1, entry & 1
        try:
            data = os.pread(self._data_fd, stored, index * self.block_size)
        except OSError as exc:
            raise CacheError(f"cannot read cache data for {self.digest} block {index}: {exc.strerror}") from None
        if len(data) != stored:
            raise CacheError(f"cache data for {self.digest} block {index} is truncated")
        if compressed:
            try:
                data = lz4.block.decompress(data, uncompressed_size=self.block_length(index))
            except lz4.block.LZ4BlockError:
                raise CacheError(f"cache data for {self.digest} block {index} does not decompress") from None
            if len(data) != self.block_length(index):
                raise CacheError(f"cache data for {self.digest} block {index} decompresses to the wrong size")
        return data

    def write_block(self, index: int, data: bytes | bytearray | memoryview, checked: bool = False) -> None:
        """Store a block. Data first, then the map entry: the map never runs ahead of the data.
        ``checked``: the caller matched it against the blob's block index (see ``all_checked``)."""
        if len(data) != self.block_length(index):
            raise CacheError(f"block {index} of {self.digest} has {len(data)} bytes, expected {self.block_length(index)}")
        payload, flag = self._encode(data)
        try:
            with self._locked():
                if self._refresh_entry(index):
                    return  # another process stored it meanwhile; its copy stays, unchecked by us
                written = os.pwrite(self._data_fd, payload, index * self.block_size)
                if written != len(payload):  # a nearly full disk takes what fits and says so only here
                    raise CacheError(f"cannot write to the cache for {self.digest}: No space left on device "
                                     f"(wrote {written} of {len(payload)} bytes of block {index})")
                entry = len(payload) << 1 | flag
                os.pwrite(self._map_fd, struct.pack("<I", entry), _HEADER_SIZE + index * _ENTRY)
                self._set_entry(index, entry)
                if checked:
                    self._checked.add(index)
        except OSError as exc:
            raise CacheError(f"cannot write to the cache for {self.digest}: {exc.strerror}") from None

    def forget(self, index: int) -> None:
        """Drop a block that does not read back, so it is fetched again."""
        try:
            with self._locked():
                os.pwrite(self._map_fd, struct.pack("<I", 0), _HEADER_SIZE + index * _ENTRY)
                with self._count_lock:
                    if self._entries[index]:
                        self._present -= 1
                    self._entries[index] = 0
                self._checked.discard(index)
                self._scan_from = min(self._scan_from, index)
                if self.verified:
                    self.verified = False
                    os.pwrite(self._map_fd, self._header(), 0)
        except OSError as exc:
            raise CacheError(f"cannot update the cache map for {self.digest}: {exc.strerror}") from None

    def _encode(self, data: bytes | bytearray | memoryview) -> tuple[bytes | bytearray | memoryview, int]:
        if self._policy == _POLICY_RAW:
            return data, 0
        packed = lz4.block.compress(data, store_size=False)
        if self._policy == _POLICY_UNDECIDED:
            self._policy = _POLICY_LZ4 if len(packed) < _LZ4_WORTH_IT * len(data) else _POLICY_RAW
            with self._locked():
                os.pwrite(self._map_fd, self._header(), 0)
            log.debug("cache policy for %s: %s", self.digest, "lz4" if self._policy == _POLICY_LZ4 else "raw")
        if len(packed) < len(data):
            return packed, 1
        return data, 0

    # -- whole blob -----------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Cheap on every call: the count says so, or blocks another process stored are
        found by scanning on from the first block not known present (blocks only go away
        in ``clear``, which resets the scan)."""
        if self._present >= self.nblocks:
            return True
        while self._scan_from < self.nblocks and self.has(self._scan_from):
            self._scan_from += 1
        return self._scan_from >= self.nblocks

    def cached_bytes(self) -> int:
        return sum(self.block_length(i) for i in range(self.nblocks) if self._entries[i])

    def stored_bytes(self) -> int:
        return sum(e >> 1 for e in self._entries)

    def digest_matches(self) -> bool:
        """Hash the complete blob. Pure reads, so it may run in a worker thread."""
        hasher = hashlib.sha256()
        for i in range(self.nblocks):
            hasher.update(self.read_block(i))
        return "sha256:" + hasher.hexdigest() == self.digest

    @property
    def all_checked(self) -> bool:
        """Every block on disk was written by this process after matching the block index, so
        the blob is verified without hashing it again. Blocks stored by another process or
        before a ``clear`` do not count."""
        return len(self._checked) == self.nblocks

    def mark_verified(self) -> None:
        self.verified = True
        with self._locked():
            os.pwrite(self._map_fd, self._header(), 0)

    def verify(self) -> bool:
        """Check a complete blob once; on mismatch drop every block so it is fetched again."""
        if self.digest_matches():
            self.mark_verified()
            return True
        log.error("cached blob %s does not match its digest; evicting it", self.digest)
        self.clear()
        return False

    def clear(self) -> None:
        with self._locked():
            self._entries = array("I", bytes(self.nblocks * _ENTRY))
            with self._count_lock:
                self._present = 0
            self._checked.clear()
            self._scan_from = 0
            self.verified = False
            os.pwrite(self._map_fd, self._header(), 0)
            os.pwrite(self._map_fd, self._entries.tobytes(), _HEADER_SIZE)
            os.ftruncate(self._data_fd, 0)

    def stats(self) -> BlobStats:
        return BlobStats(self.digest, self.size, self.cached_bytes(), self.stored_bytes(), self.complete, self.verified)

    def close(self) -> None:
        for fd in (self._map_fd, self._data_fd):
            try:
                os.close(fd)
            except OSError:
                pass


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
    """(blob size, cached bytes, verified) from a map file, without opening it for writing."""
    with open(map_path, "rb") as handle:
        header = handle.read(_HEADER_SIZE)
        magic, bs, size, nblocks, _policy, verified = _HEADER.unpack_from(header)
        if magic != _MAGIC or not bs:
            raise OSError("not a modelfs map")
        entries = array("I", handle.read(nblocks * _ENTRY))
    cached = sum(min(bs, size - i * bs) for i, e in enumerate(entries) if e)
    return size, cached, bool(verified)


class BlockCache:
    def __init__(self, root: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.root = root
        self.block_size = block_size
        self._dir = os.path.join(root, "blobs", "sha256")
        try:
            os.makedirs(self._dir, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create cache directory {self._dir}: {exc.strerror} (use --cache-dir)") from None
        self._entries: dict[str, BlobEntry] = {}

    def entry(self, digest: str, size: int) -> BlobEntry:
        found = self._entries.get(digest)
        if found is None:
            found = self._entries[digest] = BlobEntry(self._dir, digest, size, self.block_size)
            touch(found.map_path)
        return found

    def evict(self, digest: str) -> None:
        """Free a blob's disk space. Open here: emptied in place (reads fetch again);
        otherwise its files are removed (another process holding them keeps valid data)."""
        entry = self._entries.get(digest)
        if entry is not None:
            entry.clear()
            return
        hexpart = digest.split(":", 1)[1]
        for suffix in (".map", ".data"):
            try:
                os.unlink(os.path.join(self._dir, hexpart + suffix))
            except FileNotFoundError:
                pass

    def usage(self) -> list["BlobUsage"]:
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
                     manifest: bytes = b"", media_type: str = "", config: bytes = b"") -> None:
        """Remember which blobs make up a model (``cache stats``) and, with its manifest and
        config, enough to mount it again while the registry cannot be reached."""
        import json
        import time
        directory = os.path.join(self.root, "models")
        os.makedirs(directory, exist_ok=True)
        doc = {"reference": reference, "digest": digest, "recorded": time.time(),
               "layers": [{"digest": d, "size": n, "path": p} for d, n, p in layers]}
        if manifest:
            doc.update(manifest=base64.b64encode(manifest).decode(), media_type=media_type,
                       config=base64.b64encode(config).decode())  # bytes exactly: digests are checked on use
        tmp = os.path.join(directory, f".{digest[7:]}.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            json.dump(doc, handle)
        os.replace(tmp, os.path.join(directory, digest[7:] + ".json"))

    def recorded_model(self, reference: str, digest: str | None = None) -> dict | None:
        """The newest record of ``reference`` (or of ``digest``) that kept its manifest."""
        found = [m for m in self.models() if m.get("manifest")
                 and (m.get("digest") == digest if digest else m.get("reference") == reference)]
        return max(found, key=lambda m: m.get("recorded", 0), default=None)

    def models(self) -> list[dict]:
        import json
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
