"""Which blocks of a blob a view needs: the one decision prefetch, ``pull`` and the status use.

A view (``--include`` / ``--exclude``) of a plain tar layer keeps some of its members, and
each is a range of the layer's blob: a publisher packing every GGUF quantization in one tar
layer should not make the user who picks q4 download q8 too. So a blob is wanted only in
the blocks its view's files overlap, plus those listing it read (a tar's headers: the next
mount, maybe offline, lists it again from the cache).

Only where a block index the manifest names vouches for each block (README, "Integrity"):
without one, no byte of the blob is served before the whole blob matched its digest, so
every block is needed for that check (``--verify lazy`` too: its bytes are checked only
once the blob is complete). An index only attached at the registry counts on the condition
that each blob is still checked whole once complete, so its blobs are wanted whole too
(reads are still served block by block as they come). A view that needs every block of a
blob, and no view at all, want it whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from ..retry import SETTLE_ROUNDS
from .blobreader import BlobReader
from .sink import BlockSink
from .tree import Tree
from .trust import Mode, Trust

log = logging.getLogger(__name__)


def by_block(trust: Trust) -> bool:
    """Whether a view may take a blob's blocks one by one: an index the manifest names
    vouches for each (README, "Integrity")."""
    return trust.mode is Mode.INDEX and trust.vouched


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
        self._bytes: dict[str, int] = {}  # by digest: bytes of the blocks a view needs
        self._local: dict[str, tuple[int, int]] = {}  # by digest: (bytes on disk of the blob, of them the view's)

    def of(self, reader: BlobReader) -> list[int] | None:
        """The blocks of ``reader``'s blob the view needs, sorted; None: every block (no
        view, a view that needs them all, or no index the manifest names vouching for them
        one by one)."""
        blocks = self._view_blocks(reader.digest, reader.nblocks)
        if blocks is None:
            return None
        if not by_block(reader.blob.trust):  # asked again each time: a blob failing its index loses it
            self._say_whole(reader, blocks)
            return None
        return blocks

    def confine(self, blob: BlockSink, blocks: list[int]) -> list[int]:
        """Of ``blocks`` a reader asked for by ranges (a read's own and its read-ahead), those
        the view needs: a read's own always are (its file is in the view; listing's reads
        were noted), and read-ahead past the end of a file stops there instead of fetching
        the next members of a tar outside the view (reading q4 fetched q8 too)."""
        if not by_block(blob.trust) or self._view_blocks(blob.digest, blob.nblocks) is None:
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

    def _say_whole(self, blob: BlobReader, blocks: list[int]) -> None:
        """Once per blob, in one line: why a view of part of it takes all of it."""
        if blob.digest in self._said:
            return
        self._said.add(blob.digest)
        part = sum(blob.block_length(i) for i in blocks)
        log.info("blob %s: the view needs %d of its %d bytes, but no block index the manifest names vouches for "
                 "them one by one, so all of it is fetched and checked whole", blob.digest, part, blob.size)

    def bytes(self, blob: BlobReader) -> int:
        """Bytes of ``blob`` the view needs (of whole blocks)."""
        blocks = self.of(blob)
        if blocks is None:
            return blob.size
        if blob.digest not in self._bytes:
            self._bytes[blob.digest] = sum(blob.block_length(i) for i in blocks)
        return self._bytes[blob.digest]

    def local_bytes(self, blob: BlobReader) -> int:
        """Of those, the bytes on disk. Asked every second for the status, so worked out
        again only when the blob's count of blocks on disk changed, from the map in memory
        (``has`` looks each absent block up on disk: 40,000 of them took 0.11 s here)."""
        blocks = self.of(blob)
        if blocks is None:
            return blob.cached_bytes()
        entry = blob.blob.entry
        count = entry.cached_bytes()
        known = self._local.get(blob.digest)
        if known is None or known[0] != count:
            known = self._local[blob.digest] = (count, sum(entry.block_length(i) for i in blocks
                                                           if entry.entry_at(i).present))
        return known[1]


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
            return by_block(trust)  # blocks matched one by one against an index the manifest names
        await reader.ensure(missing, foreground=False)
    return False
