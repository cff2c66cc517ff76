"""``modelfs sign``: a cosign-compatible signature of a model's manifest digest.

What ``cosign sign --key`` (v3, or v2 with ``--new-bundle-format``) makes: a Sigstore bundle
v0.3 holding a DSSE envelope with an in-toto statement whose subject is the manifest digest
(predicate ``https://sigstore.dev/cosign/sign/v1``), signed with the key, no transparency-log
entry (an offline signature: what ``cosign sign --tlog-upload=false`` makes). It is pushed as
a referrer of the manifest (artifact type ``application/vnd.dev.sigstore.bundle.v0.3+json``,
the layout of cosign's BUNDLE_SPEC), through the referrers API or its fallback tag.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

from ..formats.spec import OCI_MANIFEST, Descriptor
from ..index import attach
from .bundle import IN_TOTO, MEDIA_TYPES, pae
from .keys import PrivateKey
from .statement import COSIGN_SIGN

BUNDLE_MEDIA_TYPE = MEDIA_TYPES[0]


def make_bundle(key: PrivateKey, manifest_digest: str, name: str) -> bytes:
    statement = {"_type": "https://in-toto.io/Statement/v1",
                 "subject": [{"name": name, "digest": {"sha256": manifest_digest.split(":", 1)[1]}}],
                 "predicateType": COSIGN_SIGN, "predicate": {}}
    payload = json.dumps(statement, separators=(",", ":")).encode()
    signature = key.sign(pae(IN_TOTO, payload))
    bundle = {"mediaType": BUNDLE_MEDIA_TYPE,
              "verificationMaterial": {"publicKey": {"hint": key.hint()}, "tlogEntries": []},
              "dsseEnvelope": {"payload": base64.b64encode(payload).decode(), "payloadType": IN_TOTO,
                               "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}]}}
    return json.dumps(bundle, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignResult:
    referrer: str  # digest of the referrer manifest
    bundle: bytes


async def sign(client: Any, model: Any, key: PrivateKey) -> SignResult:
    """Sign ``model``'s manifest digest with ``key`` and attach the bundle as its referrer."""
    digest = model.reference.digest
    bundle = make_bundle(key, digest, f"{model.reference.registry}/{model.reference.repository}")
    subject = Descriptor(model.manifest.media_type or OCI_MANIFEST, digest, len(model.manifest_bytes),
                         artifact_type=model.manifest.artifact_type)
    annotations = {"dev.sigstore.bundle.content": "dsse-envelope", "dev.sigstore.bundle.predicateType": COSIGN_SIGN,
                   "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    referrer = await attach(client, model.reference.repository, subject, bundle, BUNDLE_MEDIA_TYPE,
                                       annotations, replaces=())
    return SignResult(referrer, bundle)
