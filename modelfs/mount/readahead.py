"""Decisions about what to fetch and how big each request is: pure, no I/O, unit-tested.

- :class:`ReadAhead` watches one stream of offsets and says which blocks to fetch ahead.
- :class:`Streams` keeps a :class:`ReadAhead` per sequential stream of one blob, so readers
  that interleave (16 threads each reading its own part of a file) each keep a growing window.
- :func:`plan_runs` cuts a list of missing blocks into contiguous runs, one range request each.
- :class:`RequestSizer` adapts the size of runs and how many are in flight to the link:
  measured here (doc/ARCHITECTURE.md, "Data plane"), the registry spends 1.2-1.4 CPU-s serving 64 ranges
  of a GiB against 0.55 s for one stream, so a fast link gets few, large ranges (one per
  worker); a link that holds each connection to 50 MB/s gets more, smaller ones in parallel,
  so that the mount still reads several times faster than one stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(eq=False)  # identity: Streams finds and moves its streams in a list, once per read
class ReadAhead:
    """A window ahead of a sequential reader that doubles as the reader keeps moving forward,
    refilled in big batches (when less than half of it is left ahead) so each request covers
    many blocks. Random access turns it off until the reader is sequential again."""

    block_size: int
    nblocks: int
    max_blocks: int
    window: int = 0
    sequential_end: int = 0  # byte just after the last sequential read
    ahead_until: int = -1  # last block already asked for
    first_window: int = 1  # the window once a stream is seen to be sequential

    def continues(self, offset: int) -> bool:
        """Whether a read at ``offset`` continues this stream (the kernel's reads of one
        stream arrive a little out of order: up to a few blocks behind its end)."""
        return self.sequential_end - 4 * self.block_size <= offset <= self.sequential_end + self.block_size

    def after_read(self, offset: int, size: int) -> range:
        """The blocks to fetch ahead of a read of ``size`` bytes at ``offset`` (maybe none)."""
        bs = self.block_size
        end = offset + size
        last = (end - 1) // bs
        sequential = offset == 0 or self.continues(offset)
        if not sequential:
            self.window, self.sequential_end, self.ahead_until = 0, end, last
            return range(0)
        if end // bs > self.sequential_end // bs or offset == 0:
            # doubles, and covers at least one more read like this one (8 MiB reads: 8 blocks)
            self.window = min(max(self.first_window, self.window * 2, -(-size // bs)), self.max_blocks)
        self.sequential_end = max(end, self.sequential_end)
        if self.ahead_until - last > self.window // 2:
            return range(0)
        start = max(last, self.ahead_until) + 1
        stop = min(last + self.window, self.nblocks - 1)
        if start > stop:
            return range(0)
        self.ahead_until = stop
        return range(start, stop + 1)


@dataclass
class Streams:
    """Read-ahead per stream, not per blob: up to ``max_streams`` :class:`ReadAhead` states,
    each found by the offset it expects next. A read that continues a stream grows that
    stream's window; a read that continues none starts a new stream (the least recently used
    one goes). One read-ahead state per blob made 16 interleaved readers (Run:ai's streamer:
    16 threads, 8 MiB reads) look random: read-ahead switched off and a 2 GiB model took
    1,423-1,661 range requests of about 1.3 MiB.

    The windows of all streams share one budget (``max_blocks``, what keeps every request
    slot busy), but each stream may grow to at least ``min_blocks`` (a full request), so
    many streams still ask in requests as large as one sequential reader's, not in slivers."""

    block_size: int
    nblocks: int
    max_blocks: int
    min_blocks: int = 32
    max_streams: int = 32
    # a strict budget (blocks held in memory until read): shared with every stream known, idle
    # ones too, and each stream's window kept to its share at once
    share_with_idle: bool = False
    streams: list[ReadAhead] = field(default_factory=list)  # most recently used last
    current: ReadAhead | None = None  # the stream of the last read

    def after_read(self, offset: int, size: int) -> range:
        """The blocks to fetch ahead of a read of ``size`` bytes at ``offset`` (maybe none)."""
        stream = self._stream_of(offset)
        share = max(min(self.min_blocks, self.max_blocks), self.max_blocks // max(1, self._active()))
        if self.share_with_idle:  # a strict budget: every stream's window shrinks to its share now
            for other in self.streams:
                other.max_blocks, other.window = share, min(other.window, share)
        stream.max_blocks = share
        # beside other streams (readers side by side), a stream starts at half a request once
        # its second read continues its first: many streams each ramping up from one block
        # cut the blob into slivers
        stream.first_window = 1 if len(self.streams) == 1 or self.share_with_idle else max(1, self.min_blocks // 2)
        self.current = stream
        return stream.after_read(offset, size)

    def expects(self, index: int) -> bool:
        """Whether a sequential stream reads block ``index`` next: it lies between where the
        stream is and the end of what its read-ahead asked for (or its window, whichever is
        further). A block that arrives for someone else (prefetch) but that a stream expects
        is worth keeping in memory for it; one nobody expects is not."""
        bs = self.block_size
        for stream in self.streams:
            if stream.window:
                position = stream.sequential_end // bs
                if position <= index <= max(stream.ahead_until, position + stream.window):
                    return True
        return False

    @property
    def window(self) -> int:
        """The window of the last read's stream (0: it did not look sequential)."""
        return self.current.window if self.current is not None else 0

    def _stream_of(self, offset: int) -> ReadAhead:
        for stream in reversed(self.streams):
            if stream.continues(offset):
                self.streams.remove(stream)
                self.streams.append(stream)
                return stream
        stream = ReadAhead(self.block_size, self.nblocks, self.max_blocks)
        self.streams.append(stream)
        if len(self.streams) > self.max_streams:
            self.streams.pop(0)
        return stream

    def _active(self) -> int:
        """Streams reading sequentially now (a window open), or every stream known."""
        return len(self.streams) if self.share_with_idle else sum(1 for stream in self.streams if stream.window)


def plan_runs(blocks: Iterable[int], max_run: int) -> list[tuple[int, int]]:
    """Contiguous runs ``(first, last)`` of at most ``max_run`` blocks, in the order given."""
    runs: list[tuple[int, int]] = []
    first = last = -2
    for index in blocks:
        if index == last + 1 and index - first < max_run:
            last = index
            continue
        if first >= 0:
            runs.append((first, last))
        first = last = index
    if first >= 0:
        runs.append((first, last))
    return runs


@dataclass
class RequestSizer:
    """How many blocks one range request asks for, and how many requests are in flight, from
    the throughput each connection has shown (a moving average over finished requests).

    A request should take about ``target_seconds`` on its connection: long enough that the
    per-request cost (a registry's, a CDN's) stays small, short enough that the read-ahead
    window and a retry after a failure stay small.

    In flight: one request per worker, unless connections come out slower than ``slow_rate``.
    A fast link or a busy CPU gives each of a few connections hundreds of MB/s, and more of
    them would only split the same bandwidth and cost the registry more requests; a link that
    holds each connection to a rate (a proxy, a WAN, a CDN edge) gives every connection that
    rate however many there are, so ``slow_parallel`` of them multiply it.
    """

    block_size: int
    workers: int
    window_cap: int = 96  # blocks read ahead at most: they are held in memory until read
    min_run: int = 4
    max_run: int = 32
    initial_run: int = 16
    slow_parallel: int = 8
    target_seconds: float = 0.5
    slow_rate: float = 100e6  # bytes/s on one connection
    rate: float | None = None  # per-connection bytes/s, smoothed

    def record(self, size: int, seconds: float) -> None:
        """A request of ``size`` bytes finished in ``seconds``."""
        if size < self.block_size or seconds <= 0:
            return
        sample = size / seconds
        self.rate = sample if self.rate is None else 0.7 * self.rate + 0.3 * sample

    @property
    def slow(self) -> bool:
        return self.rate is not None and self.rate < self.slow_rate

    @property
    def parallel(self) -> int:
        return max(self.workers, self.slow_parallel) if self.slow else max(1, self.workers)

    @property
    def run_blocks(self) -> int:
        """Blocks per request: what one connection moves in ``target_seconds``, within
        bounds, and small enough that every request slot fits in the read-ahead window."""
        wanted = self.initial_run if self.rate is None else int(self.rate * self.target_seconds / self.block_size)
        fits = max(self.min_run, self.window_cap // self.parallel)
        return max(self.min_run, min(self.max_run, wanted, fits))

    @property
    def window_blocks(self) -> int:
        """Read-ahead that keeps every request slot busy with a full run."""
        return min(self.window_cap, self.parallel * self.run_blocks)
