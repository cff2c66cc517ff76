"""Blocks another process is fetching right now, so that two mounts of one model on a host
(two pods of a node, through the CSI plugin) fetch each block once, not once each.

Within a process, a block in flight is claimed in memory (:meth:`BlobReader.claim`). Across
processes, a process about to fetch blocks ``i..j`` of a blob holds an open-file-description
write lock (``F_OFD_SETLK``) on bytes ``i..j`` of the blob's ``.claims`` file beside its cache
files, for the time of that range request. Another process that finds a block locked waits
for the lock to go, then looks in the cache again, where the block has usually arrived.

Such locks belong to the open file, so they die with the process that held them: a crashed
daemon never leaves a claim behind. A peer that holds one too long (frozen, or on a link
slower than ours) is waited on for at most :func:`peer_wait` (a share of the mount's
``--timeout``, at most ``PEER_WAIT_SECONDS``); the block is then fetched anyway: a
duplicate fetch, never a stuck read. Nothing here decides what is served: a block
a peer stored is served only once it passes the checks any cached block passes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import trio

PEER_WAIT_SECONDS = 5.0
PEER_WAIT_SHARE = 0.25
POLL_SECONDS = 0.02

_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid (0 for OFD locks)


def peer_wait(timeout: float) -> float:
    """How long a fetch waits on a peer's claim, given the read's ``timeout``: a quarter of
    it, at most ``PEER_WAIT_SECONDS``. The wait comes out of the budget of the read that
    needs the block, which gets EIO past ``timeout``; when the peer is frozen, our own range
    request (where to read, a connection, the first block) must still fit in what is left,
    and three quarters leave it nearly the whole budget. A quarter still waits out a healthy
    peer: it lets go of its claims when its range request ends, and requests are sized to
    take about half a second (``RequestSizer.target_seconds``), as long as a quarter of a
    2 s timeout. With the default 120 s the cap applies, as before."""
    return max(0.0, min(PEER_WAIT_SECONDS, timeout * PEER_WAIT_SHARE))


class PeerClaims:
    """The claims on one blob's blocks held by one range request (one open of the file)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def close(self) -> None:
        """Release every claim of this request (closing the file does)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PeerClaims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def take(self, first: int, last: int) -> int:
        """Claim blocks from ``first`` on, up to ``last`` or the first a peer holds; returns
        the last block claimed (``first - 1``: none, a peer fetches ``first``)."""
        index = first
        while index <= last and self._lock(fcntl.F_WRLCK, index, fcntl.F_OFD_SETLK):
            index += 1
        return index - 1

    def release(self, first: int, last: int) -> None:
        self._lock(fcntl.F_UNLCK, first, fcntl.F_OFD_SETLK, last - first + 1)

    def held_by_peer(self, index: int) -> bool:
        request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, index, 1, 0)
        answer = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, request)
        return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK

    async def wait_for_peer(self, index: int, deadline: float) -> bool:
        """Wait while a peer holds block ``index``: True once it let go, False if it still
        holds it at ``deadline`` (trio's clock)."""
        with trio.move_on_at(deadline):
            # Polled: a lock held by another process signals no event here.
            while self.held_by_peer(index):  # noqa: ASYNC110
                await trio.sleep(POLL_SECONDS)
            return True
        return False

    def _lock(self, kind: int, index: int, command: int, length: int = 1) -> bool:
        try:
            fcntl.fcntl(self.fd, command, _FLOCK.pack(kind, os.SEEK_SET, index, length, 0))
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
