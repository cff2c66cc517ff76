"""The signature policy for one reference: which keys or keyless identities must have signed
it, and what to do when none did (``enforce``, ``warn``, ``off``).

Each setting comes from, in order (:func:`modelfs.settings.resolve`, the one order of every
setting): the flag (or fstab option); the config's ``[trust."registry/repository"]`` table
with the longest scope that contains the reference (a registry host, or a host and a
repository prefix, cut at a ``/``: :meth:`modelfs.config.Config.trust_scope`); the config's
top level; the default. The CSI plugin's mounts read the node's config and nothing else: a pod's
volume attributes cannot name signature settings (modelfs/csi/volume.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..reference import Reference
from ..settings import ConfigError, resolve
from .bundle import Identity
from .keys import SIGNING_EXTRA, PublicKey, crypto, load_public

NAMES = ("signatures", "key", "certificate_identity", "certificate_oidc_issuer", "trusted_root")
AUDIT = "audit"  # ``inspect``: find and check signatures, refuse nothing


@dataclass(frozen=True)
class Policy:
    mode: str  # enforce, warn, off, or audit
    keys: tuple[PublicKey, ...] = ()
    identities: tuple[Identity, ...] = ()
    trusted_root: str | None = None
    scope: str = ""  # the [trust."..."] table that applied, if any

    @property
    def checks(self) -> bool:
        return self.mode != "off"

    @property
    def names_signers(self) -> bool:
        return bool(self.keys or self.identities)

    def fingerprint(self) -> str:
        """What a verdict depends on (the keys, identities and trusted root), not the mode:
        a verdict recorded under one policy is reused only under the same one."""
        root = b""
        if self.trusted_root:
            with open(self.trusted_root, "rb") as handle:
                root = handle.read()
        doc = {"keys": sorted(hashlib.sha256(k.der).hexdigest() for k in self.keys),
               "identities": sorted([i.identity, i.issuer] for i in self.identities),
               "trusted_root": hashlib.sha256(root).hexdigest() if root else None}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]

    def describe(self) -> str:
        who = [k.describe() for k in self.keys] + [f"keyless {i.describe()}" for i in self.identities]
        return f"{self.mode}: {', '.join(who) or 'no key or identity'}"

    def listing(self) -> Policy:
        """The same signers, for showing what is attached (``inspect``): nothing is refused."""
        return replace(self, mode=AUDIT)


OFF = Policy("off")


def build(flags: Mapping[str, Any], config: Any, reference: Reference, verifying: bool = False) -> Policy:
    """The policy for ``reference`` from the flags given (None when not given) and the config,
    each setting resolved in the one order (:func:`modelfs.settings.resolve`). Commands get
    theirs from their resolved settings instead (:func:`modelfs.compose.trust_policy`)."""
    scope = config.trust_scope(reference.registry, reference.repository)
    values = {name: resolve(name, flags.get(name), config, reference.registry, scope) for name in NAMES}
    return make(values, reference, scope, verifying)


def make(values: Mapping[str, Any], reference: Reference, scope: str | None, verifying: bool = False) -> Policy:
    """The policy from the five signature settings already resolved for ``reference``
    (``scope``: the ``[trust."..."]`` table they came from). ``verifying`` (``modelfs
    verify``): a check that can only pass or fail, never warn."""
    keys = tuple(load_public(path) for path in values["key"] or ())
    identities = _identities(values)
    trusted_root = values["trusted_root"]
    mode = values["signatures"] or ("enforce" if keys or identities else "off")
    if verifying:
        if not keys and not identities:
            raise ConfigError("verify needs a --key, or a --certificate-identity with --certificate-oidc-issuer "
                              "(or a policy in the config that names them)")
        mode = "enforce"
    if mode != "off" and not keys and not identities:
        raise ConfigError(f"signatures = {mode!r} for {reference} needs a key or a certificate identity to check "
                          f"against (--key, --certificate-identity){_where(scope)}")
    if identities and not trusted_root:
        raise ConfigError("keyless signatures are checked offline against a Sigstore trusted root: give --trusted-root "
                          "FILE (`cosign trusted-root create`, or trusted_root.json from Sigstore's TUF repository)")
    if trusted_root:
        try:
            with open(trusted_root, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot read trusted root {trusted_root}: {exc.strerror}") from None
    if mode != "off":
        crypto()  # a missing extra is one line here, before any network
        if identities:
            _require_sigstore()
    return Policy(mode, keys, identities, trusted_root, scope or "")


def _identities(values: Mapping[str, Any]) -> tuple[Identity, ...]:
    names = values["certificate_identity"] or ()
    issuer = values["certificate_oidc_issuer"]
    if names and not issuer:
        raise ConfigError("--certificate-identity needs --certificate-oidc-issuer (like "
                          "https://token.actions.githubusercontent.com): both must match")
    if issuer and not names:
        raise ConfigError("--certificate-oidc-issuer needs --certificate-identity: the issuer alone says nothing about "
                          "who signed")
    return tuple(Identity(name, issuer) for name in names)


def _where(scope: str | None) -> str:
    return f' (config: [trust."{scope}"])' if scope else ""


def _require_sigstore() -> None:
    try:
        import sigstore  # noqa: F401
    except ImportError:
        raise ConfigError(f"keyless signatures are checked by the sigstore library: {SIGNING_EXTRA}") from None
