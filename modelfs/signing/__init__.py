"""Trust the publisher: a model's signatures, checked before its first byte is served.

:func:`check` runs in the one place every command resolves a model
(:func:`modelfs.resolve.fetch_or_cached`: mount, pull, extract, inspect, the CSI plugin's
mounts, ``verify``), after the manifest is resolved and before any file is served or kept.
It reads no byte of the weights: a signature vouches for the manifest digest (cosign), or
for each file's sha256, which for a raw layer is the layer digest the manifest holds (OMS).
From there the existing trust chain (manifest -> layer digest -> block index -> block)
carries it to every byte served lazily; see :func:`gate_index` for the one link a file-only
signature does not cover. What an OMS statement signs that no layer digest stands for (a
file in a tar layer, blake2b or blake3, shards) the verdict hands on as per-file checks
(:attr:`Verdict.file_checks`, :mod:`.filechecks`), run by the data path before serving.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import SignatureError, UnavailableError
from .evidence import gather
from .policy import OFF, Policy, build
from .verdict import Verdict, judge, listing, record, recorded

if TYPE_CHECKING:
    from ..formats.blockindex import TrustedIndex

__all__ = ["OFF", "Policy", "Verdict", "build", "check", "gate_index", "index_allowed", "lazy_allowed", "listing"]

log = logging.getLogger("modelfs.signing")


async def check(client: Any, cache_root: str | None, model: Any, policy: Policy, offline: bool) -> Verdict | None:
    """The verdict on ``model`` under ``policy`` (None when the policy is off). Under
    ``enforce`` a model that does not meet it raises SignatureError (or UnavailableError when
    its signatures cannot be fetched and none were recorded); under ``warn`` it is logged."""
    if not policy.checks:
        return None
    digest = model.reference.digest or ""
    fingerprint = policy.fingerprint()
    remembered = recorded(cache_root, digest, fingerprint) if cache_root else None
    if remembered:
        verdict = judge(policy, model, remembered, recorded=True)
        if verdict.met:
            return _conclude(verdict)
    if offline:
        note = "the registry cannot be reached and no verdict was recorded for this policy"
        if policy.mode == "enforce":
            raise UnavailableError(f"{model.reference}: cannot check its signatures: {note}; mount it once online")
        return _conclude(Verdict(str(model.reference), policy, note=note))
    verdict = judge(policy, model, await gather(client, model))
    if verdict.met and cache_root:
        record(cache_root, digest, fingerprint, verdict)
    return _conclude(verdict)


def _conclude(verdict: Verdict) -> Verdict:
    if verdict.met:
        log.info("signatures of %s: %s", verdict.reference, verdict.summary())
    elif verdict.policy.mode == "enforce":
        raise SignatureError(verdict.refusal())
    elif verdict.policy.mode == "warn":
        log.warning("%s", f"signatures = warn: serving {verdict.reference} anyway: {verdict.summary()}")
    return verdict


def gate_index(verdict: Verdict | None, index: TrustedIndex | None) -> TrustedIndex | None:
    """The block index a mount may use under the verdict. Under ``enforce``, an index counts
    only if a signature covers the manifest that names it: a file-only (OMS) signature vouches
    for each layer's digest, not for the manifest, so a re-pushed manifest naming a forged
    index for the same signed layers would otherwise have its blocks served unchecked. Then
    each blob is served once checked whole against its signed digest. An index attached as a
    referrer is not covered by any signature either."""
    if index is None or index_allowed(verdict, index.vouched):
        return index
    if verdict is not None and not verdict.covers_manifest:
        log.warning("block index not used: the signatures that met the policy cover each file's digest, not the "
                    "manifest that names the index; each blob is served once checked whole (sign the manifest too, "
                    "`modelfs sign`, for lazy reads)")
    return None


def index_allowed(verdict: Verdict | None, vouched: bool) -> bool:
    """Whether a block index (named by the manifest: ``vouched``) may be used; see gate_index."""
    if verdict is None or verdict.policy.mode != "enforce":
        return True
    return verdict.covers_manifest and vouched


def lazy_allowed(verdict: Verdict | None) -> bool:
    """Whether ``--verify lazy`` may apply to the model's blobs under the verdict. Not under
    ``enforce`` when files are left to be hashed when read (:attr:`Verdict.file_checks`): a
    range that passed its signed hash is remembered as passed, and the bytes served later
    must be those hashed. Lazy blobs serve blocks that nothing checked -- fetched again after
    a drop, or left in the shared cache by another process (a lazy mount of a mirror that
    served wrong bytes) -- which would be served unhashed, or hashed and blamed on the
    signer. Checked whole, a blob's bytes are fixed by its digest whoever stored them."""
    checks = verdict.file_checks if verdict is not None else None
    if checks is None or not checks.enforcing:
        return True
    log.warning("--verify lazy does not apply: %s signs files that are hashed when read, under enforce; each "
                "blob is served once checked whole", checks.where)
    return False
