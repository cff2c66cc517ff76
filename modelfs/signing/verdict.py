"""Each signature found, judged against the policy; the verdict on the model; its record.

A model meets the policy when a signature by one of the policy's keys or identities vouches
for its manifest digest, or for every one of its files (an OMS statement), and no signature
by such a signer contradicts it (names another digest for one of its files, or a file it
lacks). A signature by anyone else, or of something else, does not count either way: anyone
who can push to a repository can attach junk to it.

The verdict is recorded beside the model's record in the cache (``signatures/<hex>.json``),
keyed by the manifest digest and the policy's fingerprint (keys, identities, trusted root),
with the signatures that met it. A later mount under the same policy checks those again
(cryptography, no network: an offline remount works), instead of a flag on disk that anyone
who can write the cache could set; another policy looks again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..atomic import atomic_write
from ..settings import ConfigError
from . import simplesigning
from .bounded import Malformed
from .bundle import IN_TOTO, Signed, claimed_signer, parse, verify_keyless, verify_with_keys
from .evidence import Evidence
from .filechecks import FileChecks, merge
from .policy import AUDIT, Policy
from .statement import Coverage, evaluate, load_statement

log = logging.getLogger("modelfs.signing")


@dataclass(frozen=True)
class Finding:
    where: str
    what: str  # "cosign signature", "OMS statement", ...
    signer: str | None = None  # verified signer; None when no policy signer made it
    coverage: Coverage | None = None
    reason: str = ""  # why it does not count, when it does not

    @property
    def counts(self) -> bool:
        return self.signer is not None and self.coverage is not None and not self.reason

    @property
    def contradicts(self) -> bool:
        return self.signer is not None and self.coverage is not None and bool(self.coverage.contradictions)

    def line(self) -> str:
        if self.counts and self.coverage is not None:
            coverage = self.coverage
            later = len(coverage.checks) + (1 if coverage.listed_later else 0)
            covered = "the manifest digest" if coverage.covers_manifest else \
                f"all {coverage.files_signed} files, each digest equal to its layer's" if not later else \
                f"all {coverage.files_signed} files, {len(coverage.vouched)} by their layer's digest, the others " \
                "hashed when first read"
            return f"ok   {self.where}: {self.what} by {self.signer}, covering {covered}"
        by = f" by {self.signer}" if self.signer else ""
        return f"FAIL {self.where}: {self.what}{by}: {self.reason}"


@dataclass(frozen=True)
class Verdict:
    reference: str
    policy: Policy
    findings: list[Finding] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)  # what the counting findings rest on
    recorded: bool = False  # re-checked from the cache's record, not fetched
    note: str = ""  # why nothing could be looked at (offline)

    @property
    def met(self) -> bool:
        return any(f.counts for f in self.findings) and not any(f.contradicts for f in self.findings)

    @property
    def covers_manifest(self) -> bool:
        """A counting signature vouches for the manifest (so for the block index it names)."""
        return self.met and any(f.counts and f.coverage is not None and f.coverage.covers_manifest
                                for f in self.findings)

    @cached_property
    def file_checks(self) -> FileChecks | None:
        """What the data path must still hash before serving a file (a file in a tar layer,
        another hash, shards), when the verdict rests on OMS statements alone; None when a
        signature of the manifest vouches for every byte, or nothing is left to check."""
        if not self.met or self.covers_manifest or self.policy.mode not in ("enforce", "warn"):
            return None
        parts = [(f.where, f.coverage) for f in self.findings if f.counts and f.coverage is not None]
        return merge(parts, self.policy.mode, self.reference)

    def summary(self) -> str:
        """One line: for the log, ``status`` and the terminal."""
        if self.met:
            signers = sorted({f.signer for f in self.findings if f.counts and f.signer})
            return f"signed by {', '.join(signers)}" + (" (recorded verdict)" if self.recorded else "")
        return f"NOT signed as the policy requires: {self.reasons()}"

    def reasons(self) -> str:
        failing = [f for f in self.findings if f.contradicts] or [f for f in self.findings if not f.counts]
        if self.note:
            return self.note
        if not failing:
            return "no signature found (looked for model.sig, signature referrers and the .sig tag)"
        shown = "; ".join(f"{f.where} ({f.what}): {f.reason}" for f in failing[:3])
        return shown + (f"; and {len(failing) - 3} more" if len(failing) > 3 else "")

    def refusal(self) -> str:
        return f"{self.reference} is not signed as the policy requires ({self.policy.describe()}): {self.reasons()}"


def judge(policy: Policy, model: Any, evidence: list[Evidence], recorded: bool = False) -> Verdict:
    findings = [_judge_one(policy, model, item) for item in evidence]
    used = [item for item, finding in zip(evidence, findings, strict=True) if finding.counts]
    return Verdict(str(model.reference), policy, findings, used, recorded)


def _judge_one(policy: Policy, model: Any, item: Evidence) -> Finding:
    if item.kind == "unread":
        return Finding(item.where, "not counted", reason=item.note)
    if item.kind == "simplesigning":
        return _legacy(policy, model, item)
    try:
        bundle = parse(item.data, item.where)
    except Malformed as exc:
        return Finding(item.where, "not a signature", reason=str(exc))
    what = "Sigstore bundle"
    try:
        signed = _signed_by(policy, bundle, model.manifest_bytes)
    except ValueError as exc:
        return Finding(item.where, what, reason=f"by {claimed_signer(bundle)}: {exc}")
    if signed is None:
        unchecked = " (no key or identity given to check it)" if not policy.names_signers else ""
        return Finding(item.where, what, reason=f"signed by {claimed_signer(bundle)}, not a signer the policy "
                                                f"names{unchecked}")
    try:
        what, coverage = _content(signed, model, item.where)
    except Malformed as exc:
        return Finding(item.where, what, signed.signer, reason=str(exc))
    reason = "; ".join((coverage.contradictions + coverage.uncovered)[:3])
    if coverage.uncovered and not coverage.contradictions:
        reason = f"covers only {coverage.files_signed} files; " + reason
    return Finding(item.where, what, signed.signer, coverage, reason)


def _signed_by(policy: Policy, bundle, manifest_bytes: bytes) -> Signed | None:
    if bundle.keyless:
        if not policy.identities or not policy.trusted_root:
            return None
        return verify_keyless(bundle, policy.identities, policy.trusted_root, manifest_bytes)
    return verify_with_keys(bundle, policy.keys, manifest_bytes)


def _content(signed: Signed, model: Any, where: str) -> tuple[str, Coverage]:
    digest = model.reference.digest or ""
    if signed.payload_type is None:
        if signed.message_digest != digest:
            raise Malformed(f"signs {str(signed.message_digest)[:19]}…, not this manifest ({digest[:19]}…)")
        return "message signature of the manifest", Coverage(covers_manifest=True)
    if signed.payload_type != IN_TOTO:
        raise Malformed(f"its payload is {signed.payload_type[:60]!r}, not an in-toto statement")
    statement = load_statement(signed.payload, where)
    coverage = evaluate(statement, model.manifest, digest, where)
    return ("cosign signature" if coverage.covers_manifest else "OMS model signature"), coverage


def _legacy(policy: Policy, model: Any, item: Evidence) -> Finding:
    what = "cosign legacy signature"
    try:
        payload = simplesigning.parse(item.data, item.annotations, item.where)
    except Malformed as exc:
        return Finding(item.where, "not a signature", reason=str(exc))
    digest = model.reference.digest or ""
    if payload.keyless:
        return Finding(item.where, what, reason="keyless legacy signatures are not read (their log proof is an old "
                                                "format); it does not count")
    key = next((k for k in policy.keys if k.verifies(payload.signature, item.data)), None)
    if key is None:
        return Finding(item.where, what, reason="signed by a key the policy does not name")
    if payload.signed_digest != digest:
        return Finding(item.where, what, key.describe(), Coverage(), reason=f"signs {payload.signed_digest[:19]}…, not "
                                                                             f"this manifest ({digest[:19]}…)")
    return Finding(item.where, what, key.describe(), Coverage(covers_manifest=True))


# -- the record in the cache ----------------------------------------------------------------


def _record_path(cache_root: str, digest: str) -> str:
    return os.path.join(cache_root, "signatures", digest.split(":", 1)[-1] + ".json")


def recorded(cache_root: str, digest: str, fingerprint: str) -> list[Evidence] | None:
    """The signatures that met policy ``fingerprint`` for ``digest`` when last checked, if any
    (they are judged again before use)."""
    try:
        with open(_record_path(cache_root, digest)) as handle:
            doc = json.load(handle)
        entry = doc["verdicts"][fingerprint]
        return [Evidence.from_json(item) for item in entry["evidence"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record(cache_root: str, digest: str, fingerprint: str, verdict: Verdict) -> None:
    path = _record_path(cache_root, digest)
    try:
        with open(path) as handle:
            doc = json.load(handle)
    except (OSError, ValueError):
        doc = {}
    verdicts = doc.get("verdicts") if isinstance(doc.get("verdicts"), dict) else {}
    verdicts[fingerprint] = {"recorded": time.time(), "signers": verdict.summary(),
                             "evidence": [item.to_json() for item in verdict.evidence]}
    try:
        atomic_write(path, json.dumps({"digest": digest, "verdicts": verdicts}).encode())
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise ConfigError(f"cannot record the signature verdict in {path}: {exc.strerror}") from None
        log.warning("cannot record the signature verdict of %s (%s); an offline mount will not find it", digest,
                    exc.strerror)


def listing(verdict: Verdict) -> list[str]:
    """The lines ``verify`` and ``inspect`` print, one per signature found."""
    lines = [f.line() for f in verdict.findings] or ["no signature found (looked for model.sig, signature "
                                                       "referrers and the .sig tag)"]
    if verdict.policy.mode == AUDIT and not verdict.policy.names_signers:
        lines.append("(no key or identity given: signers are as the signatures claim, unchecked)")
    return lines
