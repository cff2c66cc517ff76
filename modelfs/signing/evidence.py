"""Where signatures of a model are found, fetched within bounds (nothing is trusted here).

- ``model.sig`` at the root of the artifact: an OMS signature the Modelfile named (a
  small blob, checked against its layer digest as every blob is);
- referrers of the manifest (the referrers API, or its ``sha256-<hex>`` fallback tag):
  Sigstore bundles (cosign's signatures, or an OMS signature attached later). A Notary
  Project (notation) signature is listed but not read: it does not count;
- cosign's legacy tag ``sha256-<hex>.sig``.

Referrers and the ``.sig`` tag are asked of the registry the reference names, never of a
mirror (a mirror may not carry them; a missing signature would refuse the model).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelfsError, NotFoundError, UnavailableError
from ..formats.spec import parse_descriptor, parse_manifest
from ..index import referrer_entries
from . import simplesigning
from .bounded import MAX_BUNDLE_BYTES, MAX_PAYLOAD_BYTES
from .bundle import MEDIA_TYPES
from .statement import SIGNATURE_FILE, _normal

BUNDLE_ARTIFACT_TYPE = MEDIA_TYPES[0]
NOT_READ = {  # referrer artifact types that are signatures modelfs does not read
    "application/vnd.cncf.notary.signature": "a Notary Project (notation) signature",
    "application/vnd.dev.cosign.artifact.sig.v1+json": "a cosign signature artifact of the pre-bundle format",
}
MAX_REFERRERS = 32  # signature referrers read per model; more (junk pushed to hide one) are left out, and said so


@dataclass(frozen=True)
class Evidence:
    kind: str  # "bundle", "simplesigning", or "unread" (listed, does not count)
    where: str  # for messages: "model.sig in the artifact", "referrer sha256:ab12…", ".sig tag"
    data: bytes = b""
    annotations: dict[str, str] = field(default_factory=dict)
    note: str = ""  # why an "unread" one does not count

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "where": self.where, "data": base64.b64encode(self.data).decode(),
                "annotations": self.annotations}

    @staticmethod
    def from_json(doc: dict[str, Any]) -> Evidence:
        return Evidence(str(doc["kind"]), str(doc["where"]), base64.b64decode(doc["data"]), dict(doc["annotations"]))


def _short(digest: str) -> str:
    return digest[:19] + "…"


# What all the candidates of one model may hold at once: each is capped at MAX_BUNDLE_BYTES, and
# a hostile manifest could list one 16 MiB blob as model.sig thousands of times, or push 32
# referrers of 16 MiB each (512 MiB). Four bundles' worth is room for every real signer.
MAX_CANDIDATE_BYTES = 4 * MAX_BUNDLE_BYTES


class _Budget:
    """The bytes the candidates of one ``gather`` may still take, fetched under that cap."""

    def __init__(self, total: int = MAX_CANDIDATE_BYTES) -> None:
        self.left = total

    async def fetch(self, kind: str, where: str, client: Any, repository: str, digest: str) -> Evidence:
        if self.left <= 0:
            return Evidence("unread", where, note=f"past the {MAX_CANDIDATE_BYTES >> 20} MiB all signatures of a "
                                                  "model may take; not read")
        found = await _fetched(kind, where, client.get_blob(repository, digest, max_size=min(MAX_BUNDLE_BYTES, self.left)))
        self.left -= len(found.data)
        return found


async def gather(client: Any, model: Any) -> list[Evidence]:
    """Every signature candidate of ``model``, within one byte budget for all of them
    (``MAX_CANDIDATE_BYTES``), each blob fetched once. A registry that cannot be reached
    raises (UnavailableError); one candidate that cannot be fetched is an ``unread`` entry
    saying why."""
    repository, digest = model.reference.repository, model.reference.digest or ""
    upstream = client.without_mirrors()  # referrers count only from the registry the reference names
    budget = _Budget()
    found: list[Evidence] = []
    seen: set[str] = set()
    for layer in model.manifest.layers:
        if _normal(layer.filepath or "") == SIGNATURE_FILE:
            where = f"{SIGNATURE_FILE} in the artifact"
            if layer.digest in seen:
                found.append(Evidence("unread", where, note="the same blob named again; read once"))
                continue
            seen.add(layer.digest)
            found.append(await budget.fetch("bundle", where, client, repository, layer.digest))
    entries = await referrer_entries(upstream, repository, digest)
    signatures = [e for e in entries if e.get("artifactType") in MEDIA_TYPES or e.get("artifactType") in NOT_READ]
    for entry in signatures[:MAX_REFERRERS]:
        found.append(await _referrer(upstream, repository, digest, entry, budget))
    if len(signatures) > MAX_REFERRERS:
        found.append(Evidence("unread", f"{len(signatures) - MAX_REFERRERS} more signature referrers",
                              note=f"only the first {MAX_REFERRERS} are read"))
    found.extend(await _legacy(upstream, repository, digest))
    return found


async def _fetched(kind: str, where: str, fetch: Any, annotations: dict[str, str] | None = None) -> Evidence:
    try:
        return Evidence(kind, where, await fetch, annotations or {})
    except UnavailableError:
        raise
    except ModelfsError as exc:
        return Evidence("unread", where, note=f"cannot be fetched: {exc}")


async def _referrer(client: Any, repository: str, subject: str, entry: dict[str, Any], budget: _Budget) -> Evidence:
    where = f"referrer {_short(str(entry.get('digest')))}"
    kind = entry.get("artifactType")
    if kind in NOT_READ:
        return Evidence("unread", where, note=f"{NOT_READ[kind]}: modelfs does not read these, so it does not count")
    try:
        descriptor = parse_descriptor(entry, where)
        data, media_type, _ = await client.get_manifest(repository, descriptor.digest)
        manifest = parse_manifest(data, media_type)
    except UnavailableError:
        raise
    except ModelfsError as exc:
        return Evidence("unread", where, note=f"not a signature: {exc}")
    if manifest.subject is None or manifest.subject.digest != subject:
        return Evidence("unread", where, note="not a signature of this manifest: its subject is another")
    layers = [layer for layer in manifest.layers if layer.media_type in MEDIA_TYPES]
    if len(layers) != 1:
        return Evidence("unread", where, note="a referrer marked as a Sigstore bundle that holds no bundle")
    return await budget.fetch("bundle", where, client, repository, layers[0].digest)


async def _legacy(client: Any, repository: str, digest: str) -> list[Evidence]:
    try:
        data, media_type, _ = await client.get_manifest(repository, simplesigning.tag(digest))
    except NotFoundError:
        return []
    except UnavailableError:
        raise
    except ModelfsError as exc:
        return [Evidence("unread", ".sig tag", note=f"not a signature manifest: {exc}")]
    try:
        manifest = parse_manifest(data, media_type)
    except ModelfsError as exc:
        return [Evidence("unread", ".sig tag", note=f"not a signature manifest: {exc}")]
    layers = [layer for layer in manifest.layers if layer.media_type == simplesigning.LAYER_MEDIA_TYPE]
    found = [await _fetched("simplesigning", f".sig tag, signature {number + 1}",
                            client.get_blob(repository, layer.digest, max_size=MAX_PAYLOAD_BYTES), layer.annotations)
             for number, layer in enumerate(layers[:simplesigning.MAX_LAYERS])]
    return found or [Evidence("unread", ".sig tag", note="holds no simple-signing payload")]
