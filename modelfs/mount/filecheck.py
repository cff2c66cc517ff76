"""Signed files hashed before their bytes are served: the one gate of the data path for the
checks an OMS statement leaves to reading (:mod:`modelfs.signing.filechecks`: a file in a tar
layer, a blake2b or blake3 digest, a file signed as shards).

When a gated file is first read (or prefetched, or pulled), each signed range that read
touches is read once through the file's own reader -- which still checks every block against
the manifest's trust chain -- and hashed with the signed algorithm on a worker thread. Only a
range that matched is served; readers of a range under check wait on that one check (single
flight). A mismatch fails every read and open of the file with EIO and logs one line naming
the file and the signature, for the mount's life, and the kernel's pages of the file leave
by the one drop path (``on_refused``); under ``signatures = warn`` it is logged and the bytes
are served. An empty file is checked when opened: the kernel answers its reads itself. A
passed range is remembered for the mount's life: the bytes the reader serves later are the
same ones (each block checked against the layer's digest or its index: under enforce such a
mount is never lazy, :func:`modelfs.signing.lazy_allowed`). The check reads the file the way
an unindexed blob is read today: whole, once.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import SignatureError
from ..signing.filechecks import FileChecks, Shard
from .fetcher import BlobReader
from .tree import Node, Tree

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # one block per read: the reader hands back its block as a view, nothing copied
PREFETCH_FILES = 4  # gated files checked at once by prefetch or pull


@dataclass(frozen=True)
class _Range:
    path: str
    index: int
    shard: Shard


class FileGate:
    """The pending checks of one mount's files, run once each, on first use."""

    def __init__(self, checks: FileChecks, paths: dict[int, str]) -> None:
        self.checks = checks
        self._paths = paths  # inode -> path, the gated files only
        self._passed: set[tuple[str, int]] = set()
        self._failed: dict[str, str] = {}  # path -> the one line it is refused with
        self._flights: dict[tuple[str, int], trio.Event] = {}
        self._spans: dict[str, _Spans] = {}  # path -> where its shards lie, made at its first read
        # told when a file is refused under enforce: the kernel may hold pages of its ranges
        # that passed (the FUSE layer drops them: binding.FileReaders wires this)
        self.on_refused: Callable[[Node], None] | None = None

    @classmethod
    def for_tree(cls, checks: FileChecks | None, tree: Tree) -> FileGate | None:
        """The gate of ``tree`` under ``checks`` (None: nothing to check). Every file of the
        listed tree is judged against the statements first (SignatureError under enforce):
        the whole artifact's, whatever view the tree was cut to, since a statement signs the
        whole model (a file outside the view is not "missing"), and only the view is gated."""
        if checks is None:
            return None
        files = dict(tree.file_paths())
        checks.judge_listing(tree.whole_listing())
        return cls(checks, {inode: path for path, inode in files.items() if checks.shards(path)})

    async def prefetch(self, tree: Tree, reader_of: Callable[[Node], BlobReader]) -> None:
        """Check every gated file now (``prefetch = all``), so the loader finds them ready;
        the mount lives on whatever happens (a failed read is checked again when read)."""
        try:
            failures = await self.check_all(tree, reader_of)
            log.info("signed files checked: %d, %d differ from the signed statement", len(self._paths), len(failures))
        except Exception as exc:  # runs in the mount's nursery: an escape would end the mount
            log.warning("checking the signed files ahead stopped: %s (each is checked when read)", exc)

    @property
    def failures(self) -> list[str]:
        """The files refused so far (or served anyway under warn), one line each."""
        return list(self._failed.values())

    def gated(self, node: Node) -> bool:
        return node.inode in self._paths

    async def admit(self, node: Node, reader: BlobReader, start: int, end: int) -> None:
        """Return once every signed range of ``node`` that [start, end) touches has matched;
        SignatureError if one does not (under enforce). Errors reading it propagate (EIO for
        this read; the next read checks again)."""
        path = self._paths.get(node.inode)
        if path is None:
            return
        if path in self._failed and self.checks.enforcing:
            raise SignatureError(self._failed[path])  # nothing more of that file, its passed ranges included
        shards = self.checks.shards(path)
        spans = self._spans.get(path)
        if spans is None:
            spans = self._spans[path] = _Spans(shards, node.size)
        for index in spans.touched(start, end):
            if (path, index) not in self._passed:
                await self._one(_Range(path, index, shards[index]), node, reader)

    async def admit_open(self, node: Node, reader: BlobReader) -> None:
        """An open of ``node``: refused once the file is (under enforce); an empty file is
        checked now, since no read of it ever reaches the daemon (the kernel answers a read
        at its size itself), so its signed hash would never be compared."""
        path = self._paths.get(node.inode)
        if path is None:
            return
        if path in self._failed and self.checks.enforcing:
            raise SignatureError(self._failed[path])
        if node.size == 0:
            await self.admit(node, reader, 0, 0)

    async def check_all(self, tree: Tree, reader_of: Callable[[Node], BlobReader]) -> list[str]:
        """Every gated file checked whole (prefetch, pull), a few at once; the failures."""
        limit = trio.CapacityLimiter(PREFETCH_FILES)

        async def one(node: Node) -> None:
            async with limit:
                try:
                    await self.admit(node, reader_of(node), 0, node.size)
                except SignatureError:
                    pass  # said once, in _failed

        async with trio.open_nursery() as nursery:
            for inode in self._paths:
                nursery.start_soon(one, tree.nodes[inode])
        return self.failures

    async def _one(self, where: _Range, node: Node, reader: BlobReader) -> None:
        key = (where.path, where.index)
        while key not in self._passed:
            if where.path in self._failed and self.checks.enforcing:
                raise SignatureError(self._failed[where.path])
            flight = self._flights.get(key)
            if flight is not None:
                await flight.wait()  # then look again: passed, failed, or the check's read failed
                continue
            flight = self._flights[key] = trio.Event()
            try:
                await self._hash(where, node, reader)
            finally:
                del self._flights[key]
                flight.set()

    async def _hash(self, where: _Range, node: Node, reader: BlobReader) -> None:
        start, end = where.shard.span(node.size)
        hasher = where.shard.hasher()
        for offset in range(start, end, CHUNK):
            data = await reader.read_view(node.offset + offset, min(CHUNK, end - offset))
            await trio.to_thread.run_sync(hasher.update, data)
        key = (where.path, where.index)
        if hasher.hexdigest() == where.shard.digest:
            self._passed.add(key)
            return
        line = self.checks.mismatch(where.path, where.shard, node.size)
        self._failed.setdefault(where.path, line)
        if self.checks.enforcing:
            log.error("%s: its bytes are not served", line)
            if self.on_refused is not None:
                self.on_refused(node)  # ranges that passed may be in the kernel's pages
            raise SignatureError(line)
        log.warning("signatures = warn: serving anyway: %s", line)
        self._passed.add(key)


class _Spans:
    """Which shards of one file a read touches, found by bisection: a statement may sign a
    file as up to 200,000 shards, and walking them all cost 48 ms a read (measured here)."""

    def __init__(self, shards: tuple[Shard, ...], size: int) -> None:
        spans = [shard.span(size) for shard in shards]
        # a zero-length shard still "covers" its position: an empty file's one shard is checked
        self._starts = [first for first, _ in spans]
        self._ends = [max(last, first + 1) for first, last in spans]
        # shards that tile their file (enforce refuses any other) have ends in order; under
        # warn a statement whose shards overlap is walked whole
        self._ordered = all(a <= b for a, b in zip(self._ends, self._ends[1:], strict=False))

    def touched(self, start: int, end: int) -> range | list[int]:
        """Indexes of the shards [start, end) touches (a read of nothing touches its position)."""
        end = max(end, start + 1)
        if not self._ordered:
            pairs = enumerate(zip(self._starts, self._ends, strict=True))
            return [i for i, (first, last) in pairs if first < end and start < last]
        return range(bisect.bisect_right(self._ends, start), bisect.bisect_left(self._starts, end))


def gate_for(verdict: Any, tree: Tree) -> FileGate | None:
    """The gate of a mount (or a pull) of ``tree`` under its model's signature verdict."""
    return FileGate.for_tree(verdict.file_checks if verdict is not None else None, tree)


