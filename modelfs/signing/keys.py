"""Public and private keys, as cosign and model-signing make them (``cryptography`` only).

ECDSA P-256/P-384/P-521 (hashed with SHA-256/384/512 by curve, as Sigstore's specs and
model-signing do; SHA-256 is tried too, as older cosign keys of any curve used it), Ed25519,
and RSA (PKCS#1 v1.5 as cosign signs, PSS accepted) with SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

from ..settings import ConfigError

SIGNING_EXTRA = "pip install 'modelfs[signing]'"


def crypto() -> Any:
    """The ``cryptography`` primitives, or a one-line error naming the extra to install."""
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    except ImportError:
        raise ConfigError(f"checking signatures needs the signing extra: {SIGNING_EXTRA}") from None
    return hashes, serialization, ec, ed25519, padding, rsa


@dataclass(frozen=True)
class PublicKey:
    """A public key of the policy, with the name it was given by (its file) for messages."""

    name: str
    der: bytes  # SubjectPublicKeyInfo
    key: Any = field(compare=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER public key, as ``SHA256:`` and 16 hex digits (enough to tell keys apart)."""
        return "SHA256:" + hashlib.sha256(self.der).hexdigest()[:16]

    @property
    def algorithm(self) -> str:
        _, _, ec, ed25519, _, rsa = crypto()
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384", "secp521r1": "ECDSA P-521"}.get(
                self.key.curve.name, self.key.curve.name)
        if isinstance(self.key, ed25519.Ed25519PublicKey):
            return "Ed25519"
        return f"RSA-{self.key.key_size}" if isinstance(self.key, rsa.RSAPublicKey) else type(self.key).__name__

    def describe(self) -> str:
        return f"key {self.name} ({self.algorithm}, {self.fingerprint})"

    def verifies(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` over ``data`` was made by this key, with any scheme it allows."""
        hashes, _, ec, ed25519, padding, rsa = crypto()
        from cryptography.exceptions import InvalidSignature
        attempts: list[tuple[Any, ...]] = []
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            by_curve = {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}.get(self.key.curve.key_size,
                                                                                   hashes.SHA256)
            attempts = [(ec.ECDSA(algorithm()),) for algorithm in dict.fromkeys((by_curve, hashes.SHA256))]
        elif isinstance(self.key, ed25519.Ed25519PublicKey):
            attempts = [()]
        elif isinstance(self.key, rsa.RSAPublicKey):
            attempts = [(padding.PKCS1v15(), hashes.SHA256()),
                        (padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO), hashes.SHA256())]
        for arguments in attempts:
            try:
                self.key.verify(signature, data, *arguments)
                return True
            except (InvalidSignature, ValueError):
                continue
        return False


def _read_key(path: str) -> bytes:
    """A key file's bytes (a PEM key is a few KiB: at most 1 MiB is read)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 20)
    except OSError as exc:
        raise ConfigError(f"cannot read key {path}: {exc.strerror}") from None


def load_public(path: str) -> PublicKey:
    """A PEM public key file (cosign.pub, or `openssl ... -pubout`); a bad one is a ConfigError."""
    _, serialization, ec, ed25519, _, rsa = crypto()
    data = _read_key(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"key {path} is not a PEM public key (give the .pub file, not the private key)") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey)):
        raise ConfigError(f"key {path} is a {type(key).__name__}; modelfs takes ECDSA, Ed25519 and RSA keys")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return PublicKey(path, der, key)


@dataclass(frozen=True)
class PrivateKey:
    path: str
    key: Any = field(repr=False)

    def public(self) -> PublicKey:
        _, serialization, _, _, _, _ = crypto()
        public = self.key.public_key()
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return PublicKey(self.path, der, public)

    def sign(self, data: bytes) -> bytes:
        hashes, _, ec, ed25519, padding, rsa = crypto()
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            algorithm = {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}[self.key.curve.key_size]
            return bytes(self.key.sign(data, ec.ECDSA(algorithm())))
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return bytes(self.key.sign(data))
        return bytes(self.key.sign(data, padding.PKCS1v15(), hashes.SHA256()))

    def hint(self) -> str:
        """The bundle's key hint: base64 of the SHA-256 of the DER public key."""
        return base64.b64encode(hashlib.sha256(self.public().der).digest()).decode()


def load_private(path: str, password: bytes | None = None) -> PrivateKey:
    """A PEM private key (PKCS#8, SEC1 or PKCS#1); cosign's own encrypted key format is not read."""
    _, serialization, ec, ed25519, _, rsa = crypto()
    data = _read_key(path)
    if b"ENCRYPTED SIGSTORE PRIVATE KEY" in data or b"ENCRYPTED COSIGN PRIVATE KEY" in data:
        raise ConfigError(f"{path} is in cosign's encrypted key format, which modelfs does not read; export it as "
                          "PKCS#8 PEM (cosign import-key-pair / openssl pkcs8)")
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError:
        raise ConfigError(f"{path} is encrypted: give its password on standard input (--password-stdin)") from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM private key, or the password is wrong") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{path} is a {type(key).__name__}; modelfs signs with ECDSA, Ed25519 and RSA keys")
    return PrivateKey(path, key)
