"""Just-fetched, checked blocks in memory, one budget for the whole process."""

from __future__ import annotations

from collections import OrderedDict

from .buffers import BlockBuffers
from .trust import Block


class RecentBlocks:
    """Blocks fetched for readers, held until read: the reader that caused a fetch usually
    wants the block next, and a cache that cannot store it (full disk) still gets it served."""

    def __init__(self, capacity: int, buffers: BlockBuffers | None = None) -> None:
        self.capacity = capacity
        self.buffers = buffers  # where a dropped block's buffer goes back to, for reuse
        self._blocks: OrderedDict[tuple[str, int], Block] = OrderedDict()
        self._pinned: dict[tuple[str, int], Block] = {}  # metadata blocks (:mod:`.metadata`): never evicted

    def get(self, digest: str, index: int) -> Block | None:
        pinned = self._pinned.get((digest, index))
        return pinned if pinned is not None else self._blocks.get((digest, index))

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._blocks or key in self._pinned

    def pinned(self, digest: str, index: int) -> bool:
        return (digest, index) in self._pinned

    def pin(self, digest: str, index: int, data: Block) -> None:
        """Hold a block outside the budget, until it is dropped (a loader's header reads are
        then memory hits, however much else was read since). Its buffer is this holder's
        alone: taken out of the budget if it was there, so eviction never recycles it."""
        key = (digest, index)
        held = self._blocks.pop(key, None)
        if held is not None and held is not data:
            self._recycle(held)
        self._pinned[key] = data

    def put(self, digest: str, index: int, data: Block) -> None:
        if (digest, index) in self._pinned:
            self.pin(digest, index, data)  # a block fetched again replaces its pinned copy
            return
        replaced = self._blocks.get((digest, index))
        self._blocks[(digest, index)] = data
        self._blocks.move_to_end((digest, index))
        if replaced is not None and replaced is not data:
            self._recycle(replaced)
        while len(self._blocks) > self.capacity:
            self._recycle(self._blocks.popitem(last=False)[1])

    def _recycle(self, data: Block) -> None:
        if self.buffers is not None:
            self.buffers.give_back(data)

    def indexes(self, digest: str) -> list[int]:
        return [index for (held, index) in [*self._blocks, *self._pinned] if held == digest]

    def drop(self, digest: str, blocks: list[int] | None = None) -> None:
        """Let go of ``blocks`` of a blob (all of them: None). Called by the reader's one drop
        path (:meth:`~.blob.HeldBlob.drop`), by which bytes leave."""
        keys = [k for k in [*self._blocks, *self._pinned] if k[0] == digest] if blocks is None else \
            [(digest, i) for i in blocks]
        for key in keys:
            for place in (self._blocks, self._pinned):
                held = place.pop(key, None)
                if held is not None:
                    self._recycle(held)
