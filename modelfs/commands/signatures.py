"""``verify`` and ``sign``: a model's signatures checked against a policy, or one attached
(modelfs/signing/; doc/INTEGRITY.md, "Signatures"). Every other command that resolves a model
checks its signatures too, in :func:`modelfs.resolve.fetch_or_cached`."""

from __future__ import annotations

import argparse
import sys

from .. import signing
from ..compose import existing_cache, open_registry, open_writer, trust_policy
from ..errors import SignatureError
from ..reference import parse
from ..resolve import fetch_model, fetch_or_cached
from .base import settings_for, warn_offline


async def cmd_verify(args: argparse.Namespace) -> int:
    """Who signed what, and whether that meets the policy (exit 1 when not); nothing is fetched
    but the manifest, the config and the signatures."""
    reference = parse(args.reference)
    settings = settings_for(args, reference.registry, reference.repository)
    policy = trust_policy(settings, reference, verifying=True)
    async with open_registry(settings) as client:
        model, offline = await fetch_or_cached(client, existing_cache(settings), reference, trust=policy.listing())
    warn_offline(offline)
    verdict = model.verdict
    print(f"{model.reference}:", *(f"  {line}" for line in signing.listing(verdict)), sep="\n")
    if not verdict.met:
        raise SignatureError(verdict.refusal())
    print(f"Verified {model.reference}: {verdict.summary()}")
    return 0


async def cmd_sign(args: argparse.Namespace) -> int:
    """The model's manifest digest signed with a private key, the signature attached as a
    referrer (cosign-compatible), written to the registry itself, never a mirror."""
    from ..signing.keys import load_private
    from ..signing.sign import sign

    reference = parse(args.reference)
    password = sys.stdin.readline().rstrip("\n").encode() if args.password_stdin else None
    key = load_private(args.private_key, password)
    async with open_writer(settings_for(args, reference.registry)) as client:
        model = await fetch_model(client, reference)
        result = await sign(client, model, key)
    print(f"Signed {model.reference} with {key.public().describe()}: referrer {result.referrer}")
    return 0
