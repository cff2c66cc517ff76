"""Passes over a whole blob (whole mode, a compressed layer's stream), and how readers wait on
them: nothing is served before a pass checked the blob whole, so every reader waits for the
pass, however few of its blocks it wants.

The deadline moves while the pass makes progress: a large blob on a slow link is not a
stalled one. Every reader waiting on a pass that fails gets its error; a later read starts a
new pass (a new generation). As with a block (:mod:`.flights`), a read right after another
gave up on the same pass fails at once instead of waiting a second timeout.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..errors import FetchError
from .flights import KERNEL_RETRY_WINDOW


class WholePasses:
    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.running = False
        self.generation = 0
        self._outcome: tuple[int, BaseException | None] = (0, None)
        self._stalled: tuple[int, float] = (-1, 0.0)  # pass a reader gave up on, and when
        self._changed = trio.Event()  # set (and replaced) on every step of a pass's progress
        self._progress = 0

    def begin(self) -> int:
        if not self.running:
            self.running = True
            self.generation += 1
        return self.generation

    def tick(self) -> None:
        self._progress += 1
        self._changed.set()
        self._changed = trio.Event()

    def end(self, failure: BaseException | None) -> None:
        self._outcome = (self.generation, failure)
        self.running = False
        self.tick()

    async def wait(self, ready: Callable[[], bool], start: Callable[[], None], seconds: float, rounds: int) -> None:
        """Until ``ready()``, starting a pass (``start``) when none runs, at most ``rounds``
        passes; raises :class:`FetchError` when a pass fails or makes no progress for
        ``seconds``."""
        for _ in range(rounds):
            if ready():
                return
            start()
            generation = self.generation
            while self.running and self.generation == generation:
                if self._stalled[0] == generation and trio.current_time() - self._stalled[1] < KERNEL_RETRY_WINDOW:
                    raise FetchError(f"{self.digest}: its fetch has already made no progress for {seconds:g}s")
                seen = self._progress
                with trio.move_on_after(seconds):
                    await self._changed.wait()
                if self._progress == seen:
                    self._stalled = (generation, trio.current_time())
                    raise FetchError(f"timed out after {seconds:g}s waiting for {self.digest} (no progress)")
            failed_generation, failure = self._outcome
            if failed_generation == generation and failure is not None:
                raise FetchError(f"cannot fetch {self.digest}: {failure}")
        if not ready():
            raise FetchError(f"{self.digest} was checked but could not be kept long enough to serve it")
