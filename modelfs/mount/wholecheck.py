"""Checking a complete blob against its digest: once every block is here (fetched by ranges,
or cached by anyone), the blob is hashed whole from disk on a worker thread, unless a block
index the manifest vouches for matched every block, or its source checks it (a compressed
layer's stream). A blob that matches is marked checked whole; one that does not leaves by the
one drop path, and if an index had vouched for every block of it, the index stops being
trusted for it.
"""

from __future__ import annotations

import hashlib
import logging

import trio

from ..errors import CacheError
from ..storage.store import BlockDamaged
from .blob import HeldBlob
from .passes import WholePasses
from .trust import Mode

log = logging.getLogger(__name__)


class WholeCheck:
    def __init__(self, blob: HeldBlob, passes: WholePasses, source_checks_whole: bool) -> None:
        self.blob, self.passes, self.source_checks_whole = blob, passes, source_checks_whole
        self.running = False
        self._done = trio.Event()

    @property
    def _vouched(self) -> bool:
        entry = self.blob.entry
        return entry.verified or self.blob.trust.covers(entry)

    def maybe_start(self) -> None:
        """A complete blob not yet checked whole is hashed once, unless a block index the
        manifest vouches for matched every block, or its source checks it."""
        if self.running or self.passes.running or self.source_checks_whole or not self.blob.entry.complete:
            return
        if self._vouched:
            return
        self.running = True
        self._done = trio.Event()
        self.blob.ctx.spawn(self._verify)

    async def verified(self) -> bool:
        """Whether the blob is complete and vouched for, waiting for a check under way."""
        self.maybe_start()
        if self.running:
            await self._done.wait()
        return self.blob.entry.complete and self._vouched

    async def _verify(self) -> None:
        blob = self.blob
        try:
            if blob.trust.mode is Mode.INDEX and not await self._settle_against_index():
                return  # a block was dropped: fetched again when read, then checked anew
            if blob.trust.covers(blob.entry):
                return
            matches, checks = await trio.to_thread.run_sync(self._hash_whole)
            if matches is None:
                return
            if matches:
                await trio.to_thread.run_sync(blob.entry.mark_whole, checks)
            else:
                if blob.trust.mode is Mode.INDEX:  # every block matched it: the index is wrong
                    log.error("the block index of %s vouched for blocks of a blob that does not match its digest; "
                              "no longer trusting it for this blob", blob.digest)
                    blob.trust = blob.trust.without_index()
                blob.digest_mismatch()
        except CacheError as exc:
            log.error("could not verify %s: %s", blob.digest, exc)
        except Exception:  # runs in the fetcher's nursery: an escape would stop the daemon
            log.exception("unexpected error verifying %s", blob.digest)
        finally:
            self.running = False
            self._done.set()

    async def _settle_against_index(self) -> bool:
        """Before the blob is hashed whole (or instead, with a vouched index): every cached
        block this reader's index has not matched yet (another process stored it, under its
        own trust) is hashed against the index and adopted, or dropped. True if every block
        is now matched; only then can a failing whole-blob hash blame the index."""
        blob = self.blob
        pending = [i for i in range(blob.entry.nblocks) if not blob.trust.accepts(blob.entry, i)]
        verdicts = await trio.to_thread.run_sync(lambda: [(i, blob.match_cached(i)) for i in pending])
        settled = True
        for index, verdict in verdicts:
            if verdict is not True:
                settled = False
                if isinstance(verdict, BaseException):
                    blob.foreign_block_wrong(index, verdict)
        return settled

    def _hash_whole(self) -> tuple[bool | None, dict[int, int]]:
        """Hash the blob from disk (on a worker thread): whether it matches its digest, with
        each block's checksum for ``mark_whole``; None if a block did not read back (dropped,
        so it is fetched again, and the blob checked once complete again)."""
        entry = self.blob.entry
        hasher = hashlib.sha256()
        checks: dict[int, int] = {}
        for index in range(entry.nblocks):
            try:
                data, checks[index] = entry.read_checked(index)
            except BlockDamaged as exc:
                trio.from_thread.run_sync(self.blob.damaged, index, exc)
                return None, checks
            except CacheError:
                return None, checks
            hasher.update(data)
        return "sha256:" + hasher.hexdigest() == entry.digest, checks
