"""The failure layer of the fake registry: what goes wrong, on which request, and a count of
what did.

A fault is scheduled for the n-th ranged GET (1-based, over every blob or one ``digest``),
or for every one (``nth=None``); streams of a whole blob have their own count. Faults of a
range:

- ``fail``: answered with an error status (503 unless said);
- ``stall``: the body stops after k blocks until the transfer is aborted;
- ``cut``: the body ends after k blocks, short of what was announced;
- ``flip``: one byte of the body flipped;
- ``answer_whole``: a 200 with the whole blob to a ``Range`` request (a pull-through
  cache still filling);
- ``answer_other_range``: a 206 for other bytes than asked;
- ``kill_worker``: the worker thread raises (a bug, a ``MemoryError``) after k blocks.

Faults of a stream: ``stall_stream``, ``cut_stream``, ``flip_stream`` (by bytes).
``before_body`` runs before each range's body is read, on the worker thread: a test puts
"another process" there (a block written to the cache under the reader's feet).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import trio


class WorkerKilled(RuntimeError):
    """What a killed worker raises: not a network error, not a modelfs error."""


@dataclass
class Fault:
    kind: str
    nth: int | None  # the request it hits (1-based); None: every one
    digest: str | None = None  # only requests for this blob (and nth counts all of them)
    after: int = 0  # blocks into the body (stall, cut, kill_worker) or bytes (flip, streams)
    status: int = 503

    def hits(self, digest: str, nth: int) -> bool:
        return (self.digest is None or self.digest == digest) and (self.nth is None or self.nth == nth)


@dataclass(frozen=True)
class Answer:
    """How one range is answered: status, headers, body, and where the body stalls or ends."""

    status: int
    body: bytes
    headers: dict[str, str]
    stall_at: int | None = None
    cut_at: int | None = None


@dataclass
class Faults:
    ranges: list[Fault] = field(default_factory=list)
    streams: list[Fault] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)  # "kind#nth", in the order they fired
    aborted: int = 0  # range bodies aborted from outside (stalled, or the fetch cancelled)
    before_body: Callable[[str, int, int], None] | None = None  # (digest, start, end), on the worker thread
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- scheduling ------------------------------------------------------------------------

    def _add(self, kind: str, nth: int | None, digest: str | None, after: int = 0, status: int = 503) -> None:
        target = self.streams if kind.endswith("_stream") else self.ranges
        target.append(Fault(kind, nth, digest, after, status))

    def fail(self, nth: int | None = 1, status: int = 503, digest: str | None = None) -> None:
        self._add("fail", nth, digest, status=status)

    def stall(self, nth: int | None = 1, after_blocks: int = 0, digest: str | None = None) -> None:
        self._add("stall", nth, digest, after_blocks)

    def cut(self, nth: int | None = 1, after_blocks: int = 1, digest: str | None = None) -> None:
        self._add("cut", nth, digest, after_blocks)

    def flip(self, nth: int | None = 1, at: int = 0, digest: str | None = None) -> None:
        self._add("flip", nth, digest, at)

    def answer_whole(self, nth: int | None = 1, digest: str | None = None) -> None:
        self._add("whole", nth, digest)

    def answer_other_range(self, nth: int | None = 1, digest: str | None = None) -> None:
        self._add("shift", nth, digest)

    def kill_worker(self, nth: int | None = 1, after_blocks: int = 1, digest: str | None = None) -> None:
        self._add("kill", nth, digest, after_blocks)

    def stall_stream(self, nth: int | None = 1, after: int = 0) -> None:
        self._add("stall_stream", nth, None, after)

    def cut_stream(self, nth: int | None = 1, after: int = 0) -> None:
        self._add("cut_stream", nth, None, after)

    def flip_stream(self, nth: int | None = 1, at: int = 0) -> None:
        self._add("flip_stream", nth, None, at)

    def clear(self) -> None:
        self.ranges.clear()
        self.streams.clear()

    def count(self, kind: str) -> int:
        return sum(1 for fired in self.fired if fired.split("#")[0] == kind)

    def _firing(self, faults: list[Fault], digest: str, nth: int) -> list[Fault]:
        hit = [fault for fault in faults if fault.hits(digest, nth)]
        with self._lock:
            self.fired.extend(f"{fault.kind}#{nth}" for fault in hit)
        return hit

    # -- applying (called by the fake registry) --------------------------------------------

    def answer(self, digest: str, nth: int, blob: bytes, start: int, lengths: Sequence[int]) -> Answer:
        """The answer to the ``nth`` range request, bytes [start, start + sum(lengths)) of ``blob``."""
        end = start + sum(lengths)
        if self.before_body is not None:
            self.before_body(digest, start, end)
        status, body = 206, blob[start:end]
        headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(blob)}"}
        stall_at = cut_at = None
        for fault in self._firing([f for f in self.ranges if f.kind != "kill"], digest, nth):
            into = sum(lengths[:fault.after])
            if fault.kind == "fail":
                return Answer(fault.status, b"", {})
            if fault.kind == "stall":
                stall_at = into
            elif fault.kind == "cut":
                cut_at = into
            elif fault.kind == "flip":
                flipped = bytearray(body)
                flipped[fault.after] ^= 0xFF
                body = bytes(flipped)
            elif fault.kind == "whole":
                status, body, headers = 200, blob, {}
            elif fault.kind == "shift":
                moved = min(start + lengths[0], len(blob) - (end - start))
                body = blob[moved:moved + end - start]
                headers = {"Content-Range": f"bytes {moved}-{moved + end - start - 1}/{len(blob)}"}
        return Answer(status, body, headers, stall_at, cut_at)

    def on_block(self, digest: str, nth: int, deliver: Callable[[int, memoryview], None]
                 ) -> Callable[[int, memoryview], None]:
        """``deliver``, or one that raises once ``kill_worker``'s blocks were delivered."""
        kills = [fault for fault in self.ranges if fault.kind == "kill" and fault.hits(digest, nth)]
        if not kills:
            return deliver
        after = kills[0].after

        def then_die(position: int, block: memoryview) -> None:
            if position == after:
                with self._lock:
                    self.fired.append(f"kill#{nth}")
                raise WorkerKilled(f"worker died after {after} blocks")
            deliver(position, block)
        return then_die

    async def stream_body(self, digest: str, nth: int, data: bytes, chunk: int) -> AsyncIterator[bytes]:
        """The chunks of the ``nth`` stream of ``data``, with its faults applied."""
        stall_at = cut_at = None
        for fault in self._firing(self.streams, digest, nth):
            if fault.kind == "stall_stream":
                stall_at = fault.after
            elif fault.kind == "cut_stream":
                cut_at = fault.after
            elif fault.kind == "flip_stream":
                flipped = bytearray(data)
                flipped[fault.after] ^= 0xFF
                data = bytes(flipped)
        end = len(data) if cut_at is None else cut_at
        at = 0
        while at < end:
            stop = min(end, at + chunk)
            if stall_at is not None and at <= stall_at < stop:
                if stall_at > at:
                    yield data[at:stall_at]
                await trio.sleep_forever()  # the reader's stall guard ends it
            yield data[at:stop]
            at = stop
