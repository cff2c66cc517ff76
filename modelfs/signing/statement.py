"""What a verified signature vouches for: the manifest digest, or the model's files.

- cosign's image signature (predicate ``https://sigstore.dev/cosign/sign/v1``, what
  ``cosign sign`` v3 and ``modelfs sign`` make) and a message signature of the manifest
  vouch for the manifest digest, hence for every byte of the artifact.
- An OMS model signature (``https://model_signing/signature/v1.0``, made by
  ``model_signing sign``) lists each file's digest. A raw ModelPack layer *is* its file, so
  a file listed with its sha256 is vouched for when that equals the layer's digest: no byte
  of the weights is read. A one-shard ``shards`` entry spanning the whole file is the same
  hash. A file hashed otherwise (blake2b, blake3, several shards) or packed in a tar layer is
  covered too, but only by reading it: its shards become a pending check
  (:mod:`.filechecks`) that the data path and ``extract`` run before serving or keeping it.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from ..formats.spec import Manifest, Packing, classify_layer
from .bounded import MAX_RESOURCES, Malformed
from .filechecks import DIGEST_HEX, HASHERS, SIGNATURE_FILE, WHOLE, Shard, base_algorithm, shown, tiling_problem

STATEMENT_TYPES = ("https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1")
COSIGN_SIGN = "https://sigstore.dev/cosign/sign/v1"
OMS_V1 = "https://model_signing/signature/v1.0"
OMS_COMPAT = "https://model_signing/Digests/v0.1"
_SHARD = re.compile(r"(.+):(\d{1,19}):(\d{1,19})")  # byte offsets that fit 64 bits (int() of 5,000 digits raises)


@dataclass(frozen=True)
class Coverage:
    """What one statement says about this artifact."""

    covers_manifest: bool = False
    files_signed: int = 0  # files the statement lists
    uncovered: list[str] = field(default_factory=list)  # files of the artifact it does not vouch for, with why
    contradictions: list[str] = field(default_factory=list)  # where it disagrees with the artifact
    checks: dict[str, tuple[Shard, ...]] = field(default_factory=dict)  # files covered once read and hashed
    vouched: frozenset[str] = frozenset()  # files whose signed sha256 is their raw layer's digest
    signed: frozenset[str] = frozenset()  # every file it lists
    listed_later: bool = False  # tar layers: which files they hold (so whether all are covered) is judged once listed


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
        listed_as = (entry["algorithm"], entry["digest"].lower())
        if resources.setdefault(entry["name"], listed_as) != listed_as:  # not whichever came last: neither
            raise Malformed(f"{what}: OMS statement lists {entry['name'][:80]!r} twice, with different digests")
    if kind == OMS_V1:
        claimed = subject_digests(statement)
        if len(statement["subject"]) != 1 or not claimed or claimed[0] != "sha256:" + root.hexdigest():
            raise Malformed(f"{what}: OMS statement's subject digest does not match its resources (altered)")
    return resources


def _normal(path: str) -> str:
    return posixpath.normpath(path.lstrip("/")).removeprefix("./")


def _signed_shards(resources: dict[str, tuple[str, str]]) -> dict[str, list[Shard]]:
    """path -> the shards the statement signs for it (a whole-file digest: one shard to WHOLE)."""
    signed: dict[str, list[Shard]] = {}
    for name, (algorithm, digest) in resources.items():
        shard = _SHARD.fullmatch(name) if "-sharded-" in algorithm else None
        if shard:
            entry = Shard(int(shard.group(2)), int(shard.group(3)), base_algorithm(algorithm), digest)
            signed.setdefault(_normal(shard.group(1)), []).append(entry)
        else:
            signed.setdefault(_normal(name), []).append(Shard(0, WHOLE, algorithm, digest))
    signed.pop(SIGNATURE_FILE, None)  # the signature itself
    return {path: sorted(set(shards), key=lambda s: (s.start, s.end)) for path, shards in signed.items()}


def _twice(shards: list[Shard]) -> bool:
    """One range of a file signed twice with different digests (``w.bin`` and ``./w.bin``)."""
    return any((a.start, a.end) == (b.start, b.end) for a, b in zip(shards, shards[1:], strict=False))


def _unreadable(shards: list[Shard]) -> str | None:
    """Why modelfs cannot check these shards, if it cannot."""
    for shard in shards:
        if shard.algorithm not in HASHERS:
            return f"is signed with {shown(shard.algorithm[:40])}, which modelfs does not read (sha256, blake2b, blake3)"
        if len(shard.digest) != DIGEST_HEX[shard.algorithm]:
            return f"has a {shard.algorithm} digest of {len(shard.digest)} hex digits"
    return None


def _files(resources: dict[str, tuple[str, str]], manifest: Manifest, what: str) -> Coverage:
    """Each file of the artifact against the statement: vouched (a raw layer whose digest is
    the signed sha256), covered once read (``checks``), uncovered (why), or contradicted."""
    signed = _signed_shards(resources)
    uncovered: list[str] = []
    contradictions: list[str] = []
    checks: dict[str, tuple[Shard, ...]] = {}
    vouched: set[str] = set()
    listed_later = False
    raw_paths: set[str] = set()
    for layer in manifest.layers:
        path = _normal(layer.filepath or "")
        if path == SIGNATURE_FILE:
            continue  # the signature itself
        classified = classify_layer(layer.media_type)
        if classified is not None and classified[1] is not Packing.RAW:
            listed_later = True  # its files are known once it is listed (FileChecks.judge_listing)
            continue
        if classified is None or not layer.filepath:
            uncovered.append(f"{shown(path) or layer.digest[:19]} is in a {shown(layer.media_type.rsplit('.', 1)[-1])} layer, which "
                             "modelfs does not list")
            continue
        raw_paths.add(path)
        shards = signed.get(path)
        if shards and _twice(shards):
            contradictions.append(f"{shown(path)} is listed twice, with different digests")
            continue
        problem = _unreadable(shards) if shards else "is not listed"
        if problem:
            uncovered.append(f"{shown(path)} {problem}")
            continue
        assert shards is not None
        tiling = tiling_problem(tuple(shards), layer.size)
        if tiling:
            contradictions.append(f"{shown(path)}: {tiling}")
        elif len(shards) == 1 and shards[0].algorithm == "sha256":
            if "sha256:" + shards[0].digest != layer.digest:
                contradictions.append(f"{shown(path)}: signed sha256:{shards[0].digest[:12]}…, the artifact has "
                                      f"{layer.digest[:19]}…")
            vouched.add(path)
        else:
            checks[path] = tuple(shards)
    for path in sorted(set(signed) - raw_paths):
        problem = _unreadable(signed[path])
        if _twice(signed[path]):
            contradictions.append(f"{shown(path)} is listed twice, with different digests")
        elif not listed_later:
            if len(contradictions) < 3:
                contradictions.append(f"{shown(path)} is signed but missing from the artifact")
        elif problem:
            uncovered.append(f"{shown(path)} {problem}")
        else:
            checks[path] = tuple(signed[path])
    return Coverage(False, len(signed), uncovered, contradictions, checks, frozenset(vouched), frozenset(signed),
                    listed_later)
