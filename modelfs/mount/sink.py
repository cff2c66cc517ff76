"""The declared interfaces between a blob's reader, where its blocks come from, and where they
rest; every call across them is one of these methods (the type checker holds both sides to
them).

- :class:`BlockSource`: gets blocks for a reader (range runs, a whole pass, a compressed
  layer's stream).
- :class:`BlockSink` and :class:`PassSink`: what a source may do to the reader of one blob:
  claim blocks and hand them over one by one (the single flight: every reader of a block
  waits on one fetch), or run a pass over the whole blob and say how it went. The reader's
  trust decides everything (what is checked against what, what may be kept, what is served);
  a source never touches the cache entry behind it.
- :class:`StoredBlob`: what the reader needs of a blob's cache entry (``cache.BlobEntry``,
  or its no-disk twin).

Methods marked "worker thread" run there (they block on disk or hashing); every other one
runs on the trio loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .trust import Block, Trust


class Slot(Protocol):
    @property
    def present(self) -> bool: ...


class StoredBlob(Protocol):
    """One blob's cached blocks, each checked against its stored checksum when read back."""

    digest: str
    size: int
    block_size: int
    nblocks: int
    claims_path: str

    def block_length(self, index: int) -> int: ...

    def has(self, index: int) -> bool: ...

    def entry_at(self, index: int) -> Slot:
        """The block's map entry as last read from disk (no look at the disk now)."""

    def trusted(self, index: int, expected: bytes | None) -> bool: ...

    def read_block(self, index: int) -> bytes: ...

    def held_block(self, index: int) -> bytes | None: ...

    def read_checked(self, index: int) -> tuple[bytes, int]: ...

    def write_block(self, index: int, data: Block, index_hash: bytes | None = None) -> int | None: ...

    def forget(self, index: int) -> None: ...

    def adopt(self, index: int, index_hash: bytes, check: int) -> None: ...

    def clear(self) -> None: ...

    def reload(self) -> None: ...

    def files_id(self) -> tuple[int, int]: ...

    def mark_whole(self, checks: dict[int, int]) -> bool: ...

    def cached_bytes(self) -> int: ...

    @property
    def complete(self) -> bool: ...

    @property
    def complete_here(self) -> bool: ...

    @property
    def verified(self) -> bool: ...


class BlobShape(Protocol):
    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def nblocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def block_length(self, index: int) -> int: ...


class BlockSink(BlobShape, Protocol):
    """Blocks handed over one by one, each waking the readers that wait on it."""

    @property
    def trust(self) -> Trust: ...

    @property
    def claims_path(self) -> str:
        """Where other processes' claims on this blob's blocks are held (claims.py)."""

    def claim(self, blocks: Iterable[int]) -> list[int]:
        """The blocks nobody fetches yet and no reader may see yet, now in flight."""

    def in_flight(self, index: int) -> bool: ...

    def settle_present(self, index: int) -> bool:
        """Whether block ``index`` needs no fetch (servable, or cached by another process and
        adopted now, hashed against the index); wakes its readers if so."""

    def receive(self, index: int, data: memoryview, for_reader: bool) -> None:
        """Worker thread: a fetched block, checked against the trust (a mismatch is counted
        on the loop and raised), stored, then handed to the loop and its readers."""

    def deliver(self, index: int, data: Block, for_reader: bool = True, fetched: bool = True) -> None:
        """A block this reader's trust lets readers see now is here (already stored, or
        refused by the cache, said through :meth:`PassSink.store`)."""

    def fail(self, blocks: Iterable[int], exc: BaseException) -> None:
        """Wake the readers of ``blocks`` still in flight with ``exc``."""

    def fail_pending(self, exc: BaseException) -> None: ...


class PassSink(BlobShape, Protocol):
    """A pass over the whole blob in order: nothing of it is served before the blob checked
    out (unless the trust serves it lazily); readers wait while it makes progress."""

    @property
    def pass_running(self) -> bool: ...

    @property
    def verified(self) -> bool:
        """Every block stored and checked whole with the blob."""

    @property
    def serves_unchecked(self) -> bool: ...

    def begin_pass(self) -> int: ...

    def tick(self, fetched: int = 0) -> None:
        """The pass made progress (``fetched`` bytes came from the network)."""

    def end_pass(self, failure: BaseException | None) -> None: ...

    def stored(self, index: int) -> bool: ...

    def store(self, index: int, data: Block, index_hash: bytes | None = None) -> int | None:
        """Worker thread: keep a block this pass hashes (or that passed the trust); the
        stored checksum, for :meth:`mark_whole`."""

    def read_stored(self, index: int) -> tuple[bytes, int]:
        """Worker thread: a cached block and its checksum, checked as it is read."""

    def files_id(self) -> tuple[int, int]:
        """Worker thread: which cache files hold the blob (replaced ones hold no blocks of ours)."""

    def mark_whole(self, checks: dict[int, int]) -> bool:
        """Worker thread: the blob matched its digest with these blocks."""

    def damaged(self, index: int, exc: Exception) -> None: ...

    def digest_mismatch(self) -> None:
        """The blob does not match its digest: every byte of it dropped, wherever held."""


class ReaderSink(BlockSink, PassSink, Protocol):
    """Both ways a reader is fed, and what a compressed layer's stream also needs of the
    files it fills (and of the layer's own cached copy it may read instead)."""

    def held_checked(self) -> bool:
        """Every block is cached with the trust this reader requires."""

    def reload_stored(self) -> int:
        """Worker thread: the map re-read from disk; how many blocks are stored."""

    def peer_progress(self) -> None:
        """Another process stored blocks: lazy readers get those that are there, readers of
        the whole blob a later deadline."""

    def drop(self) -> None: ...


class BlockSource(Protocol):
    """Gets blocks for readers. ``checks_whole``: the source itself checks what it delivers
    against the blob's digest (a compressed layer's stream), so the reader never hashes the
    blob again once complete."""

    checks_whole: bool

    def schedule(self, sink: ReaderSink, blocks: list[int], for_reader: bool = True) -> None:
        """Start getting ``blocks`` (or, in whole mode, the pass that makes them servable).
        ``for_reader``: a reader wants them soon (held in memory until read), not prefetch."""
