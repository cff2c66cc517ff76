"""Every counter of a mount in one object: the fetcher, the readers and the FUSE layer count
here, and metrics and status read here (nobody reaches into another part's private fields)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1


class ReadTimer:
    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.histogram.observe(time.perf_counter() - self.start)


@dataclass
class Stats:
    # fetching
    bytes_fetched: int = 0
    requests: int = 0
    retries: int = 0
    errors: int = 0
    cache_write_errors: int = 0
    integrity_errors: int = 0  # fetched blocks or blobs that did not match the index or digest
    damaged_blocks: int = 0  # cached blocks that failed their checksum when read back
    blocks_read_back: int = 0  # cached blocks read back from disk and checked for readers (readback.py)
    bytes_read_back: int = 0
    read_back_waits: int = 0  # reads that waited for a block read back from disk (not in memory yet)
    inflight_blocks: int = 0
    workers: int = 0  # threads receiving, checking and storing blocks
    # serving
    reads: int = 0
    read_errors: int = 0
    bytes_served: int = 0
    handler_errors: int = 0
    read_latency: Histogram = field(default_factory=Histogram)
