"""The store of a blob whose cache files cannot be set up: nothing is stored.

A full or read-only cache disk, or a path taken by something else, must not stop a mount.
Such a blob gets this store: nothing is stored, and blocks checked on arrival are served
from memory (the reader's recent blocks). A blob that can only be checked whole cannot be
served this way; its reads fail with the reason the store was made with. The cache says so
once in the log ("serving <digest> from memory, without caching it").
"""

from __future__ import annotations

import os

from ..errors import CacheError
from .mapformat import BlockMap, Buffer, Entry, Header
from .store import BlobPaths, Files


class NoDisk:
    """:class:`~.store.BlobStore` that keeps nothing: every block is absent, always."""

    def __init__(self, digest: str, size: int, block_size: int, reason: str) -> None:
        self.digest, self.reason = digest, reason
        self.paths = BlobPaths.under(os.devnull, digest)  # names no file anyone can create
        self.map = BlockMap(Header.of(size, block_size))

    @property
    def is_open(self) -> bool:
        return False

    @property
    def files(self) -> Files:
        return (0, 0)

    def files_id(self) -> Files:
        return (0, 0)

    def refresh(self) -> None:
        return None

    def replaced(self) -> bool:
        return False

    def read_entry(self, index: int) -> Entry:
        return self.map.get(index)

    def reload(self) -> None:
        return None

    def read(self, index: int) -> tuple[bytes, Entry, Files]:
        raise CacheError(f"block {index} of {self.digest} is not cached")

    def write(self, index: int, data: Buffer, index_hash: bytes | None) -> int | None:
        raise CacheError(f"the cache cannot store {self.digest}: {self.reason}")

    def forget(self, index: int) -> None:
        return None

    def upgrade(self, checks: dict[int, int], flag: int, index_hash: bytes | None = None) -> int:
        return 0

    def mark_whole(self, checks: dict[int, int]) -> bool:
        return False

    def clear(self) -> None:
        return None

    def release(self) -> bool:
        return True

    def close(self) -> None:
        return None
