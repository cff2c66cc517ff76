"""What a verified signature vouches for: the manifest digest, or the model's files.

- cosign's image signature (predicate ``https://sigstore.dev/cosign/sign/v1``, what
  ``cosign sign`` v3 and ``modelfs sign`` make) and a message signature of the manifest
  vouch for the manifest digest, hence for every byte of the artifact.
- An OMS model signature (``https://model_signing/signature/v1.0``, made by
  ``model_signing sign``) lists each file's digest. A raw ModelPack layer *is* its file, so
  a file listed with its sha256 is vouched for when that equals the layer's digest: no byte
  of the weights is read. A one-shard ``shards`` entry spanning the whole file is the same
  hash. Files hashed otherwise (blake2, several shards) or packed in a tar layer would need
  their bytes hashed as they are served; modelfs does not do that yet, so such a file counts
  as not covered (an ``enforce`` policy then refuses the model, saying which file).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from ..formats.spec import Manifest, Packing, classify_layer
from .bounded import MAX_RESOURCES, Malformed

STATEMENT_TYPES = ("https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1")
COSIGN_SIGN = "https://sigstore.dev/cosign/sign/v1"
OMS_V1 = "https://model_signing/signature/v1.0"
OMS_COMPAT = "https://model_signing/Digests/v0.1"
SIGNATURE_FILE = "model.sig"  # model_signing's default output, named by the Modelfile
_SHARD = re.compile(r"(.+):(\d+):(\d+)")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Coverage:
    """What one statement says about this artifact."""

    covers_manifest: bool = False
    files_signed: int = 0  # files the statement lists
    uncovered: list[str] = field(default_factory=list)  # files of the artifact it does not vouch for, with why
    contradictions: list[str] = field(default_factory=list)  # where it disagrees with the artifact


def load_statement(payload: bytes, what: str) -> dict[str, Any]:
    from .bounded import load
    doc = load(payload, f"{what}: statement")
    if doc.get("_type") not in STATEMENT_TYPES:
        raise Malformed(f"{what}: not an in-toto statement")
    if not isinstance(doc.get("predicateType"), str) or not isinstance(doc.get("subject"), list):
        raise Malformed(f"{what}: statement has no predicateType or subject list")
    return doc


def subject_digests(statement: dict[str, Any]) -> list[str]:
    return ["sha256:" + s["digest"]["sha256"] for s in statement["subject"][:64]
            if isinstance(s, dict) and isinstance(s.get("digest"), dict) and isinstance(s["digest"].get("sha256"), str)]


def evaluate(statement: dict[str, Any], manifest: Manifest, manifest_digest: str, what: str) -> Coverage:
    """What ``statement`` vouches for in this artifact; Malformed if it is no signature we read."""
    kind = statement["predicateType"]
    if kind == COSIGN_SIGN:
        digests = subject_digests(statement)
        if manifest_digest in digests:
            return Coverage(covers_manifest=True)
        shown = digests[0][:19] + "…" if digests else "nothing"
        raise Malformed(f"{what} signs {shown}, not this manifest ({manifest_digest[:19]}…): a signature of "
                        "another artifact")
    if kind in (OMS_V1, OMS_COMPAT):
        return _files(_oms_resources(statement, kind, what), manifest, what)
    raise Malformed(f"{what} is an attestation of type {kind[:80]!r}, not a signature modelfs reads")


def _oms_resources(statement: dict[str, Any], kind: str, what: str) -> dict[str, tuple[str, str]]:
    """name -> (algorithm, hex digest) from an OMS statement, its root digest checked."""
    listed: Any
    if kind == OMS_COMPAT:
        listed = [{"name": s.get("name"), "algorithm": "sha256", "digest": (s.get("digest") or {}).get("sha256")}
                  for s in statement["subject"] if isinstance(s, dict)]
    else:
        predicate = statement.get("predicate")
        listed = predicate.get("resources") if isinstance(predicate, dict) else None
        if not isinstance(listed, list):
            raise Malformed(f"{what}: OMS statement without resources")
    if len(listed) > MAX_RESOURCES:
        raise Malformed(f"{what}: OMS statement lists {len(listed):,} entries, over the {MAX_RESOURCES:,} limit")
    resources: dict[str, tuple[str, str]] = {}
    root = hashlib.sha256()
    for entry in listed:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "algorithm", "digest")):
            raise Malformed(f"{what}: OMS resource {str(entry)[:80]} lacks a name, algorithm or digest")
        try:
            root.update(bytes.fromhex(entry["digest"]))
        except ValueError:
            raise Malformed(f"{what}: OMS digest of {entry['name'][:80]!r} is not hex") from None
        resources[entry["name"]] = (entry["algorithm"], entry["digest"].lower())
    if kind == OMS_V1:
        claimed = subject_digests(statement)
        if len(statement["subject"]) != 1 or not claimed or claimed[0] != "sha256:" + root.hexdigest():
            raise Malformed(f"{what}: OMS statement's subject digest does not match its resources (altered)")
    return resources


def _normal(path: str) -> str:
    return posixpath.normpath(path.lstrip("/")).removeprefix("./")


def _files(resources: dict[str, tuple[str, str]], manifest: Manifest, what: str) -> Coverage:
    """Each file of the artifact against the statement: covered, uncovered (why), or contradicted."""
    whole: dict[str, tuple[str, str]] = {}  # file -> (algorithm, hex) for whole-file sha256 digests
    shards: dict[str, list[tuple[int, int, str]]] = {}
    for name, (algorithm, digest) in resources.items():
        shard = _SHARD.fullmatch(name) if algorithm.startswith("sha256-sharded-") else None
        if shard:
            shards.setdefault(_normal(shard.group(1)), []).append((int(shard.group(2)), int(shard.group(3)), digest))
        else:
            whole[_normal(name)] = (algorithm, digest)
    uncovered: list[str] = []
    contradictions: list[str] = []
    seen: set[str] = set()
    for layer in manifest.layers:
        path = _normal(layer.filepath or "")
        if path == SIGNATURE_FILE:
            continue  # the signature itself
        classified = classify_layer(layer.media_type)
        if classified is None or classified[1] is not Packing.RAW or not layer.filepath:
            uncovered.append(f"{path or layer.digest[:19]} is in a {layer.media_type.rsplit('.', 1)[-1]} layer: its "
                             "signed hash would need the layer's bytes (sign the manifest: modelfs sign)")
            continue
        seen.add(path)
        algorithm, digest = whole.get(path) or _one_shard(shards.get(path), layer.size) or ("", "")
        if not algorithm:
            reason = "is split into several signed shards" if path in shards else "is not listed"
            uncovered.append(f"{path} {reason}")
        elif algorithm != "sha256" or not _HEX64.fullmatch(digest):
            uncovered.append(f"{path} is signed with {algorithm[:40]}, which modelfs checks only as sha256")
        elif "sha256:" + digest != layer.digest:
            contradictions.append(f"{path}: signed sha256:{digest[:12]}…, the artifact has {layer.digest[:19]}…")
    for missing in sorted((set(whole) | set(shards)) - seen - {SIGNATURE_FILE})[:3]:
        contradictions.append(f"{missing} is signed but missing from the artifact")
    return Coverage(False, len(whole) + len(shards), uncovered, contradictions)


def _one_shard(found: list[tuple[int, int, str]] | None, size: int) -> tuple[str, str] | None:
    """A file signed as one shard from 0 to its end: that shard's sha256 is the file's."""
    if found and len(found) == 1 and found[0][:2] == (0, size):
        return "sha256", found[0][2]
    return None
