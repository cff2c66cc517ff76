"""cosign's legacy signatures: the tag ``sha256-<hex>.sig`` holding simple-signing payloads.

Each layer of that manifest is a payload blob (``critical.image.docker-manifest-digest``
names what it signs) with its signature in the annotation ``dev.cosignproject.cosign/signature``.
A payload naming another manifest is a replay and never counts. Signatures with a key are
checked; keyless ones (a certificate annotation) are listed but not verified: their
transparency-log proof is an old format, so they count as unsigned under ``enforce``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from .bounded import MAX_PAYLOAD_BYTES, Malformed, load

LAYER_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
CERTIFICATE_ANNOTATION = "dev.sigstore.cosign/certificate"
PAYLOAD_TYPES = ("cosign container image signature", "https://sigstore.dev/cosign/sign/v1")
MAX_LAYERS = 16


def tag(manifest_digest: str) -> str:
    return manifest_digest.replace(":", "-") + ".sig"


@dataclass(frozen=True)
class Payload:
    signed_digest: str
    signature: bytes
    keyless: bool


def parse(payload: bytes, annotations: dict[str, str], what: str) -> Payload:
    doc = load(payload, f"{what}: payload", MAX_PAYLOAD_BYTES)
    critical = doc.get("critical")
    image = critical.get("image") if isinstance(critical, dict) else None
    digest = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(digest, str) or not isinstance(critical, dict) or critical.get("type") not in PAYLOAD_TYPES:
        raise Malformed(f"{what}: not a cosign simple-signing payload")
    try:
        signature = base64.b64decode(annotations.get(SIGNATURE_ANNOTATION, ""), validate=True)
    except (binascii.Error, ValueError):
        raise Malformed(f"{what}: its signature annotation is not base64") from None
    if not signature:
        raise Malformed(f"{what}: no signature annotation")
    return Payload(digest, signature, bool(annotations.get(CERTIFICATE_ANNOTATION)))
