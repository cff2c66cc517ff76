"""``cache stats`` and ``cache prune``: the block cache shared by every mount and ``pull``."""

from __future__ import annotations

import argparse
import json
import time

from ..errors import ModelfsError
from ..storage.cache import BlockCache, prune


def cmd_cache_stats(args: argparse.Namespace) -> int:
    cache = BlockCache(args.cache_dir)
    usage = {u.digest: u for u in cache.usage()}
    models = cache.records.all()
    if args.json:
        print(json.dumps({"cache_dir": args.cache_dir, "models": [model.summary() for model in models],
                          "blobs": [u.__dict__ for u in usage.values()]}, indent=2))
        return 0
    disk = sum(u.disk_bytes for u in usage.values())
    cached = sum(u.cached_bytes for u in usage.values())
    print(f"Cache {args.cache_dir}: {len(usage)} blobs, {cached / 1e6:,.1f} MB cached, {disk / 1e6:,.1f} MB on disk")
    for model in models:
        blobs = [usage[layer.digest] for layer in model.layers if layer.digest in usage]
        size = sum(layer.size for layer in model.layers)
        have = sum(b.cached_bytes for b in blobs)
        print(f"  {model.reference} ({model.digest[:19]}): {have / 1e6:,.1f} of {size / 1e6:,.1f} MB cached"
              f" ({have / size if size else 1:.0%})")
    print(f"  {'blob':<19} {'size':>12} {'cached':>12} {'on disk':>12} {'lz4 saved':>10}  last used")
    for blob in sorted(usage.values(), key=lambda u: -u.last_used):
        saved = max(0, blob.cached_bytes - blob.disk_bytes)
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(blob.last_used))
        print(f"  {blob.digest[:19]} {blob.size:>12,} {blob.cached_bytes:>12,} {blob.disk_bytes:>12,} {saved:>10,}  {used}")
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    """Evict least recently used blobs (the eviction a mount's size limit runs too), even
    while models are mounted: a mount reading an evicted blob keeps valid bytes."""
    if not args.all and args.keep_size is None:
        raise ModelfsError("cache prune needs --all or --keep-size SIZE")
    cache = BlockCache(args.cache_dir)
    pruned = prune(cache, 0 if args.all else args.keep_size)
    forgotten = f"; forgot {cache.records.forget_all()} model records" if args.all else ""
    print(f"Freed {pruned.freed / 1e6:,.1f} MB; {pruned.left / 1e6:,.1f} MB left in {args.cache_dir}{forgotten}")
    return 0
