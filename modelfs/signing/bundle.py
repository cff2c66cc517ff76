"""Sigstore bundles (v0.1 to v0.3): who signed, checked against the policy's keys or identities.

A bundle carries either a DSSE envelope (an in-toto statement: cosign's image signatures
and OMS model signatures alike) or a message signature (the signature of a blob: here, of
the manifest's bytes, whose SHA-256 is the manifest digest). It is signed either by a key
(``verificationMaterial.publicKey``: checked here with ``cryptography`` against each key of
the policy; a bundle without a transparency log entry, as ``cosign sign --tlog-upload=false``
and ``model_signing sign key`` make, is read too) or keylessly (a Fulcio certificate: checked
by the ``sigstore`` library, offline, against the trusted-root file, with the identity and
issuer the policy names).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Any

from ..settings import ConfigError
from .bounded import Malformed, field, load
from .keys import SIGNING_EXTRA, PublicKey

MEDIA_TYPES = (
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.1",
)
IN_TOTO = "application/vnd.in-toto+json"
FULCIO_ISSUER_OIDS = ("1.3.6.1.4.1.57264.1.8", "1.3.6.1.4.1.57264.1.1")  # v2 (DER string), v1 (raw)


@dataclass(frozen=True)
class Identity:
    """A keyless signer: the certificate's subject (an e-mail, a CI workflow URI) and the
    OIDC issuer that vouched for it. Both must match exactly."""

    identity: str
    issuer: str

    def describe(self) -> str:
        return f"{self.identity} (issuer {self.issuer})"


@dataclass(frozen=True)
class Bundle:
    raw: bytes
    doc: dict[str, Any]
    payload_type: str | None  # DSSE envelope; None for a message signature
    payload: bytes  # the statement (DSSE), or b"" for a message signature
    signature: bytes
    message_digest: str | None  # "sha256:<hex>" of the signed blob, for a message signature
    key_hint: str | None
    certificate: bytes | None  # DER of the signing certificate (keyless)

    @property
    def keyless(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class Signed:
    """What a verified bundle says, and who said it."""

    signer: str
    payload_type: str | None
    payload: bytes
    message_digest: str | None


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise Malformed(f"{what} is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed(f"{what} is not valid base64") from None


def parse(raw: bytes, what: str = "bundle") -> Bundle:
    """A bundle's parts, checked for shape only (nothing is trusted yet)."""
    doc = load(raw, what)
    media_type = doc.get("mediaType")
    if media_type not in MEDIA_TYPES:
        raise Malformed(f"{what}: media type {str(media_type)[:80]!r} is not a Sigstore bundle")
    material = field(doc, "verificationMaterial", dict, what)
    certificate = None
    if isinstance(material.get("certificate"), dict):
        certificate = _b64(material["certificate"].get("rawBytes"), f"{what}: certificate")
    elif isinstance(material.get("x509CertificateChain"), dict):
        chain = material["x509CertificateChain"].get("certificates")
        if not isinstance(chain, list) or not chain or not isinstance(chain[0], dict):
            raise Malformed(f"{what}: empty certificate chain")
        certificate = _b64(chain[0].get("rawBytes"), f"{what}: certificate")
    hint = material.get("publicKey", {}).get("hint") if isinstance(material.get("publicKey"), dict) else None
    if certificate is None and "publicKey" not in material:
        raise Malformed(f"{what}: neither a public key nor a certificate")
    if isinstance(doc.get("dsseEnvelope"), dict):
        envelope = doc["dsseEnvelope"]
        signatures = field(envelope, "signatures", list, f"{what}: DSSE envelope")
        if len(signatures) != 1 or not isinstance(signatures[0], dict):
            raise Malformed(f"{what}: a DSSE envelope must hold exactly one signature, it has {len(signatures)}")
        return Bundle(raw, doc, field(envelope, "payloadType", str, f"{what}: DSSE envelope"),
                      _b64(envelope.get("payload"), f"{what}: payload"), _b64(signatures[0].get("sig"), f"{what}: sig"),
                      None, hint if isinstance(hint, str) else None, certificate)
    if isinstance(doc.get("messageSignature"), dict):
        message = doc["messageSignature"]
        digest = field(message, "messageDigest", dict, f"{what}: message signature")
        if digest.get("algorithm") != "SHA2_256":
            raise Malformed(f"{what}: message digest algorithm {str(digest.get('algorithm'))[:40]!r} is not SHA2_256")
        value = _b64(digest.get("digest"), f"{what}: message digest")
        return Bundle(raw, doc, None, b"", _b64(message.get("signature"), f"{what}: signature"),
                      "sha256:" + value.hex(), hint if isinstance(hint, str) else None, certificate)
    raise Malformed(f"{what}: neither a DSSE envelope nor a message signature")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a DSSE signature signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def claimed_signer(bundle: Bundle) -> str:
    """Who the bundle says signed it, unverified (for listings and refusals)."""
    if bundle.certificate is None:
        return f"a key (hint {bundle.key_hint[:20]})" if bundle.key_hint else "a key"
    try:
        from cryptography import x509
        cert = x509.load_der_x509_certificate(bundle.certificate)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        subject = ", ".join(str(name.value) for name in names)
        issuer = next((_issuer(e.value.value, e.oid.dotted_string) for e in cert.extensions
                       if e.oid.dotted_string in FULCIO_ISSUER_OIDS), "?")
    except Exception:  # only a label: a certificate that cannot be read fails verification anyway
        return "a certificate that cannot be read"
    return f"{subject} (issuer {issuer})"


def _issuer(value: bytes, oid: str) -> str:
    if oid == FULCIO_ISSUER_OIDS[0] and len(value) > 2:
        value = value[2:]  # a DER UTF8String: tag and length first
    return value.decode(errors="replace")


def verify_with_keys(bundle: Bundle, keys: tuple[PublicKey, ...], message: bytes) -> Signed | None:
    """The bundle's content if one of ``keys`` signed it, else None. ``message`` is the blob a
    message signature covers (the manifest)."""
    signed = pae(bundle.payload_type, bundle.payload) if bundle.payload_type is not None else message
    for key in keys:
        if key.verifies(bundle.signature, signed):
            return Signed(key.describe(), bundle.payload_type, bundle.payload, bundle.message_digest)
    return None


def verify_keyless(bundle: Bundle, identities: tuple[Identity, ...], trusted_root: str, message: bytes) -> Signed:
    """The bundle's content, checked by ``sigstore`` offline against ``trusted_root``: the
    certificate chains to its Fulcio CA at the time the transparency log (or a timestamp
    authority) recorded, the log's inclusion proof and checkpoint verify, and the
    certificate's identity and issuer are one of ``identities``. Raises ValueError saying why not."""
    try:
        from sigstore.errors import Error as SigstoreError
        from sigstore.models import Bundle as SigstoreBundle
        from sigstore.models import InvalidBundle, TrustedRoot
        from sigstore.verify import Verifier
        from sigstore.verify import policy as sigstore_policy
    except ImportError:
        raise ConfigError(f"keyless signatures are checked by the sigstore library: {SIGNING_EXTRA}") from None
    try:
        root = TrustedRoot.from_file(trusted_root)
    except (OSError, ValueError, SigstoreError) as exc:
        raise ConfigError(f"trusted root {trusted_root} cannot be read: {_first_line(exc)}") from None
    try:
        parsed = SigstoreBundle.from_json(bundle.raw)
    except (InvalidBundle, ValueError) as exc:
        raise ValueError(f"not a bundle sigstore accepts: {_first_line(exc)}") from None
    policies: list[Any] = [sigstore_policy.Identity(identity=i.identity, issuer=i.issuer) for i in identities]
    try:
        verifier = Verifier(trusted_root=root)
        if bundle.payload_type is not None:
            payload_type, payload = verifier.verify_dsse(parsed, sigstore_policy.AnyOf(policies))
        else:
            verifier.verify_artifact(message, parsed, sigstore_policy.AnyOf(policies))
            payload_type, payload = None, b""
    except (SigstoreError, ValueError) as exc:
        raise ValueError(_first_line(exc)) from None
    matched = next(i for i, p in zip(identities, policies, strict=True) if _accepts(p, parsed.signing_certificate))
    return Signed(f"certificate of {matched.describe()}", payload_type, payload, bundle.message_digest)


def _accepts(policy: Any, certificate: Any) -> bool:
    try:
        policy.verify(certificate)
        return True
    except Exception:
        return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
