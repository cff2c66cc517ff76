"""Request slots with a priority: range requests in flight, reads before prefetch.

Prefetch used to stop whenever any process waited on a read (with 16 loader threads that
is always), so the link sat idle 51-67% of the time while reads came in bursts (issue 23).
Now prefetch keeps every slot busy, and a read's run takes the next slot that frees before
any prefetch run waiting for one: what a read waits on is at most one run already in flight.

Prefetch takes its slot (:meth:`RequestSlots.lease`) *before* it claims blocks, and the run
it schedules inherits that slot: a run whose blocks were claimed but which queued behind
reads would hold up every reader that then waits on those blocks.

A read waits for a run in flight only so long: one the registry stalls (its connection open,
no bytes) holds its slot for the stall window, the read timeout by default, and a read
queued behind it timed out with it (an EIO). A read still waiting after
:data:`OVERDRAFT_AFTER` while background runs hold slots takes one past the total: reads
alone never hold more than the total, so at most twice as many requests are in flight.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from types import TracebackType

import trio

# Seconds a foreground waiter waits for a slot that background runs hold before it takes one
# past the total. A run of a healthy link ends well within it (16 MiB at 50 MB/s: 0.3 s).
OVERDRAFT_AFTER = 1.0


class _Lease:
    def __init__(self, slots: RequestSlots) -> None:
        self.slots, self.taken, self.open = slots, False, True


# the slot a prefetch worker holds for the run it is about to schedule (tasks spawned while it
# is set inherit it: trio copies the spawning task's context)
_LEASED: ContextVar[_Lease | None] = ContextVar("modelfs_leased_slot", default=None)


class RequestSlots:
    """At most ``total_tokens`` holders at once; waiters for the foreground (a reader's runs,
    read-ahead, metadata) are handed a freed slot before background ones (prefetch, pull)."""

    def __init__(self, total: int) -> None:
        self._total = max(1, total)
        self.in_use = 0
        self.background = 0  # of in_use, the slots background runs (prefetch, pull) hold
        self._waiting: dict[bool, deque[trio.Event]] = {True: deque(), False: deque()}

    @property
    def total_tokens(self) -> int:
        return self._total

    @total_tokens.setter
    def total_tokens(self, total: int) -> None:
        self._total = max(1, total)
        self._hand_on()

    def waiting(self, foreground: bool = True) -> int:
        return len(self._waiting[foreground])

    async def acquire(self, foreground: bool = True) -> None:
        """Take a slot, waiting behind every foreground waiter (and, in the background, every
        waiter); a foreground one waits past :data:`OVERDRAFT_AFTER` only on other reads."""
        ahead = self._waiting[True] or (not foreground and self._waiting[False])
        if self.in_use < self._total and not ahead:
            self._take(foreground)
            try:
                await trio.lowlevel.checkpoint()
            except BaseException:
                self.release(foreground)
                raise
            return
        event = trio.Event()
        queue = self._waiting[foreground]
        queue.append(event)
        try:
            while not event.is_set():
                with trio.move_on_after(OVERDRAFT_AFTER if foreground else math.inf):
                    await event.wait()
                if not event.is_set() and self.in_use - self.background < self._total:
                    queue.remove(event)  # background runs hold the slots: one past the total
                    self._take(foreground)
                    return
        except BaseException:
            if event.is_set():  # handed a slot as it was cancelled: hand it on
                self.release(foreground)
            else:
                queue.remove(event)
            raise

    def _take(self, foreground: bool) -> None:
        self.in_use += 1
        if not foreground:
            self.background += 1

    def release(self, foreground: bool = True) -> None:
        self.in_use -= 1
        if not foreground:
            self.background -= 1
        self._hand_on()

    def _hand_on(self) -> None:
        while self.in_use < self._total:
            foreground = bool(self._waiting[True])
            queue = self._waiting[foreground]
            if not queue:
                return
            self._take(foreground)
            queue.popleft().set()

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[None]:
        """Hold a background slot for the run scheduled inside the block: that run takes it
        over (and releases it when it ends); unused, it is released on leaving."""
        await self.acquire(False)
        lease = _Lease(self)
        token = _LEASED.set(lease)
        try:
            yield
        finally:
            _LEASED.reset(token)
            lease.open = False  # a task spawned in the block that starts later takes a slot of its own
            if not lease.taken:
                self.release(False)

    def _take_lease(self) -> bool:
        lease = _LEASED.get()
        if lease is None or lease.taken or not lease.open or lease.slots is not self:
            return False
        lease.taken = True
        return True

    def held(self, foreground: bool = True) -> _Held:
        """``async with slots.held(foreground):`` one slot for the block."""
        return _Held(self, foreground)


class _Held:
    def __init__(self, slots: RequestSlots, foreground: bool) -> None:
        self.slots, self.foreground = slots, foreground
        self.holding = False

    async def __aenter__(self) -> _Held:
        if self.slots._take_lease():
            self.foreground = False  # a prefetch worker's slot, counted as the background's
        else:
            await self.slots.acquire(self.foreground)
        self.holding = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.holding:
            self.holding = False
            self.slots.release(self.foreground)

    @asynccontextmanager
    async def given_up(self) -> AsyncIterator[None]:
        """The slot free for the block (a run backing off before its next attempt), taken
        again after it, behind the waiters of its priority. Held through the backoff, a
        prefetch run on a failing blob kept a read of another blob waiting through its whole
        retry schedule (6 s with ``--workers 1``; a ``--timeout`` below that, an EIO)."""
        self.holding = False
        self.slots.release(self.foreground)
        try:
            yield
        finally:
            await self.slots.acquire(self.foreground)
            self.holding = True
