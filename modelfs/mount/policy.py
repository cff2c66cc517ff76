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


# Read-back threads at most, for the whole mount: a read-back is a pread and a checksum (both
# release the GIL), and a disk (an SSD, a virtual disk) answers more preads at once faster:
# 1 MiB preads of a cold file here went 1.7 GiB/s on 1 thread, 3.5 on 4, 6.4 on 8.
MAX_READBACK_THREADS = 8


def readback_threads(cores: int) -> int:
    """Threads to read cached blocks back on, beside the serving loop: none with 2 cores or
    fewer (the loop reads them back itself), else one per core past two, at most 8.

    A hand-off to a thread buys parallelism only with a core to spare: the serving loop and
    the loader's own copy out of the page cache already take two. Measured on 2 cores
    (a fully cached 2 GiB checkpoint, page cache dropped, the loop reading back vs 8
    threads): one sequential reader 0.26-0.31 vs 0.43-0.50 s per GiB (daemon CPU 0.22-0.24
    vs 0.38-0.41 s per GiB: each hand-off costs a thread wake-up, a wake-up of the loop and
    an epoll round); vLLM's pattern 1.9 vs 2.3 s, fastsafetensors' 0.82 vs 1.15 s."""
    return 0 if cores <= 2 else min(MAX_READBACK_THREADS, cores - 2)


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
    readback_threads: int | None = None  # threads reading cached blocks back; None: by cores (:func:`readback_threads`)

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else max(2, available_cores())

    @property
    def readback_thread_count(self) -> int:
        return self.readback_threads if self.readback_threads is not None else readback_threads(available_cores())

    @property
    def read_deadline(self) -> float:
        return self.timeout

    @property
    def stall_window(self) -> float:
        return self.stall_timeout if self.stall_timeout is not None else self.timeout

    @property
    def lazy(self) -> bool:
        return self.verify == "lazy"
