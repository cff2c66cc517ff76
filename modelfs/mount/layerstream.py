"""Compressed tar layers (tar+gzip, tar+zstd): streamed once, served as their bytes arrive.

A compressed blob has no random access, so the first read of any file in it starts one
GET of the whole blob. Its bytes are hashed (the layer digest) and decompressed on the fly
(:mod:`.stream`), the tar stream is walked with the same rules as every other tar here, and
each member's blocks go into a cache entry of its own ("derived", keyed by layer digest and
path) the moment they are decompressed, waking the readers waiting on them. When the stream
ends the layer digest is checked: a mismatch drops every derived block, a match marks them
verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import trio

from ..errors import EXPECTED, CacheError, DamagedStreamError, FetchError, IntegrityError, ManifestError
from ..formats.spec import Descriptor, Packing
from ..formats.tarindex import REGULAR, Member, iter_members
from ..registry.client import BlobBody
from ..retry import REPLACED_ROUNDS
from ..storage.store import FilesReplaced
from .blobreader import BlobReader
from .context import FetchContext
from .layerpeers import LayerClaim, follow_peer
from .sink import ReaderSink, StoredBlob
from .stream import StallGuard, StreamSource
from .trust import Trust

log = logging.getLogger(__name__)


def derived_key(layer_digest: str, path: str) -> str:
    """Cache key of a member unpacked from a compressed layer."""
    return "sha256:" + hashlib.sha256(f"{layer_digest}\0{path}".encode()).hexdigest()


@dataclass(frozen=True)
class LayerOrigin:
    """Where a layer's compressed bytes and its files' blocks live, as the fetcher hands them
    down: the cache entry of each file (``entry``), the layer's claims file, the layer's own
    reader when the cache holds it (``cached``), and the registry's stream of it."""

    entry: Callable[[str, int], StoredBlob]
    claims_path: str
    cached: Callable[[], ReaderSink | None]
    open_remote: Callable[[], AbstractAsyncContextManager[BlobBody]]


class LayerStream:
    """The block source of every file in one compressed layer (a :class:`~.sink.BlockSource`):
    a reader of any of them starts one pass over the layer, which fills them all, and checks
    the layer digest itself (``checks_whole``).

    Each file's blocks go into a cache entry of its own ("derived", keyed by layer digest and
    path), served once the layer matched its digest (or as they arrive, with ``--verify lazy``).

    - **Where the layer's bytes come from**: the cache, when it holds the compressed blob
      whole with the trust this mount requires (``pull`` stores it), else the registry. So a
      model pulled once mounts offline, and its first mount downloads nothing again.
    - **Other processes** (two mounts of one model): the process streaming a layer holds a
      claim on it (:mod:`.layerpeers`); another waits while that stream makes progress, then
      finds the files checked in the cache. No pass clears what another may be filling: a
      block already stored is kept if equal to ours (:meth:`~.blob.HeldBlob.store`).
    - **Files replaced under the check** (``cache prune``): the pass starts again, bounded by
      ``REPLACED_ROUNDS``, without failing the readers waiting for it.
    """

    checks_whole = True

    def __init__(self, ctx: FetchContext, layer: Descriptor, packing: Packing, where: str, origin: LayerOrigin) -> None:
        self.ctx, self.layer, self.packing, self.where, self.origin = ctx, layer, packing, where, origin
        self.targets: dict[str, BlobReader] = {}
        self._checks: dict[str, dict[int, int]] = {}  # checksum of each block this pass stored, per file
        self._files: dict[str, tuple[int, int]] = {}  # the files each target's blocks went into this pass
        self._seen: set[str] = set()  # files the layer held, this pass
        self._from_cache: ReaderSink | None = None  # the layer's cached copy this pass reads, if any
        self._running = False
        self._collect = False

    def target(self, path: str, size: int) -> BlobReader:
        reader = self.targets.get(path)
        if reader is None:
            entry = self.origin.entry(derived_key(self.layer.digest, path), size)
            trust = Trust.decide(None, None, False, self.ctx.policy.lazy)
            reader = self.targets[path] = BlobReader(self.ctx, entry, self, trust)
            self._checks[path] = {}
        return reader

    def _sinks(self) -> dict[str, ReaderSink]:
        return {path: reader.sink for path, reader in self.targets.items()}

    def schedule(self, sink: ReaderSink, blocks: list[int], for_reader: bool = True) -> None:
        if sink.trust.per_block:
            sink.claim(blocks)  # lazy: readers wait per block, served as they arrive
        self.ensure_running()

    def ensure_running(self) -> None:
        if not self._running:
            self._running = True
            self._begin_pass()
            self.ctx.spawn(self._run_logged)

    def _begin_pass(self) -> None:
        """A new pass: every block it stores is recorded with its checksum. Nothing is cleared:
        another process may be filling the same files (a block already there is kept if it
        equals ours)."""
        for path, sink in self._sinks().items():
            sink.begin_pass()
            self._checks[path] = {}
        self._files.clear()
        self._seen.clear()

    def _keep(self, path: str, sink: ReaderSink, index: int, data: bytes) -> None:
        try:
            if path not in self._files:
                self._files[path] = sink.files_id()
            check = sink.store(index, data)
            if check is not None:
                self._checks[path][index] = check
        except CacheError as exc:
            self.ctx.cache_write_failed(exc)
        if sink.serves_unchecked:
            sink.deliver(index, data, fetched=False)
        sink.tick()

    async def collect(self) -> list[Member]:
        """Stream the layer now, creating a target per file (layers without file metadata)."""
        self._collect, self._running = True, True
        try:
            try:
                return await self._run()
            except (DamagedStreamError, IntegrityError) as exc:  # wrong bytes: read once more, from the registry itself
                log.warning("%s; streaming the layer again", exc)
                self._begin_pass()
                return await self._run()
        finally:
            self._collect = False
            self._running = False

    async def _run_logged(self) -> None:
        """The stream in the background: retried on transient failures, and whatever happens
        it ends with every waiting reader told, never with an exception into the daemon."""
        attempt = replaced = 0
        failure: BaseException | None = None
        try:
            while True:
                try:
                    await self._stream_once()
                    failure = None
                    return
                except FilesReplaced as exc:
                    failure = exc
                    replaced += 1
                    if replaced >= REPLACED_ROUNDS:
                        break
                    log.info("%s; streaming the layer again", exc)
                except EXPECTED as exc:
                    failure = exc
                    attempt += 1
                    if not await self.ctx.retry.again(attempt, exc, self.where):
                        break
                self._begin_pass()
            self.ctx.stats.errors += 1
            log.error("%s", failure if str(failure).startswith(self.where) else f"{self.where}: {failure}")
        except Exception as exc:  # a bug: fail these reads, keep the daemon
            failure = exc
            log.exception("%s: unexpected error streaming the layer", self.where)
        finally:
            self._running = False
            for path, sink in self._sinks().items():
                sink.end_pass(failure or self._not_kept(path, sink))

    def _not_kept(self, path: str, sink: ReaderSink) -> BaseException | None:
        """Why a file of a layer that checked out is not servable now, or None: it is, or it
        was stored whole and replaced since (the reader looks again, and a new pass starts)."""
        if sink.verified:
            return None
        if path not in self._seen:
            return ManifestError(f"{self.where}: the layer holds no file {path!r} of {sink.size} bytes")
        if sink.serves_unchecked:
            return None
        if len(self._checks[path]) < sink.nblocks:
            return CacheError(f"{self.where}: the cache could not keep every block of {path!r} (is its disk full?); "
                              "a compressed layer is served only once kept and checked")
        return None

    async def _stream_once(self) -> None:
        """One pass, unless another process is streaming the layer: then wait for it while it
        makes progress, and stream here only if it stops or fails."""
        with contextlib.closing(LayerClaim(self.origin.claims_path)) as claim:
            if not claim.take():
                if await follow_peer(claim, self._sinks().values(), self.ctx.read_deadline, self.where):
                    return
                claim.take()  # the peer let go, failed or stalled: stream here, holding it if we can
            await self._run()

    async def _run(self) -> list[Member]:
        members: list[Member] = []
        try:
            guard = StallGuard(self.ctx.policy.stall_window)
            with guard.scope:  # the request is sent once (ONE_ATTEMPT): _run_logged retries, by the one policy
                async with self._open_layer() as chunks:
                    source = StreamSource(chunks, self.packing, self.where)
                    source.on_progress = guard.fed
                    async for member in iter_members(source, self.where):
                        members.append(member)
                        if member.kind == REGULAR:
                            await self._copy(source, member)
                    await source.drain()
            if guard.fired:
                raise FetchError(f"{self.where}: less than 1 MiB arrived in {guard.seconds:g}s (server stalled or trickling)")
            if source.compressed_bytes != self.layer.size or "sha256:" + source.hasher.hexdigest() != self.layer.digest:
                self.ctx.wrong_bytes(f"layer {self.layer.digest}", True)
                self._drop_unverified()
                if self._from_cache is not None:  # cannot be, checked as it was: never read it again
                    self._from_cache.drop()
                raise IntegrityError(f"{self.where}: blob does not match its digest; its files were dropped from the cache")
            for path, sink in self._sinks().items():
                sink.fail_pending(ManifestError(f"{self.where}: the layer holds no such file"))
                await self._mark_checked(path, sink)
            return members
        except DamagedStreamError:
            if self._from_cache is None:  # the source's bytes, as a digest that does not match: mirrors left out a while
                self.ctx.wrong_bytes(f"layer {self.layer.digest}", True)
            self._drop_unverified()
            raise
        except BaseException:
            self._drop_unverified()
            raise

    async def _mark_checked(self, path: str, sink: ReaderSink) -> None:
        """The layer matched its digest: the blocks this pass stored for ``path`` are checked.
        Files replaced meanwhile lost them: :class:`FilesReplaced` (the pass starts again)."""
        if path not in self._seen or sink.verified or len(self._checks[path]) < sink.nblocks:
            return  # not in the layer, already checked, or not kept (said at the end of the pass)
        replaced = await trio.to_thread.run_sync(sink.files_id) != self._files.get(path)
        if replaced or not await trio.to_thread.run_sync(sink.mark_whole, self._checks[path]):
            raise FilesReplaced(f"{self.where}: the cache files of {path!r} were replaced while the layer was checked")

    @asynccontextmanager
    async def _open_layer(self) -> AsyncIterator[AsyncIterator[bytes]]:
        """The layer's compressed bytes: from the cache where it holds them with the trust
        this mount requires (every block is checked again as it is read back), else from the
        registry. Either way the stream hashes them against the layer digest."""
        cached = self.origin.cached()
        if cached is not None and cached.held_checked():  # checked, never merely stored, whatever --verify
            log.info("%s: streaming the layer from the cache", self.where)
            self._from_cache = cached
            yield _cached_chunks(cached)
            return
        self._from_cache = None
        async with self.origin.open_remote() as response:
            yield self._counted(response.aiter_raw())

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.ctx.stats.bytes_fetched += len(chunk)
            yield chunk

    def _drop_unverified(self) -> None:
        """Blocks derived from a stream that did not check out are never kept, and those
        served (``--verify lazy``) leave the kernel's pages too (the one drop path)."""
        for sink in self._sinks().values():
            if not sink.verified:
                sink.drop()

    async def _copy(self, source: StreamSource, member: Member) -> None:
        reader = self.target(member.path, member.size) if self._collect else self.targets.get(member.path)
        if reader is None:
            log.warning("%s: member %s is not in the manifest's file list; skipped", self.where, member.path)
            return
        sink = reader.sink
        if sink.size != member.size:
            raise ManifestError(f"{self.where}, member {member.path!r}: {member.size} bytes, annotations say {sink.size}")
        self._seen.add(member.path)
        for index in range(sink.nblocks):
            length = sink.block_length(index)
            data = await source.read(length)
            if len(data) != length:
                raise DamagedStreamError(f"{self.where}, member {member.path!r}: stream ended inside the file")
            if not sink.verified:
                self._keep(member.path, sink, index, data)


async def _cached_chunks(sink: ReaderSink) -> AsyncIterator[bytes]:
    """The layer's cached blocks in order, each checked against its stored checksum."""
    for index in range(sink.nblocks):
        try:
            data, _ = await trio.to_thread.run_sync(sink.read_stored, index)
            yield data
        except CacheError as exc:  # damaged (dropped here) or gone: the next pass takes the registry
            sink.damaged(index, exc)
            raise FetchError(f"cached copy of {sink.digest} does not read back whole: {exc}") from None
