"""``build``, ``ls``, ``rm`` and ``tag``: the local OCI image layout (``--store``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..artifact.layout import Store
from ..formats.spec import OCI_MANIFEST, Packing
from ..reference import parse


async def cmd_build(args: argparse.Namespace) -> int:
    from ..artifact.build import build  # hashing and the block index: only build needs them, not ls, rm, tag

    reference = parse(args.tag)
    modelfile = args.file or os.path.join(args.context, "Modelfile")
    store = Store(args.store)
    with store.locked(exclusive=False):  # `modelfs rm` elsewhere must not collect blobs not yet named
        result = build(args.context, modelfile, str(reference), store, Packing(args.packing),
                       block_index=not args.no_block_index)
    for path in result.unmatched:
        print(f"warning: {path} is matched by no Modelfile command and is not included", file=sys.stderr)
    total = sum(layer.size for layer in result.layers)
    print(f"Built {reference} ({len(result.layers)} layers, {total / 1e6:,.1f} MB): {result.manifest_digest}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """Models in the local store (what ``build`` made, ready to ``push``)."""
    entries = Store(args.store).entries()
    if args.json:
        print(json.dumps([{"reference": r, "digest": d, "size": n} for r, d, n in entries], indent=2))
        return 0
    if not entries:
        print(f"No models in the local store {args.store}")
    for reference, digest, size in sorted(entries):
        print(f"{reference:<60} {digest[7:19]}  {size / 1e6:>12,.1f} MB")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = Store(args.store)
    for reference in args.references:
        removed = store.untag(str(parse(reference)))
        print(f"Untagged {reference} ({removed.digest})")
    print(f"Deleted {store.collect_garbage() / 1e6:,.1f} MB of blobs no model in {args.store} needs any more")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = Store(args.store)
    source, target = str(parse(args.source)), str(parse(args.target))
    found = store.resolve(source)
    manifest = store.read_blob(found.digest)
    store.tag(target, manifest, json.loads(manifest).get("mediaType", OCI_MANIFEST))
    print(f"Tagged {source} as {target} ({found.digest})")
    return 0
