"""From a reference to a verified model: manifest (through an index if need be) and config."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio

from . import signing
from .errors import ManifestError, NotAModelError, UnavailableError
from .formats import blockindex
from .formats.blockindex import ANNOTATION, TrustedIndex
from .formats.spec import (
    ARTIFACT_TYPE,
    LEGACY_ARTIFACT_TYPE,
    Descriptor,
    Manifest,
    ModelConfig,
    is_index,
    load_json,
    parse_config,
    parse_manifest,
    require_model,
)
from .index import trusted
from .reference import Reference
from .registry import RegistryReader
from .retry import FAIL_FAST, RetryPolicy
from .storage.cache import BlockCache
from .storage.records import ModelRecord, RecordedLayer


@dataclass(frozen=True)
class Model:
    reference: Reference  # with the manifest digest filled in
    manifest: Manifest
    manifest_bytes: bytes
    config: ModelConfig
    config_bytes: bytes
    verdict: Any = None  # signing.Verdict under a signature policy (see fetch_or_cached)


def _pick_from_index(data: bytes, reference: Reference) -> str:
    doc = load_json(data, "index")
    entries = [m for m in doc.get("manifests", []) if isinstance(m, dict) and isinstance(m.get("digest"), str)]
    for entry in entries:
        if entry.get("artifactType") in (ARTIFACT_TYPE, LEGACY_ARTIFACT_TYPE):
            return entry["digest"]
    if any("platform" in e for e in entries):
        raise NotAModelError(f"{reference} is a multi-platform container image, not a ModelPack model")
    if len(entries) == 1:
        return entries[0]["digest"]
    raise ManifestError(f"{reference} is an index of {len(entries)} manifests and none is marked as a model")


async def fetch_model(client: RegistryReader, reference: Reference, retry: RetryPolicy | None = None) -> Model:
    """The model ``reference`` names, from the registry (``retry``: a tighter policy than the
    client's own for its requests)."""
    data, media_type, digest = await client.get_manifest(reference.repository, reference.target, retry=retry)
    if is_index(data):
        digest = _pick_from_index(data, reference)
        data, media_type, digest = await client.get_manifest(reference.repository, digest, retry=retry)
    manifest = parse_manifest(data, media_type)
    require_model(manifest, str(reference))
    config_bytes = await client.get_blob(reference.repository, manifest.config.digest, retry=retry)
    if len(config_bytes) != manifest.config.size:
        raise ManifestError(f"{reference}: config is {len(config_bytes)} bytes, manifest says {manifest.config.size}")
    config = parse_config(config_bytes)
    return Model(reference.with_digest(digest), manifest, data, config, config_bytes)


def record(cache: BlockCache, model: Model, index_bytes: bytes = b"") -> None:
    """Keep the model's manifest, config and the block index its manifest names beside its
    blocks (see :func:`cached_model`)."""
    layers = tuple(RecordedLayer(layer.digest, layer.size, layer.filepath or "") for layer in model.manifest.layers)
    cache.records.add(ModelRecord(str(model.reference.without_digest()), model.reference.digest or "", layers, time.time(),
                                  model.manifest_bytes, model.manifest.media_type, model.config_bytes, index_bytes))


def recorded_index(cache: BlockCache, model: Model) -> bytes | None:
    """The block index recorded with ``model``, if its manifest names it and it matches."""
    recorded = cache.records.newest(str(model.reference.without_digest()), model.reference.digest)
    named = model.manifest.annotations.get(ANNOTATION)
    if not recorded or not named or not recorded.index or not signing.index_allowed(model.verdict, vouched=True):
        return None
    data = recorded.index
    return data if "sha256:" + hashlib.sha256(data).hexdigest() == named else None


def held_whole(cache: BlockCache, model: Model, layers: list[Descriptor] | None = None,
               blocks: Mapping[str, Sequence[int] | None] | None = None) -> bool:
    """Whether every block of every blob of ``model`` (of ``layers`` of it: a view's; of a
    blob, the ``blocks`` a view needs, where given) is cached with the trust a mount of it
    would require: checked whole with its blob, or matched against the block index its
    manifest names (never against some other index that happens to be recorded)."""
    data = recorded_index(cache, model)
    index = blockindex.decode(data) if data else None
    for layer in model.manifest.layers if layers is None else layers:
        entry = cache.entry(layer.digest, layer.size)
        expected = index.for_blob(layer.digest, entry.block_size) if index else None
        if expected is not None and len(expected) != entry.nblocks:
            expected = None
        wanted = (blocks or {}).get(layer.digest)
        if not all(entry.trusted(i, expected[i] if expected else None)
                   for i in (range(entry.nblocks) if wanted is None else wanted)):
            return False
    return True


def cached_model(cache: BlockCache, reference: Reference) -> tuple[Model, float] | None:
    """The model last recorded for ``reference`` and when, for mounting while the registry
    is unreachable. Manifest and config are checked against their digests before use."""
    recorded = cache.records.newest(str(reference.without_digest()), reference.digest)
    if recorded is None:
        return None
    data, config_bytes = recorded.manifest, recorded.config
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if digest != recorded.digest:
        raise ManifestError(f"the cached manifest of {reference} does not match its digest; mount it once online")
    manifest = parse_manifest(data, recorded.media_type or None)
    require_model(manifest, str(reference))
    if "sha256:" + hashlib.sha256(config_bytes).hexdigest() != manifest.config.digest:
        raise ManifestError(f"the cached config of {reference} does not match its digest; mount it once online")
    model = Model(reference.with_digest(digest), manifest, data, parse_config(config_bytes), config_bytes)
    return model, recorded.recorded or 0.0


async def fetch_or_cached(client: RegistryReader, cache: BlockCache | None, reference: Reference, *,
                          trust: signing.Policy) -> tuple[Model, str | None]:
    """The model from the registry, or, while the registry cannot be reached, as recorded in
    the cache at the last pull or mount (checked against its digests). The second value says
    why, when it is the cached copy; every command that only reads takes this one path.

    Its signatures are checked here under ``trust`` (the signature policy; every caller must
    name one, ``signing.OFF`` included), before anything of it is served or kept: a model
    that does not meet an ``enforce`` policy raises SignatureError. The verdict rides along
    on the model.

    With a recorded copy to fall back on, a registry that refuses connections or a host name
    that does not resolve is taken at its word at once (no minute of retries before a mount
    during an outage serves what it has); slow or failing answers are still retried."""
    model, offline = await _fetch_or_cached(client, cache, reference)
    verdict = await signing.check(client, cache.root if cache is not None else None, model, trust, offline is not None)
    return replace(model, verdict=verdict), offline


async def _fetch_or_cached(client: RegistryReader, cache: BlockCache | None, reference: Reference
                           ) -> tuple[Model, str | None]:
    recorded = cache is not None and cache.records.newest(str(reference.without_digest()), reference.digest) is not None
    try:
        return await fetch_model(client, reference, FAIL_FAST if recorded else None), None
    except UnavailableError as exc:
        cached = cached_model(cache, reference) if cache is not None else None
        if cached is None:
            raise
        model, when_recorded = cached
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when_recorded))
        return model, f"{exc}; using {reference} as cached on {when} ({model.reference.digest})"


async def trusted_index(client: RegistryReader, model: Model) -> TrustedIndex | None:
    """The block index reads of ``model`` may be checked against, under its signature verdict."""
    index = await trusted(client, model.reference.repository, model.manifest, model.reference.digest or "")
    return signing.gate_index(model.verdict, index)


async def check_layer_sizes(client: RegistryReader, model: Model) -> None:
    """HEAD every layer: a manifest that lies about a size is refused before anything is
    served (one small request per layer, all at once)."""
    problems: list[str] = []

    async def check(number: int, layer) -> None:
        size = await client.blob_size(model.reference.repository, layer.digest)
        upstream = client.without_mirrors()
        if (size is None or size >= 0 and size != layer.size) and upstream is not client:
            # a mirror's answer (untrusted by design, README "Trust") is no verdict on the
            # manifest: it is left out a while, and the registry itself asked
            client.suspect(f"the size of blob {layer.digest}")
            size = await upstream.blob_size(model.reference.repository, layer.digest)
        where = f"layer {number} ({layer.filepath or layer.digest})"
        if size is None:
            problems.append(f"{where}: blob {layer.digest} is missing from the registry")
        elif size >= 0 and size != layer.size:
            problems.append(f"{where}: manifest says {layer.size} bytes, the registry has {size}")

    async with trio.open_nursery() as nursery:
        for number, layer in enumerate(model.manifest.layers):
            nursery.start_soon(check, number, layer)
    if problems:
        raise ManifestError(f"{model.reference}: {sorted(problems)[0]}")


def describe(model: Model) -> dict:
    """The ``inspect --json`` document."""
    return {"reference": str(model.reference), "digest": model.reference.digest,
            "manifest": json.loads(model.manifest_bytes), "config": json.loads(model.config_bytes)}
