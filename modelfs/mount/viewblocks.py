"""Which blocks of a blob a view needs: the one decision prefetch, ``pull`` and the status use.

A view (``--include`` / ``--exclude``) of a plain tar layer keeps some of its members, and
each is a range of the layer's blob: a publisher packing every GGUF quantization in one tar
layer should not make the user who picks q4 download q8 too. So a blob is wanted only in
the blocks its view's files overlap, plus those listing it read (a tar's headers: the next
mount, maybe offline, lists it again from the cache).

Only where a trusted block index vouches for each block (README, "Integrity"): without
one, no byte of the blob is served before the whole blob matched its digest, so every
block is needed for that check (``--verify lazy`` too: its bytes are checked only once the
blob is complete). A view that needs every block of a blob, and no view at all, want it
whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from ..retry import SETTLE_ROUNDS
from .blobreader import BlobReader
from .sink import BlockSink
from .tree import Tree

log = logging.getLogger(__name__)


class Blob(Protocol):
    """What the decision reads of a reader (:class:`~.blobreader.BlobReader`)."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def nblocks(self) -> int: ...

    @property
    def expected(self) -> list[bytes] | None: ...

    def block_length(self, index: int) -> int: ...


def blocks_of(spans: Iterable[tuple[int, int]], block_size: int, nblocks: int) -> list[int]:
    """The blocks (sorted) that byte ranges ((offset, size), an empty one none) overlap."""
    wanted: set[int] = set()
    for offset, size in spans:
        if size > 0:
            wanted.update(range(max(0, offset // block_size), min(nblocks, (offset + size - 1) // block_size + 1)))
    return sorted(wanted)


class ViewBlocks:
    """The blocks each blob of a tree (cut to a view) needs, decided per blob by its trust."""

    def __init__(self, tree: Tree, block_size: int) -> None:
        self.block_size = block_size
        self._spans = tree.view_spans()
        self._blocks: dict[str, list[int] | None] = {}  # by digest, what the view's ranges overlap
        self._sets: dict[str, set[int]] = {}  # the same, to look a block up
        self._said: set[str] = set()

    def of(self, blob: Blob) -> list[int] | None:
        """The blocks of ``blob`` the view needs, sorted; None: every block (no view, a view
        that needs them all, or no trusted index vouching for blocks one by one)."""
        blocks = self._view_blocks(blob.digest, blob.nblocks)
        if blocks is None:
            return None
        if blob.expected is None:  # asked again each time: a blob failing its index loses it
            self._say_whole(blob, blocks)
            return None
        return blocks

    def confine(self, blob: BlockSink, blocks: list[int]) -> list[int]:
        """Of ``blocks`` a reader asked for by ranges (a read's own and its read-ahead), those
        the view needs: a read's own always are (its file is in the view; listing's reads
        were noted), and read-ahead past the end of a file stops there instead of fetching
        the next members of a tar outside the view (reading q4 fetched q8 too)."""
        if blob.trust.expected is None or self._view_blocks(blob.digest, blob.nblocks) is None:
            return blocks
        wanted = self._sets[blob.digest]
        return [i for i in blocks if i in wanted]

    def _view_blocks(self, digest: str, nblocks: int) -> list[int] | None:
        """What the view's ranges of the blob overlap (None: every block), worked out once."""
        if self._spans is None:
            return None
        if digest not in self._blocks:
            spans = self._spans.get(digest)
            blocks = None if spans is None else blocks_of(spans, self.block_size, nblocks)
            self._blocks[digest] = None if blocks is None or len(blocks) == nblocks else blocks
            self._sets[digest] = set(blocks or ())
        return self._blocks[digest]

    def _say_whole(self, blob: Blob, blocks: list[int]) -> None:
        """Once per blob, in one line: why a view of part of it takes all of it."""
        if blob.digest in self._said:
            return
        self._said.add(blob.digest)
        part = sum(blob.block_length(i) for i in blocks)
        log.info("blob %s: the view needs %d of its %d bytes, but no trusted block index vouches for them one by "
                 "one, so all of it is fetched and checked whole before any is served", blob.digest, part, blob.size)

    def bytes(self, blob: Blob) -> int:
        """Bytes of ``blob`` the view needs (of whole blocks)."""
        blocks = self.of(blob)
        return blob.size if blocks is None else sum(blob.block_length(i) for i in blocks)

    def local_bytes(self, blob: Blob, cached: Callable[[], int], has: Callable[[int], bool]) -> int:
        """Of those, the bytes on disk (``cached``: the blob's, ``has``: whether a block is there)."""
        blocks = self.of(blob)
        return cached() if blocks is None else sum(blob.block_length(i) for i in blocks if has(i))


async def settle_blocks(reader: BlobReader, blocks: Sequence[int], read_back: Iterable[int] = ()) -> bool:
    """``pull``'s :meth:`~.blobreader.BlobReader.settle` for the blocks of a blob a view
    needs: each read back from disk against its checksum (damaged ones dropped), what is
    missing fetched, until every one rests on disk matched against the trusted index
    (``read_back``: blocks already read back as their runs landed). The blob is not whole,
    so nothing checks it whole: a later mount serves these blocks only under an index that
    vouches for them (the cache records each block's hash), and fetches the rest."""
    entry, skip = reader.blob.entry, set(read_back)
    for _ in range(SETTLE_ROUNDS):
        await reader.read_back(i for i in blocks if i not in skip)
        skip = set()
        trust = reader.blob.trust
        missing = [i for i in blocks if not trust.accepts(entry, i)]
        if not missing:
            return trust.expected is not None  # blocks matched one by one, never unchecked (a lazy blob)
        await reader.ensure(missing, foreground=False)
    return False
