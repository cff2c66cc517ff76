"""What every part of one mount's data path shares, built once by the
:class:`~.fetcher.Fetcher` and handed down: the parts below never call back up into what
built them (they get this, and nothing else of the fetcher).

- the :class:`~.policy.FetchPolicy` and one :class:`~.stats.Stats`;
- the block buffers and the just-fetched blocks in memory (:class:`~.recent.RecentBlocks`);
- ``spawn``: the nursery fetch tasks run in (cancelled at unmount);
- the :class:`Retrier`: the one loop that retries a fetch, by the policy's backoff;
- the :class:`ForegroundGate`: what readers read (prefetch follows the most recent);
- the hooks: ``wrong_bytes`` (fetched bytes failed their check: count, and stop reading
  through mirrors a while) and ``pages_stale`` (served bytes were dropped: the FUSE layer
  drops the kernel's pages of those files);
- the :class:`~.readahead.RequestSizer` the transfers tune and readers size read-ahead by.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from ..errors import CacheError, ModelfsError, permanent
from .buffers import BlockBuffers
from .policy import FetchPolicy
from .readahead import RequestSizer
from .recent import RecentBlocks
from .stats import Stats

log = logging.getLogger(__name__)

Spawn = Callable[..., None]  # spawn(async_function, *args): run it in the mount's nursery


class Failing(Protocol):
    """What a fetch that gives up tells: the readers of those blocks (:class:`~.sink.BlockSink`)."""

    @property
    def digest(self) -> str: ...

    def fail(self, blocks: Iterable[int], exc: BaseException) -> None: ...


class ForegroundGate:
    """What the processes reading the mount do, for prefetch to follow: which blobs they
    read last, and where (prefetch takes its next run from the
    blob read most recently: a file a process reads goes ahead of files nobody reads yet).
    Prefetch no longer waits for reads to stop: request slots go to reads first
    (:class:`~.slots.RequestSlots`)."""

    def __init__(self) -> None:
        self.reads = 0  # reads so far: a sequence number for :meth:`read_since`
        self._last: dict[str, tuple[int, int]] = {}  # blob -> (sequence of its last read, its first block)

    def reading(self, digest: str, block: int) -> None:
        """A process reads ``digest`` at block ``block`` (every read: one dict update)."""
        self.reads += 1
        self._last[digest] = (self.reads, block)

    def read_since(self, since: int) -> list[tuple[str, int]]:
        """The blobs read after read number ``since``, most recent first, with the block read."""
        found = [(seq, digest, block) for digest, (seq, block) in self._last.items() if seq > since]
        return [(digest, block) for _, digest, block in sorted(found, reverse=True)]


class Retrier:
    """The one loop that retries the data path's requests: the client sends each of them once
    (a struggling registry sees one policy's attempts, not the product of two)."""

    def __init__(self, policy: FetchPolicy, stats: Stats) -> None:
        self.policy, self.stats = policy.retry, stats

    async def again(self, attempt: int, exc: BaseException, where: str) -> bool:
        """Back off before another attempt, as the :class:`~modelfs.retry.RetryPolicy` says
        (jitter, ``Retry-After``); False once it gives up, or when ``exc`` is declared
        permanent (:func:`~modelfs.errors.permanent`: a refusal, a missing blob, ...)."""
        if permanent(exc) or attempt >= self.policy.attempts:
            return False
        self.stats.retries += 1
        delay = self.policy.delay(attempt, exc.retry_after if isinstance(exc, ModelfsError) else None)
        log.warning("fetch of %s failed (%s); retry %d in %.1fs", where, exc or type(exc).__name__, attempt, delay)
        await trio.sleep(delay)
        return True

    def give_up(self, sink: Failing, blocks: Iterable[int], exc: BaseException) -> None:
        self.stats.errors += 1
        log.error("giving up on blocks of %s: %s", sink.digest, exc)
        sink.fail(blocks, exc)


@dataclass
class FetchContext:
    policy: FetchPolicy
    stats: Stats
    buffers: BlockBuffers
    recent: RecentBlocks
    sizer: RequestSizer
    spawn: Spawn
    retry: Retrier
    gate: ForegroundGate
    wrong_bytes: Callable[[str, bool], None]  # (what, fetched): see the module docstring
    pages_stale: Callable[[str], None]  # (reader's key)
    index_vouched: bool = False  # the mount's block index is named by the manifest
    # threads reading cached blocks back for readers (mount/readback.py), for the whole mount;
    # None: the serving loop reads them back itself (no core to spare: policy.readback_threads)
    readback_threads: trio.CapacityLimiter | None = None

    @property
    def read_deadline(self) -> float:
        return self.policy.read_deadline

    def cache_write_failed(self, exc: CacheError) -> None:
        """A block could not be stored: served from memory, said once (and every 1000th)."""
        self.stats.cache_write_errors += 1
        if self.stats.cache_write_errors == 1 or self.stats.cache_write_errors % 1000 == 0:
            log.error("serving without caching: %s", exc)



def call_soon(token: trio.lowlevel.TrioToken, function: Callable[..., object], *args: object) -> None:
    """Run ``function(*args)`` on the loop, from a worker thread, without waiting for it: a
    worker never stalls on a busy loop. An error in ``function`` is logged, never raised into
    trio's runner (which would end the daemon)."""
    token.run_sync_soon(_logged, function, args)


def _logged(function: Callable[..., object], args: tuple[object, ...]) -> None:
    try:
        function(*args)
    except Exception:
        log.exception("unexpected error in %s", getattr(function, "__qualname__", function))
