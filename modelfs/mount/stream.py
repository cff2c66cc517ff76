"""Compressed tar layers (tar+gzip, tar+zstd): streamed once, served as their bytes arrive.

A compressed blob has no random access, so the first read of any file in it starts one
GET of the whole blob. Its bytes are hashed (the layer digest) and decompressed on the fly,
the tar stream is walked with the same rules as every other tar here, and each member's
blocks go into a cache entry of its own ("derived", keyed by layer digest and path) the
moment they are decompressed, waking the readers waiting on them. When the stream ends the
layer digest is checked: a mismatch drops every derived block, a match marks them verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ..errors import TRANSIENT, CacheError, FetchError, IntegrityError, ManifestError
from ..formats.spec import Descriptor, Packing
from ..formats.tarindex import REGULAR, Member, iter_members
from ..formats.zstd import ZstdDecompressor, ZstdError
from ..registry import single_attempt
from ..storage.claims import POLL_SECONDS, PeerClaims, peer_wait
from ..storage.store import REPLACED_ROUNDS, FilesReplaced
from .blobreader import BlobReader
from .fetcher import Fetcher

log = logging.getLogger(__name__)

_WINDOW = 4 << 20  # decompress at most this much per step (a gzip bomb cannot balloon memory)


def derived_key(layer_digest: str, path: str) -> str:
    """Cache key of a member unpacked from a compressed layer."""
    return "sha256:" + hashlib.sha256(f"{layer_digest}\0{path}".encode()).hexdigest()


class _Decompressor:
    """gzip or zstd, incremental, at most _WINDOW bytes out per step (a few KiB of hostile
    input cannot balloon memory). Concatenated gzip members and zstd frames form one stream
    (pigz, pzstd and Go's writers may produce several; Go's readers, like modctl's and
    containerd's, read across them): a finished member with bytes after it starts the next."""

    def __init__(self, packing: Packing) -> None:
        self._gzip = packing is Packing.TAR_GZIP
        self._obj = self._new()
        self._next = b""  # input past the end of the member or frame just finished

    def _new(self):
        return zlib.decompressobj(wbits=47) if self._gzip else ZstdDecompressor()

    def feed(self, data: bytes) -> bytes:
        if self._obj.eof:
            self._obj = self._new()
        out = self._obj.decompress(data, _WINDOW)
        if self._obj.eof:
            self._next = self._obj.unused_data
        return out

    def step(self) -> bytes | None:
        """More output from input already given, or None when more input is needed."""
        if self._next:
            data, self._next = self._next, b""
            return self.feed(data)
        if self._obj.eof:
            return None
        if self._gzip:  # input held back by the window, or output zlib still holds
            out = self.feed(self._obj.unconsumed_tail)
        elif not self._obj.needs_input:
            out = self.feed(b"")
        else:
            return None
        return out or None

    @property
    def finished(self) -> bool:
        """The input ended at the end of a member or frame, not inside one."""
        return self._obj.eof and not self._next


class StallGuard:
    """A cancel scope for one response that fires when less than ``quantum`` bytes arrived
    in ``seconds``: a server that trickles (a few KB/s never trips a read timeout) cannot hold
    a fetch slot for hours."""

    def __init__(self, seconds: float, quantum: int = 1 << 20) -> None:
        self.seconds, self.quantum = seconds, quantum
        self.scope = trio.CancelScope(deadline=trio.current_time() + seconds)
        self._fed = 0

    def fed(self, size: int) -> None:
        self._fed += size
        if self._fed >= self.quantum:
            self._fed = 0
            self.scope.deadline = trio.current_time() + self.seconds

    @property
    def fired(self) -> bool:
        return self.scope.cancelled_caught


class StreamSource:
    """A sequential tar source over a compressed HTTP body (see ``tarindex.TarSource``)."""

    def __init__(self, chunks: AsyncIterator[bytes], packing: Packing, where: str) -> None:
        self._chunks = chunks
        self._where = where
        self._decompressor = _Decompressor(packing)
        self._buffer = bytearray()
        self._eof = False
        self._input_done = False
        self.offset = 0
        self.hasher = hashlib.sha256()
        self.compressed_bytes = 0
        self.on_progress: Callable[[int], None] | None = None  # told how many compressed bytes arrived

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size and not self._eof:
            out = self._step()
            if out is not None:
                self._buffer += out
                continue
            if self._input_done:
                self._eof = True
                if not self._decompressor.finished:
                    raise ManifestError(f"{self._where}: compressed stream ends early, at byte {self.compressed_bytes} "
                                        "(truncated blob?)")
                return
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._input_done = True
                continue
            self.hasher.update(chunk)
            self.compressed_bytes += len(chunk)
            if self.on_progress is not None:
                self.on_progress(len(chunk))
            self._buffer += self._feed(chunk)

    def _step(self) -> bytes | None:
        try:
            return self._decompressor.step()
        except (zlib.error, ZstdError) as exc:
            raise ManifestError(f"{self._where}: corrupt compressed stream at byte {self.compressed_bytes}: {exc}") from None

    def _feed(self, data: bytes) -> bytes:
        try:
            return self._decompressor.feed(data)
        except (zlib.error, ZstdError) as exc:
            raise ManifestError(f"{self._where}: corrupt compressed stream at byte {self.compressed_bytes}: {exc}") from None

    async def read(self, size: int) -> bytes:
        await self._fill(size)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.offset += len(data)
        return data

    async def skip_to(self, offset: int) -> None:
        while self.offset < offset:
            if not await self.read(min(offset - self.offset, _WINDOW)):
                return

    async def drain(self) -> None:
        """Consume the rest so the whole blob is hashed."""
        while not self._eof:
            self._buffer.clear()
            await self._fill(_WINDOW)
        self._buffer.clear()


class LayerStream:
    """The block source of every file in one compressed layer (see
    :class:`~.blobreader.BlockSource`): a reader of any of them starts one pass over the
    layer, which fills them all, and checks the layer digest itself (``checks_whole``).

    Each file's blocks go into a cache entry of its own ("derived", keyed by layer digest and
    path), served once the layer matched its digest (or as they arrive, with ``--verify lazy``).

    - **Where the layer's bytes come from**: the cache, when it holds the compressed blob
      whole with the trust this mount requires (``pull`` stores it), else the registry. So a
      model pulled once mounts offline, and its first mount downloads nothing again.
    - **Other processes** (two mounts of one model): the process streaming a layer holds a
      claim on it (:class:`_LayerClaim`); another waits while that stream makes progress, then
      finds the files checked in the cache. No pass clears what another may be filling: a
      block already stored is kept if equal to ours (:meth:`BlobReader.store`).
    - **Files replaced under the check** (``cache prune``): the pass starts again, bounded by
      ``REPLACED_ROUNDS``, without failing the readers waiting for it.
    """

    checks_whole = True

    def __init__(self, fetcher: Fetcher, layer: Descriptor, packing: Packing, where: str) -> None:
        self.fetcher, self.layer, self.packing, self.where = fetcher, layer, packing, where
        self.targets: dict[str, BlobReader] = {}
        self._checks: dict[str, dict[int, int]] = {}  # checksum of each block this pass stored, per file
        self._files: dict[str, tuple[int, int]] = {}  # the files each target's blocks went into this pass
        self._seen: set[str] = set()  # files the layer held, this pass
        self._from_cache: BlobReader | None = None  # the layer's cached copy this pass reads, if any
        self._running = False
        self._collect = False

    def target(self, path: str, size: int) -> BlobReader:
        reader = self.targets.get(path)
        if reader is None:
            entry = self.fetcher.cache.entry(derived_key(self.layer.digest, path), size)
            reader = self.targets[path] = BlobReader(self.fetcher, entry, self)
            self._checks[path] = {}
        return reader

    def schedule(self, reader: BlobReader, blocks: list[int], for_reader: bool = True) -> None:
        if not reader.whole_mode:
            reader.claim(blocks)  # lazy: readers wait per block, served as they arrive
        self.ensure_running()

    def ensure_running(self) -> None:
        if not self._running:
            self._running = True
            self._begin_pass()
            self.fetcher.spawn(self._run_logged)

    def _begin_pass(self) -> None:
        """A new pass: every block it stores is recorded with its checksum. Nothing is cleared:
        another process may be filling the same files (a block already there is kept if it
        equals ours)."""
        for path, reader in self.targets.items():
            reader.begin_pass()
            self._checks[path] = {}
        self._files.clear()
        self._seen.clear()

    def _keep(self, path: str, reader: BlobReader, index: int, data: bytes) -> None:
        try:
            if path not in self._files:
                self._files[path] = reader.entry.files_id()
            check = reader.store(index, data)
            if check is not None:
                self._checks[path][index] = check
        except CacheError as exc:
            self.fetcher.cache_write_failed(exc)
        if reader.trust.serves_unchecked:
            reader.deliver(index, data, fetched=False)
        reader.tick()

    async def collect(self) -> list[Member]:
        """Stream the layer now, creating a target per file (layers without file metadata)."""
        self._collect, self._running = True, True
        try:
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
                except TRANSIENT as exc:
                    failure = exc
                    attempt += 1
                    if not await self.fetcher.retry_or_give_up(attempt, exc, self.where):
                        break
                self._begin_pass()
            self.fetcher.stats.errors += 1
            log.error("%s", failure if str(failure).startswith(self.where) else f"{self.where}: {failure}")
        except Exception as exc:  # a bug: fail these reads, keep the daemon
            failure = exc
            log.exception("%s: unexpected error streaming the layer", self.where)
        finally:
            self._running = False
            for path, reader in self.targets.items():
                reader.end_pass(failure or self._not_kept(path, reader))

    def _not_kept(self, path: str, reader: BlobReader) -> BaseException | None:
        """Why a file of a layer that checked out is not servable now, or None: it is, or it
        was stored whole and replaced since (the reader looks again, and a new pass starts)."""
        if reader.entry.verified:
            return None
        if path not in self._seen:
            return ManifestError(f"{self.where}: the layer holds no file {path!r} of {reader.size} bytes")
        if reader.trust.serves_unchecked:
            return None
        if len(self._checks[path]) < reader.entry.nblocks:
            return CacheError(f"{self.where}: the cache could not keep every block of {path!r} (is its disk full?); "
                              "a compressed layer is served only once kept and checked")
        return None

    async def _stream_once(self) -> None:
        """One pass, unless another process is streaming the layer: then wait for it while it
        makes progress, and stream here only if it stops or fails."""
        with contextlib.closing(_LayerClaim(self.fetcher.cache.claims_path(self.layer.digest))) as claim:
            if not claim.take():
                if await self._follow_peer(claim):
                    return
                claim.take()  # the peer let go, failed or stalled: stream here, holding it if we can
            await self._run()

    async def _follow_peer(self, claim: _LayerClaim) -> bool:
        """Wait while another process streams this layer and stores blocks; True once every
        file is checked in the cache (nothing to fetch here). False when it stored nothing
        for a while (frozen, or slower than we would be) or let go with files unchecked."""
        patience = peer_wait(self.fetcher.policy.timeout)
        stored, last = -1, trio.current_time()
        while claim.peer_holds():
            now_stored = await trio.to_thread.run_sync(self._reload_targets)
            if now_stored != stored:
                stored, last = now_stored, trio.current_time()
                self._wake_readers()
            elif trio.current_time() - last > patience:
                log.info("%s: another process streaming it stored nothing for %gs; streaming it here too",
                         self.where, patience)
                return False
            await trio.sleep(POLL_SECONDS)
        await trio.to_thread.run_sync(self._reload_targets)
        self._wake_readers()
        done = all(reader.entry.verified for reader in self.targets.values())
        if done:
            log.info("%s: another process streamed it; its files are checked in the cache", self.where)
        return done

    def _reload_targets(self) -> int:
        """Re-read every target's map (on a worker thread); returns how many blocks are stored."""
        stored = 0
        for reader in self.targets.values():
            reader.entry.reload()
            stored += sum(1 for i in range(reader.entry.nblocks) if reader.entry.entry_at(i).present)
        return stored

    def _wake_readers(self) -> None:
        """Progress seen in the cache: a lazy reader gets the blocks that are there, a reader
        waiting for the whole layer a later deadline."""
        for reader in self.targets.values():
            if reader.trust.serves_unchecked:
                for index in range(reader.entry.nblocks):
                    if reader.in_flight(index) and reader.entry.entry_at(index).present:
                        reader.arrived(index, 0, False)
            reader.tick()

    async def _run(self) -> list[Member]:
        members: list[Member] = []
        try:
            guard = StallGuard(self.fetcher.policy.timeout)
            with guard.scope, single_attempt():  # _run_logged retries, by the one policy
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
                self.fetcher.wrong_bytes(f"layer {self.layer.digest}")
                self._drop_unverified()
                if self._from_cache is not None:  # cannot be, checked as it was: never read it again
                    self._from_cache.drop()
                raise IntegrityError(f"{self.where}: blob does not match its digest; its files were dropped from the cache")
            for path, reader in self.targets.items():
                reader.fail_pending(ManifestError(f"{self.where}: the layer holds no such file"))
                await self._mark_checked(path, reader)
            return members
        except BaseException:
            self._drop_unverified()
            raise

    async def _mark_checked(self, path: str, reader: BlobReader) -> None:
        """The layer matched its digest: the blocks this pass stored for ``path`` are checked.
        Files replaced meanwhile lost them: :class:`FilesReplaced` (the pass starts again)."""
        entry = reader.entry
        if path not in self._seen or entry.verified or len(self._checks[path]) < entry.nblocks:
            return  # not in the layer, already checked, or not kept (said at the end of the pass)
        replaced = await trio.to_thread.run_sync(entry.files_id) != self._files.get(path)
        if replaced or not await trio.to_thread.run_sync(entry.mark_whole, self._checks[path]):
            raise FilesReplaced(f"{self.where}: the cache files of {path!r} were replaced while the layer was checked")

    @asynccontextmanager
    async def _open_layer(self) -> AsyncIterator[AsyncIterator[bytes]]:
        """The layer's compressed bytes: from the cache where it holds them with the trust
        this mount requires (every block is checked again as it is read back), else from the
        registry. Either way the stream hashes them against the layer digest."""
        cached = self._cached_layer()
        if cached is not None:
            log.info("%s: streaming the layer from the cache", self.where)
            self._from_cache = cached
            yield self._cached_chunks(cached)
            return
        self._from_cache = None
        async with self.fetcher.client.stream_blob(self.fetcher.repository, self.layer.digest) as response:
            yield self._counted(response.aiter_raw())

    def _cached_layer(self) -> BlobReader | None:
        """The layer's own reader, if the cache holds every block of it checked (whole, or
        against the index this mount trusts; never merely stored, whatever ``--verify``)."""
        if not self.fetcher.cache.holds(self.layer.digest):
            return None
        reader = self.fetcher.reader(self.layer.digest, self.layer.size)
        expected = reader.expected
        checked = all(reader.entry.trusted(i, expected[i] if expected else None) for i in range(reader.entry.nblocks))
        return reader if checked else None

    @staticmethod
    async def _cached_chunks(reader: BlobReader) -> AsyncIterator[bytes]:
        for index in range(reader.entry.nblocks):
            try:
                yield await trio.to_thread.run_sync(reader.entry.read_block, index)
            except CacheError as exc:  # damaged (dropped here) or gone: the next pass takes the registry
                reader.damaged(index, exc)
                raise FetchError(f"cached copy of {reader.digest} does not read back whole: {exc}") from None

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.fetcher.stats.bytes_fetched += len(chunk)
            yield chunk

    def _drop_unverified(self) -> None:
        """Blocks derived from a stream that did not check out are never kept, and those
        served (``--verify lazy``) leave the kernel's pages too (:meth:`BlobReader.drop`)."""
        for reader in self.targets.values():
            if not reader.entry.verified:
                reader.drop()

    async def _copy(self, source: StreamSource, member: Member) -> None:
        reader = self.target(member.path, member.size) if self._collect else self.targets.get(member.path)
        if reader is None:
            log.warning("%s: member %s is not in the manifest's file list; skipped", self.where, member.path)
            return
        if reader.size != member.size:
            raise ManifestError(f"{self.where}, member {member.path!r}: {member.size} bytes, annotations say {reader.size}")
        self._seen.add(member.path)
        for index in range(reader.entry.nblocks):
            length = reader.entry.block_length(index)
            data = await source.read(length)
            if len(data) != length:
                raise ManifestError(f"{self.where}, member {member.path!r}: stream ended inside the file")
            if not reader.entry.verified:
                self._keep(member.path, reader, index, data)


# The byte of a layer's .claims file that the process streaming the layer holds: past any
# block number, so it never meets the per-block claims of a range fetch of the same blob.
STREAM_CLAIM = 1 << 40


class _LayerClaim:
    """The claim of the process streaming one compressed layer (see claims.py: an OFD lock,
    gone with the process that held it). Without a claims file, every process streams."""

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
