"""``modelfs push``: upload an artifact from the local store.

Blobs the registry already has (HEAD) are skipped, so re-pushing a model whose only change
is config.json uploads that layer, the config and the manifest. Blobs present in another
repository of the same registry that this store also pushed to are cross-mounted instead
of uploaded. Large blobs go up in chunks; every byte is streamed from disk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from ..formats import blockindex
from ..formats.spec import Descriptor, parse_manifest
from ..index import attach
from ..reference import Reference, parse
from ..registry import RegistryClient
from .layout import Store

log = logging.getLogger(__name__)

CHUNK_SIZE = 512 << 20  # blobs larger than this go up as PATCHes of this size
READ_SIZE = 1 << 20


@dataclass
class PushResult:
    digest: str
    uploaded_bytes: int = 0
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    chunked: int = 0  # blobs uploaded in chunks
    block_index: str | None = None  # digest of the block-index referrer


def _file_chunks(path: str, piece: int, progress: Callable[[int], None] | None = None
                 ) -> Callable[[], AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        handle = await trio.open_file(path, "rb")
        async with handle:
            while data := await handle.read(piece):
                yield data
                if progress is not None:
                    progress(len(data))
    return chunks


def _mount_sources(store: Store, reference: Reference) -> list[str]:
    sources = []
    for name in store.references():
        try:
            other = parse(name)
        except Exception:
            continue
        if other.registry == reference.registry and other.repository != reference.repository:
            sources.append(other.repository)
    return sorted(set(sources))


async def _push_blob(client: RegistryClient, store: Store, reference: Reference, blob: Descriptor,
                     sources: list[str], result: PushResult, limiter: trio.CapacityLimiter, chunk_size: int,
                     progress: Callable[[int], None] | None, skipped: Callable[[int], None] | None) -> None:
    async with limiter:
        repo = reference.repository
        if await client.blob_size(repo, blob.digest) is not None:
            result.skipped.append(blob.digest)
            if skipped is not None:
                skipped(blob.size)
            return
        for source in sources:
            if await client.mount_blob(repo, blob.digest, source):
                result.mounted.append(blob.digest)
                if skipped is not None:
                    skipped(blob.size)
                return
        chunked = blob.size > chunk_size
        path = store.blob_path(blob.digest)
        await client.upload_blob(repo, blob.digest, blob.size,
                                 _file_chunks(path, chunk_size if chunked else READ_SIZE, progress), chunked=chunked)
        result.uploaded.append(blob.digest)
        result.chunked += chunked
        result.uploaded_bytes += blob.size
        log.info("uploaded %s (%d bytes)", blob.digest, blob.size)


def push_size(store: Store, reference: Reference, source_name: str | None = None) -> int:
    """Bytes of the blobs a push of this model considers (for a progress bar)."""
    manifest = parse_manifest(store.read_blob(store.resolve(source_name or str(reference)).digest))
    return sum({blob.digest: blob.size for blob in [manifest.config, *manifest.layers]}.values())


async def push(client: RegistryClient, store: Store, reference: Reference, source_name: str | None = None,
               parallel: int = 4, chunk_size: int = CHUNK_SIZE, block_index: bool = True,
               progress: Callable[[int], None] | None = None, skipped: Callable[[int], None] | None = None
               ) -> PushResult:
    stored = store.resolve(source_name or str(reference))
    data = store.read_blob(stored.digest)
    manifest = parse_manifest(data)
    result = PushResult(stored.digest)
    sources = _mount_sources(store, reference)
    limiter = trio.CapacityLimiter(parallel)
    unique = {blob.digest: blob for blob in [manifest.config, *manifest.layers]}
    named_index = manifest.annotations.get(blockindex.ANNOTATION)
    if block_index and named_index and store.has_blob(named_index):
        unique[named_index] = Descriptor(blockindex.ARTIFACT_TYPE, named_index, os.path.getsize(store.blob_path(named_index)))
    async with trio.open_nursery() as nursery:
        for blob in unique.values():
            nursery.start_soon(_push_blob, client, store, reference, blob, sources[:3], result, limiter, chunk_size,
                               progress if blob.digest != named_index else None,
                               skipped if blob.digest != named_index else None)
    await client.put_manifest(reference.repository, reference.tag or stored.digest, data, manifest.media_type)
    if block_index and named_index in unique:
        # also a referrer: generic tools see it, and registry garbage collection keeps the blob
        subject = Descriptor(manifest.media_type, stored.digest, len(data), artifact_type=manifest.artifact_type)
        result.block_index = await attach(client, reference.repository, subject, store.read_blob(named_index))
    return result
