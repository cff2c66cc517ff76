"""The policy of one mount's (or one ``pull``'s) fetching, as the composition root passes it in:
nothing below :class:`~.fetcher.Fetcher` reads a setting or a context variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..registry import RetryPolicy


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, as a container or cgroup sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 120.0  # a read waiting longer than this fails with EIO; so does a silent fetch
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # the client's policy: one for every fetch
    workers: int = 0  # threads doing per-byte work (receive, check, store); 0: one per core available
    readahead_max: int = 96  # blocks read ahead of a sequential reader, at most (the sizer may ask for less)
    prefetch_workers: int = 8  # runs prefetch keeps asked for (request slots bound what is in flight)
    recent_blocks: int = 128  # blocks fetched for readers, held in memory until read (past the read-ahead)
    verify: str = "full"  # or "lazy": serve bytes of blobs without a trusted index before they are checked

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else max(2, available_cores())

    @property
    def lazy(self) -> bool:
        return self.verify == "lazy"
