"""The source of a registry blob's blocks, by range requests: run by run where the reader's
trust serves blocks one by one (index mode, lazy; :mod:`.rangeruns`), one pass over the whole
blob where it serves nothing before the blob checked whole (:mod:`.wholepass`)."""

from __future__ import annotations

from collections.abc import Callable

from .rangeruns import RangeRuns
from .sink import ReaderSink
from .wholepass import WholePass


class RangeSource:
    """A :class:`~.sink.BlockSource` for every blob read by ranges."""

    checks_whole = False

    def __init__(self, runs: RangeRuns, whole: WholePass) -> None:
        self.runs, self.whole = runs, whole
        # of the blocks asked for, those a view of the model needs (:class:`~.viewblocks.ViewBlocks`)
        self.confine: Callable[[ReaderSink, list[int]], list[int]] | None = None

    def schedule(self, sink: ReaderSink, blocks: list[int], for_reader: bool = True) -> None:
        if sink.trust.per_block:
            self.runs.schedule(sink, self.confine(sink, blocks) if self.confine else blocks, for_reader)
        else:
            self.whole.start(sink)
