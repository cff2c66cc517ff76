"""Two processes and one compressed layer (two mounts of one model): the process streaming a
layer holds a claim on it (an OFD lock on a byte of the layer's ``.claims`` file, past any
block number, so it never meets the per-block claims of a range fetch of the same blob; gone
with the process that held it). Another waits while that stream makes progress (blocks appear
in the cache), then finds the files checked there; one that stores nothing for a while
(frozen, or slower than we would be) is no longer waited on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

from ..storage.claims import PeerClaims, peer_wait
from .sink import ReaderSink

log = logging.getLogger(__name__)

STREAM_CLAIM = 1 << 40
# How often a follower looks at the peer's progress: each look re-reads every file's map (48
# bytes a block) on a worker thread, so not at the 20 ms a single block's claim is polled at;
# a tenth of a second is far inside any read deadline the progress extends.
FOLLOW_SECONDS = 0.1


class LayerClaim:
    """The claim of the process streaming one compressed layer. Without a claims file, every
    process streams."""

    def __init__(self, path: str) -> None:
        self.claims: PeerClaims | None = None
        try:
            self.claims = PeerClaims(path)
        except OSError as exc:
            log.debug("no claims file %s (%s): streaming without looking at other processes", path, exc)

    def take(self) -> bool:
        return self.claims is None or self.claims.take(STREAM_CLAIM, STREAM_CLAIM) == STREAM_CLAIM

    def peer_holds(self) -> bool:
        return self.claims is not None and self.claims.held_by_peer(STREAM_CLAIM)

    def close(self) -> None:
        if self.claims is not None:
            self.claims.close()
            self.claims = None


async def follow_peer(claim: LayerClaim, files: Iterable[ReaderSink], read_seconds: float, where: str) -> bool:
    """Wait while another process streams the layer and stores blocks of ``files``; True once
    every file is checked in the cache (nothing to fetch here). False when it stored nothing
    for :func:`~.claims.peer_wait` of ``read_seconds``, or let go with files unchecked."""
    sinks = list(files)
    patience = peer_wait(read_seconds)
    stored, last = -1, trio.current_time()
    while claim.peer_holds():
        now_stored = await trio.to_thread.run_sync(lambda: sum(sink.reload_stored() for sink in sinks))
        if now_stored != stored:
            stored, last = now_stored, trio.current_time()
            _wake(sinks)
        elif trio.current_time() - last > patience:
            log.info("%s: another process streaming it stored nothing for %gs; streaming it here too", where, patience)
            return False
        await trio.sleep(FOLLOW_SECONDS)
    await trio.to_thread.run_sync(lambda: [sink.reload_stored() for sink in sinks])
    _wake(sinks)
    done = all(sink.verified for sink in sinks)
    if done:
        log.info("%s: another process streamed it; its files are checked in the cache", where)
    return done


def _wake(sinks: list[ReaderSink]) -> None:
    for sink in sinks:
        sink.peer_progress()
