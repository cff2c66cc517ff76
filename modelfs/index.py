"""The block index at the registry: the one a mount may trust, and attaching one.

The format is :mod:`modelfs.formats.blockindex`. A mount that trusts an index checks each block
as it arrives, before it is cached or served. Trust flows from the digest the user resolved,
never from who served the bytes:

- **vouched**: ``modelfs build`` names the index blob's digest in a manifest annotation
  (``ANNOTATION``). The manifest's digest covers it, so the index may come from any source,
  a mirror included (it is checked against that digest), and a blob whose blocks all match
  it needs no second, whole-blob hash.
- **attached**: an index pushed later as an OCI referrer (``modelfs index attach`` for
  artifacts built by other tools) is looked up from the registry the reference names, never
  from a mirror or pull-through cache, and each blob is still checked whole once complete;
  a blob that fails stops the mount trusting it.

Referrers are found with the referrers API or, on registries without it (Distribution 2.8),
the OCI fallback tag ``sha256-<hex>``, which we create or extend. :func:`attach` pushes any
referrer (signature bundles too, :mod:`modelfs.signing.sign`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import blake3

from .errors import IntegrityError, ManifestError, ModelfsError, NotFoundError
from .formats.blockindex import (
    ANNOTATION,
    ARTIFACT_TYPE,
    ARTIFACT_TYPES,
    EMPTY,
    EMPTY_MEDIA_TYPE,
    MAX_INDEX_BYTES,
    BlockIndex,
    TrustedIndex,
    decode,
    encode,
    fallback_tag,
    indexable,
    referrer_manifest,
)
from .formats.spec import OCI_INDEX, OCI_MANIFEST, Descriptor, Manifest, load_json, parse_descriptor, parse_manifest
from .registry import RegistryReader
from .retry import BRIEF_RETRY, RetryPolicy

log = logging.getLogger(__name__)


async def attach(client, repository: str, subject: Descriptor, index_bytes: bytes, artifact_type: str = ARTIFACT_TYPE,
                 annotations: dict[str, str] | None = None, replaces: tuple[str, ...] = ARTIFACT_TYPES) -> str:
    """Push ``index_bytes`` (the block index, or another blob of ``artifact_type``, like a
    signature bundle) as a referrer of ``subject``; returns the referrer manifest digest. In
    the fallback tag's index, entries of the ``replaces`` types give way to it."""
    blobs = {}
    for data, media_type in ((EMPTY, EMPTY_MEDIA_TYPE), (index_bytes, artifact_type)):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if await client.blob_size(repository, digest) is None:
            await client.upload_blob(repository, digest, len(data), lambda d=data: d)
        blobs[media_type] = Descriptor(media_type, digest, len(data))
    manifest = referrer_manifest(subject, blobs[artifact_type], blobs[EMPTY_MEDIA_TYPE], artifact_type, annotations)
    data = manifest.to_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await client.put_manifest(repository, digest, data, OCI_MANIFEST)
    if await client.referrers(repository, subject.digest) is None:
        await _extend_fallback_index(client, repository, subject.digest,
                                     Descriptor(OCI_MANIFEST, digest, len(data), dict(annotations or {}),
                                                artifact_type=artifact_type), replaces)
    return digest


@dataclass(frozen=True)
class AttachResult:
    digest: str  # of the referrer manifest
    blobs: int
    bytes: int


async def _hash_remote_blob(client, repository: str, layer: Descriptor, block_size: int) -> list[str]:
    """Stream a blob once: the BLAKE3 of each block, checked against the blob's digest
    before any of it is trusted."""
    whole, block, hashes, size, fill = hashlib.sha256(), blake3.blake3(), [], 0, 0
    async with client.stream_blob(repository, layer.digest) as response:
        async for chunk in response.aiter_raw():
            whole.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                take = min(len(view), block_size - fill)
                block.update(view[:take])
                fill += take
                view = view[take:]
                if fill == block_size:
                    hashes.append(block.hexdigest())
                    block, fill = blake3.blake3(), 0
    if fill:
        hashes.append(block.hexdigest())
    if size != layer.size or "sha256:" + whole.hexdigest() != layer.digest:
        raise IntegrityError(f"blob {layer.digest} does not match its digest ({size} bytes); no index attached")
    return hashes


async def attach_for_model(client, model, block_size: int = 1 << 20) -> AttachResult:
    """``modelfs index attach``: make an artifact built by another tool lazy *and* verified.
    Mounts trust such an index only from the registry itself, and still check each blob
    whole once complete (it is not named by the manifest)."""
    repository = model.reference.repository
    layers = {layer.digest: layer for layer in model.manifest.layers if indexable(layer.media_type)}
    hashes = {digest: await _hash_remote_blob(client, repository, layer, block_size) for digest, layer in layers.items()}
    subject = Descriptor(model.manifest.media_type, model.reference.digest, len(model.manifest_bytes),
                         artifact_type=model.manifest.artifact_type)
    digest = await attach(client, repository, subject, encode(block_size, hashes, "blake3"))
    return AttachResult(digest, len(hashes), sum(layer.size for layer in layers.values()))


async def _extend_fallback_index(client, repository: str, subject_digest: str, entry: Descriptor,
                                 replaces: tuple[str, ...] = ARTIFACT_TYPES) -> None:
    tag = fallback_tag(subject_digest)
    try:
        existing, _, _ = await client.get_manifest(repository, tag)
        doc = load_json(existing, "referrers index")
    except NotFoundError:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    manifests = [m for m in doc.get("manifests", []) if m.get("artifactType") not in replaces
                 and m.get("digest") != entry.digest]
    manifests.append(entry.to_json())
    doc["manifests"] = manifests
    await client.put_manifest(repository, tag, json.dumps(doc, separators=(",", ":")).encode(), OCI_INDEX)


async def trusted(client: RegistryReader, repository: str, manifest: Manifest, manifest_digest: str) -> TrustedIndex | None:
    """The block index this mount may check blocks against, or None (blobs then are served
    only once checked whole). See the module docstring for what counts."""
    named = manifest.annotations.get(ANNOTATION)
    if named:
        try:
            data = await client.get_blob(repository, named, max_size=MAX_INDEX_BYTES, retry=BRIEF_RETRY)
            return TrustedIndex(decode(data), vouched=True, data=data)
        except ModelfsError as exc:
            log.warning("the manifest names block index %s but it cannot be used: %s (blobs are served once "
                        "checked whole)", named, exc)
            return None
    found = await fetch(client.without_mirrors(), repository, manifest_digest)  # never a mirror's word for it
    return TrustedIndex(found, vouched=False) if found is not None else None


async def fetch(client, repository: str, subject_digest: str) -> BlockIndex | None:
    """The block index attached to a model, or None (older pushes, other tools, or a source
    that cannot say within two tries: optional data, asked with ``BRIEF_RETRY``)."""
    return await _fetch(client, repository, subject_digest, BRIEF_RETRY)


async def referrer_entries(client, repository: str, subject_digest: str,
                           retry: RetryPolicy | None = None) -> list[dict]:
    """The descriptors of every referrer of ``subject_digest``: from the referrers API, or on
    registries without it from the fallback tag (empty when there is neither)."""
    listing = await client.referrers(repository, subject_digest, retry=retry)
    if listing is None:
        try:
            listing, _, _ = await client.get_manifest(repository, fallback_tag(subject_digest), retry=retry)
        except NotFoundError:
            return []
    doc = load_json(listing, "referrers index")
    manifests = doc.get("manifests", []) if isinstance(doc, dict) else []
    return [m for m in manifests if isinstance(m, dict)] if isinstance(manifests, list) else []


async def _fetch(client, repository: str, subject_digest: str, retry: RetryPolicy) -> BlockIndex | None:
    try:
        entries = [m for m in await referrer_entries(client, repository, subject_digest, retry)
                   if m.get("artifactType") in ARTIFACT_TYPES]
        if not entries:
            return None
        referrer = parse_descriptor(entries[-1], "block index referrer")
        data, media_type, _ = await client.get_manifest(repository, referrer.digest, retry=retry)
        manifest = parse_manifest(data, media_type)
        if manifest.subject is None or manifest.subject.digest != subject_digest or not manifest.layers:
            raise ManifestError("block index referrer does not point at this model")
        layer = manifest.layers[0]
        return decode(await client.get_blob(repository, layer.digest, max_size=MAX_INDEX_BYTES, retry=retry))
    except ModelfsError as exc:
        log.warning("ignoring the block index of %s: %s (blocks are verified when blobs complete)", subject_digest, exc)
        return None
