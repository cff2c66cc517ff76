"""What vouches for one blob's bytes in one mount: the single decision every path of a
:class:`~.blobreader.BlobReader` consults (what may be served, what a cached block must
carry, what a fetched block is checked against, whether the blob is hashed whole).

Three modes (README, "Integrity"):

- ``INDEX``: a block index the mount trusts names the blob. Every block is matched against
  it before anyone sees it, whoever stored it and whatever ``--verify`` says.
- ``WHOLE``: no trusted index (the default): nothing is served before the blob matched its
  digest, whole.
- ``LAZY``: no trusted index and ``--verify lazy``: blocks are served as they arrive, and the
  blob is checked whole once complete.

A mode never outranks a trusted index: ``LAZY`` is chosen only where no index exists, so a
block another process stored unverified (a lazy mount of the same blob in a repository
without an index) is hashed against this mount's index before it is served here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Block = bytes | bytearray | memoryview


class Cached(Protocol):
    """What a trust decision reads of a cache entry (``cache.BlobEntry``)."""

    nblocks: int

    def has(self, index: int) -> bool: ...

    def trusted(self, index: int, expected: bytes | None) -> bool: ...


class Mode(enum.Enum):
    INDEX = "index"
    WHOLE = "whole"
    LAZY = "lazy"


@dataclass(frozen=True)
class Trust:
    mode: Mode
    expected: list[bytes] | None = None  # hash of each block, from the index (INDEX only)
    block_hash: Callable[[Block], bytes] | None = None  # the index's algorithm
    vouched: bool = False  # the manifest names the index: blocks matching it need no whole-blob hash

    @classmethod
    def decide(cls, expected: list[bytes] | None, block_hash: Callable[[Block], bytes] | None, vouched: bool,
               lazy: bool) -> Trust:
        """The mode of a blob: its index if it has a trusted one, else whole or lazy."""
        if expected is not None and block_hash is not None:
            return cls(Mode.INDEX, expected, block_hash, vouched)
        return cls(Mode.LAZY if lazy else Mode.WHOLE)

    def without_index(self) -> Trust:
        """The index turned out to vouch for a blob that does not match its digest: from now
        on the blob is treated as if it had none (checked whole)."""
        return Trust(Mode.WHOLE)

    @property
    def serves_unchecked(self) -> bool:
        """Bytes are served before anything checked them (``--verify lazy``, no index)."""
        return self.mode is Mode.LAZY

    @property
    def per_block(self) -> bool:
        """Blocks are fetched and served one by one (index or lazy), not after a whole pass."""
        return self.mode is not Mode.WHOLE

    def index_hash(self, data: Block) -> bytes | None:
        """The block's hash by the index's algorithm (None without an index)."""
        return self.block_hash(data) if self.block_hash is not None and self.expected is not None else None

    def matches(self, index: int, index_hash: bytes) -> bool:
        return self.expected is not None and self.expected[index] == index_hash

    def accepts(self, entry: Cached, index: int) -> bool:
        """Whether block ``index`` as cached (by this process or another, under whatever trust
        it had) may be served under this one. Its bytes are checked against their stored
        checksum again when read."""
        if self.mode is Mode.LAZY:
            return entry.has(index)
        return entry.trusted(index, self.expected[index] if self.expected is not None else None)

    def covers(self, entry: Cached) -> bool:
        """Every block of the blob is vouched for without a whole-blob hash: it matched an
        index the manifest names."""
        return (self.mode is Mode.INDEX and self.vouched
                and all(self.accepts(entry, i) for i in range(entry.nblocks)))
