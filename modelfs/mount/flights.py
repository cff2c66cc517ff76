"""The single flight of one blob's blocks, and how a reader waits on it (index mode, lazy):
one ``trio.Event`` per block being fetched, every reader of that block waits on it, and the
fetch that claimed it sets it (delivered, or failed with the error its readers get).

A read that waited the timeout fails with EIO, and so, at once, does a read of the same block
while that fetch still runs: the kernel retries a page whose readahead failed at once, and
that retry does not wait a second full timeout (``KERNEL_RETRY_WINDOW``). A later read (an
application retrying) waits again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio

from ..errors import FetchError
from .stats import Stats

KERNEL_RETRY_WINDOW = 0.5


class BlockFlights:
    def __init__(self, digest: str, stats: Stats) -> None:
        self.digest, self.stats = digest, stats
        self._inflight: dict[int, trio.Event] = {}
        self._failures: dict[int, BaseException] = {}
        self._timed_out: dict[int, tuple[trio.Event, float]] = {}  # a reader gave up on this fetch, and when

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    def in_flight(self, index: int) -> bool:
        return index in self._inflight

    def pending(self) -> list[int]:
        return list(self._inflight)

    def claim(self, blocks: Iterable[int], needed: Callable[[int], bool]) -> list[int]:
        """The blocks of ``blocks`` nobody fetches yet and that are ``needed``, now in flight."""
        claimed = []
        for index in blocks:
            if index not in self._inflight and needed(index):
                self._inflight[index] = trio.Event()
                self._failures.pop(index, None)
                claimed.append(index)
        self.stats.inflight_blocks += len(claimed)
        return claimed

    def arrived(self, index: int) -> None:
        """Block ``index`` is servable now: wake its readers."""
        event = self._inflight.pop(index, None)
        self._timed_out.pop(index, None)
        if event is not None:
            self.stats.inflight_blocks -= 1
            event.set()

    def fail(self, blocks: Iterable[int], exc: BaseException) -> None:
        """Wake the readers of ``blocks`` still in flight with ``exc``."""
        for index in blocks:
            event = self._inflight.pop(index, None)
            self._timed_out.pop(index, None)
            if event is not None:
                self.stats.inflight_blocks -= 1
                self._failures[index] = exc
                event.set()

    async def wait(self, blocks: list[int], servable: Callable[[int], bool], foreground: bool, seconds: float) -> None:
        """Until every block of ``blocks`` is servable (their fetches were scheduled); raises
        :class:`FetchError` with what their fetch met, or past ``seconds``. ``foreground``: a
        reader waits (not prefetch, which moves on from a block fetched but not kept)."""
        waiting: trio.Event | None = None
        index = -1
        with trio.move_on_after(seconds) as scope:
            for index in blocks:
                while not servable(index):
                    waiting = self._inflight.get(index)
                    if waiting is None:
                        failure = self._failures.get(index)
                        if failure is None and not foreground:
                            break  # fetched, but not kept (full disk): nobody is waiting for it
                        raise FetchError(f"cannot fetch block {index} of {self.digest}: "
                                         f"{failure or 'fetch ended without data'}")
                    gave_up = self._timed_out.get(index)
                    if gave_up and gave_up[0] is waiting and trio.current_time() - gave_up[1] < KERNEL_RETRY_WINDOW:
                        raise FetchError(f"block {index} of {self.digest}: its fetch has already run past the "
                                         f"{seconds:g}s timeout")
                    await waiting.wait()
        if scope.cancelled_caught:
            if waiting is not None and self._inflight.get(index) is waiting:
                self._timed_out[index] = (waiting, trio.current_time())
            raise FetchError(f"timed out after {seconds:g}s waiting for {self.digest}")
