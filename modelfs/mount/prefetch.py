"""Prefetch: every block of a model fetched ahead of its readers, in the order loaders read.

Measured on the old order (issue 23: 2 GiB in 4 safetensors shards, vLLM): smallest blobs
first put the shards on the wire 4,3,1,2 while the loader read 1,2,3,4, and prefetch stopped
whenever a read waited, leaving the link idle half the time. Now:

- **order** (:func:`prefetch_order`): small files (configs, tokenizers, indexes) first, then
  the shards each ``*.index.json``'s ``weight_map`` names, by name (:func:`shard_order`), then
  every other file by path; within a blob, block order.
- **readers first**: each run is taken from the blob a process read most recently (from
  where it read), before the planned order (:class:`~.context.ForegroundGate` remembers).
- **the link kept full**: prefetch never stops for reads; it takes a request slot only when
  no read's run waits for one (:class:`~.slots.RequestSlots`), so reads wait at most for one
  run already on the wire.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

import trio

from ..errors import CacheError
from .context import FetchContext
from .slots import RequestSlots

log = logging.getLogger(__name__)

SMALL_FILE = 16 << 20  # a file this small (a config, a tokenizer) goes before the weights


class Planned(Protocol):
    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...


R = TypeVar("R", bound=Planned)


def prefetch_order(files: Sequence[tuple[str, R]], shards: Sequence[str] = ()) -> list[R]:
    """The readers of ``files`` ((path, reader), one reader may serve several files of a tar
    layer) in the order loaders read them: small ones first (smallest first), then ``shards``
    (paths, as :func:`shard_order` lists them, however small), then the rest by path
    (:func:`natural_key`: shards no index names, ``m-2`` before ``m-10``, as vLLM reads them)."""
    first_path: dict[str, tuple[str, R]] = {}
    for path, reader in sorted(files, key=lambda item: item[0]):
        first_path.setdefault(reader.digest, (path, reader))
    position = {path: i for i, path in enumerate(shards)}

    def rank(item: tuple[str, R]) -> tuple[int, int, list[tuple[int, int | str]]]:
        path, reader = item
        if path in position:
            return (1, position[path], [])
        if reader.size <= SMALL_FILE:
            return (0, reader.size, natural_key(path))
        return (2, 0, natural_key(path))

    return [reader for _, reader in sorted(first_path.values(), key=rank)]


def shard_order(indexes: Iterable[tuple[str, object]]) -> list[str]:
    """The shard paths each index's ``weight_map`` names, in the order loaders read them: by
    name (``natural_key``: ``m-2`` before ``m-10``), index by index (``indexes``: (path of the
    ``*.index.json``, its parsed JSON)), relative to the mount's root.

    Not the order of first appearance in the ``weight_map``: ``save_pretrained`` writes it
    sorted by tensor name, so ``lm_head.weight`` (in the last shard) comes first, and
    prefetch put the last shard on the wire while vLLM waited for the first (transformers
    and vLLM both read the shards sorted by name). Measured (benchmarks.ready, 2 GiB in 4
    shards, 192 MB/s): the first tensor came 2.1-2.3 s after the mount command, behind 96 MB
    of shard 4."""
    order: dict[str, None] = {}
    for path, parsed in indexes:
        weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
        if not isinstance(weight_map, dict):
            continue
        base = posixpath.dirname(path)
        named = {posixpath.normpath(posixpath.join(base, shard)) for shard in weight_map.values() if isinstance(shard, str)}
        for shard in sorted(named, key=natural_key):
            order.setdefault(shard, None)
    return list(order)


def natural_key(path: str) -> list[tuple[int, int | str]]:
    """Sorts ``m-2`` before ``m-10`` (digits as numbers), as vLLM sorts weight files."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", path) if part]


def fit_cache(readers: list[R], cache_limit: int, size: Callable[[R], int] = lambda reader: reader.size) -> list[R]:
    """Under a cache size limit only as many as fit in 90% of it (what eviction keeps), in
    order (``size``: the bytes of a blob prefetch takes, a view's); prefetching a model
    bigger than the cache would evict its own blocks and those just read, refetching forever."""
    if not cache_limit:
        return readers
    plan, room = [], int(cache_limit * 0.9)
    for reader in readers:
        if size(reader) <= room:
            plan.append(reader)
            room -= size(reader)
    return plan


class Flights(Protocol):
    def in_flight(self, index: int) -> bool: ...


class Fetchable(Planned, Protocol):
    @property
    def flights(self) -> Flights: ...

    @property
    def nblocks(self) -> int: ...

    @property
    def whole_mode(self) -> bool: ...

    def servable(self, index: int) -> bool: ...

    def block_length(self, index: int) -> int: ...

    async def ensure(self, blocks: list[int], foreground: bool = True) -> None: ...


F = TypeVar("F", bound=Fetchable)


class PrefetchQueue(Generic[F]):
    """The runs left to prefetch: the next one from the blob read most recently (from the
    block read on), else from the first blob in plan order with blocks left."""

    def __init__(self, ctx: FetchContext, readers: Sequence[F],
                 wanted: Callable[[F], Sequence[int] | None] | None = None) -> None:
        self.ctx = ctx
        self.order = list(readers)
        self.by_digest = {reader.digest: reader for reader in readers}
        self.blocks = {reader.digest: wanted(reader) if wanted else None for reader in readers}
        self.left = {reader.digest: self._missing(reader, self.blocks[reader.digest]) for reader in readers}
        self.since = ctx.gate.reads  # reads before prefetch started (the metadata's own) are not followed

    @staticmethod
    def _missing(reader: Fetchable, blocks: Sequence[int] | None) -> list[bool]:
        """Per block: wanted and not servable yet (``blocks``: those wanted; None, all)."""
        if blocks is None:
            return [not reader.servable(i) for i in range(reader.nblocks)]
        left = [False] * reader.nblocks
        for i in blocks:
            left[i] = not reader.servable(i)
        return left

    def wanted_bytes(self, reader: Fetchable) -> int:
        blocks = self.blocks[reader.digest]
        return reader.size if blocks is None else sum(reader.block_length(i) for i in blocks)

    def missing_bytes(self, reader: Fetchable) -> int:
        return sum(reader.block_length(i) for i, left in enumerate(self.left[reader.digest]) if left)

    def next(self, run_blocks: int) -> tuple[F, list[int]] | None:
        for digest, block in self.ctx.gate.read_since(self.since):
            reader = self.by_digest.get(digest)
            if reader is not None:
                run = self._take(reader, block, run_blocks) or self._take(reader, 0, run_blocks)
                if run:
                    return reader, run
        while self.order:
            reader = self.order[0]
            run = self._take(reader, 0, run_blocks)
            if run:
                return reader, run
            self.order.pop(0)
        return None

    def _take(self, reader: F, start: int, run_blocks: int) -> list[int]:
        """Up to ``run_blocks`` contiguous blocks left from ``start`` on (a whole-mode blob: all
        of them at once, it is read in one pass), marked taken."""
        left = self.left[reader.digest]
        if reader.whole_mode:
            run = [i for i in range(len(left)) if left[i]]
        else:
            i = start
            while i < len(left) and not (left[i] and self._wanted(reader, i)):
                left[i] = False
                i += 1
            run = []
            while i < len(left) and left[i] and self._wanted(reader, i) and len(run) < run_blocks:
                run.append(i)
                i += 1
        for i in run:
            left[i] = False
        return run

    @staticmethod
    def _wanted(reader: Fetchable, index: int) -> bool:
        """Neither servable nor on its way already (a read's fetch got there first): a run of
        these is one range request, in the slot the prefetch worker holds for it."""
        return not reader.servable(index) and not reader.flights.in_flight(index)


async def prefetch(ctx: FetchContext, slots: RequestSlots, run_blocks: Callable[[], int], readers: Sequence[F],
                   progress: Callable[[int], None] | None = None, cached: Callable[[int], None] | None = None,
                   landed: Callable[[F, list[int]], Awaitable[None]] | None = None,
                   wanted: Callable[[F], Sequence[int] | None] | None = None) -> None:
    """Fetch every missing block of ``readers`` (in that order, readers' blobs first), each
    run in a request slot taken before its blocks are claimed; ``landed`` is awaited with each
    run once it is in (its slot already free for the next). ``wanted``: the blocks of each
    blob to fetch (a view's; every block without it). Stops with a
    :class:`CacheError` once the cache refuses blocks (a full disk): prefetching into
    memory that cannot be kept only takes bandwidth from the readers."""
    queue = PrefetchQueue(ctx, readers, wanted)
    log.debug("prefetch order: %s", " ".join(reader.digest[7:19] for reader in readers))
    if cached:
        for reader in readers:
            cached(queue.wanted_bytes(reader) - queue.missing_bytes(reader))
    write_errors = ctx.stats.cache_write_errors

    def refused() -> None:
        if ctx.stats.cache_write_errors > write_errors:
            raise CacheError("the cache refuses new blocks (is its disk full?)")

    async def worker() -> None:
        while True:
            async with slots.lease():  # the run scheduled below takes this slot over
                refused()
                taken = queue.next(max(1, run_blocks()))
                if taken is None:
                    return
                reader, blocks = taken
                log.debug("prefetching blocks %d-%d of %s", blocks[0], blocks[-1], reader.digest)
                await reader.ensure(blocks, foreground=False)
            refused()
            if progress:
                progress(sum(reader.block_length(i) for i in blocks))
            if landed:
                await landed(reader, blocks)

    async with trio.open_nursery() as nursery:
        for _ in range(ctx.policy.prefetch_workers):
            nursery.start_soon(worker)
