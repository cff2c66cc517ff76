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
from collections.abc import Callable, Iterable
from typing import Protocol

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
        self._said: set[str] = set()

    def of(self, blob: Blob) -> list[int] | None:
        """The blocks of ``blob`` the view needs, sorted; None: every block (no view, a view
        that needs them all, or no trusted index vouching for blocks one by one)."""
        if self._spans is None:
            return None
        blocks = self._view_blocks(blob)
        if blocks is None:
            return None
        if blob.expected is None:  # asked again each time: a blob failing its index loses it
            self._say_whole(blob, blocks)
            return None
        return blocks

    def _view_blocks(self, blob: Blob) -> list[int] | None:
        if blob.digest not in self._blocks:
            assert self._spans is not None
            spans = self._spans.get(blob.digest)
            blocks = None if spans is None else blocks_of(spans, self.block_size, blob.nblocks)
            self._blocks[blob.digest] = None if blocks is None or len(blocks) == blob.nblocks else blocks
        return self._blocks[blob.digest]

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
