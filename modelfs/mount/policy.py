"""The policy of one mount's (or one ``pull``'s) fetching, as the composition root passes it in:
nothing below :class:`~.fetcher.Fetcher` reads a setting or a context variable.

Two times bound a read, each a setting of its own (``settings.py``):

- the **read deadline** (``timeout``): a read that waited this long fails with EIO (for a
  blob served only once checked whole: this long without progress). A location asked of
  the registry must come within it, and a peer process holding a block is waited on for a
  share of it (claims.py).
- the **stall window** (``stall_timeout``, by default the read deadline): a transfer that
  delivers no block for this long is aborted and retried, so is a compressed layer's stream
  that delivers less than 1 MiB, and it is the data plane's socket timeout. Shorter than the
  read deadline, a stalled server costs a retry instead of a failed read.

The control plane (manifests, tokens, locations) has its own: ``CONTROL_TIMEOUT`` per socket
operation, and the :class:`~modelfs.retry.RetryPolicy` deadline per request.
"""

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
    timeout: float = 120.0  # the read deadline (see the module docstring)
    stall_timeout: float | None = None  # the stall window; None: the read deadline, as before it had a name
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # the client's policy: one for every fetch
    workers: int = 0  # threads doing per-byte work (receive, check, store); 0: one per core available
    readahead_max: int = 96  # blocks read ahead of a sequential reader, at most (the sizer may ask for less)
    prefetch_workers: int = 8  # prefetch runs asked for at once (each waits for a request slot before it claims blocks)
    recent_blocks: int = 128  # blocks fetched for readers, held in memory until read (past the read-ahead)
    verify: str = "full"  # or "lazy": serve bytes of blobs without a trusted index before they are checked

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else max(2, available_cores())

    @property
    def read_deadline(self) -> float:
        return self.timeout

    @property
    def stall_window(self) -> float:
        return self.stall_timeout if self.stall_timeout is not None else self.timeout

    @property
    def lazy(self) -> bool:
        return self.verify == "lazy"
