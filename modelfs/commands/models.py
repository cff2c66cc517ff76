"""``inspect``, ``pull`` and ``extract``: a model resolved (from the registry, or as recorded
in the cache while it cannot be reached) and read, with parts from :mod:`modelfs.compose`."""

from __future__ import annotations

import argparse
import json
import os

import trio

from .. import signing
from ..artifact.extract import extract
from ..compose import existing_cache, open_registry, open_session, trust_policy
from ..errors import CacheError, ModelfsError, UnavailableError
from ..mount.fetcher import BlobReader
from ..reference import parse
from ..resolve import describe, fetch_or_cached, held_whole, record
from .base import settings_for, warn_offline
from .output import Progress, label_column


async def cmd_inspect(args: argparse.Namespace) -> int:
    """The model's manifest and config; the signatures attached are listed and checked against
    the policy, which refuses nothing here (``verify`` does)."""
    reference = parse(args.reference)
    settings = settings_for(args, reference.registry, reference.repository)
    async with open_registry(settings) as client:
        model, offline = await fetch_or_cached(client, existing_cache(settings), reference,
                                               trust=trust_policy(settings, reference).listing())
    warn_offline(offline)
    doc = describe(model)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    config = doc["config"].get("config", {})
    descriptor = doc["config"].get("descriptor", {})
    fields = (("Reference", model.reference), ("Name", descriptor.get("name")), ("Family", descriptor.get("family")),
              ("Architecture", config.get("architecture")), ("Format", config.get("format")),
              ("Param size", config.get("paramSize")), ("Precision", config.get("precision")),
              ("Quantization", config.get("quantization")), ("Created", descriptor.get("createdAt")))
    for line in label_column([(label, str(value)) for label, value in fields if value]):
        print(line)
    print(f"Layers ({len(model.manifest.layers)}, {sum(layer.size for layer in model.manifest.layers) / 1e6:,.1f} MB):")
    for layer in model.manifest.layers:
        print(f"  {layer.digest[7:19]}  {layer.size:>14,}  {layer.media_type.rsplit('.model.', 1)[-1]:<22} {layer.filepath or ''}")
    if model.verdict is not None:
        print("Signatures:", *(f"  {line}" for line in signing.listing(model.verdict)), sep="\n")
    return 0


async def cmd_pull(args: argparse.Namespace) -> int:
    """Every blob of the model into the block cache, fetched as a mount fetches (the same
    policy: ``timeout``, ``workers``, ``verify``, and the signature policy), then every block
    read back and checked."""
    reference = parse(args.reference)
    settings = settings_for(args, reference.registry, reference.repository)
    async with open_session(settings, reference) as session:
        found = await session.resolve()
        model = found.model
        if found.offline is not None:  # nothing to fetch if every blob is here and checked; else say why not
            if not held_whole(session.cache, model):
                raise UnavailableError(f"{found.offline}; not every blob of it is in the cache, so it cannot be "
                                       "pulled until the registry answers")
            warn_offline(found.offline)
            print(f"Pulled {model.reference} into {settings.cache_dir} (already complete there)")
            return 0
        progress = Progress(sum(layer.size for layer in model.manifest.layers), f"pull {reference}")
        async with trio.open_nursery() as nursery:
            fetcher = session.fetcher(nursery, found.index)
            readers = [fetcher.reader(layer.digest, layer.size) for layer in model.manifest.layers]
            record(session.cache, model, found.index.data if found.index else b"")
            try:
                read_back: dict[str, set[int]] = {reader.digest: set() for reader in readers}

                async def landed(reader: BlobReader, blocks: list[int]) -> None:
                    # read back as each run lands, beside the runs still on the wire
                    await reader.read_back(blocks)
                    read_back[reader.digest].update(blocks)

                await fetcher.prefetch(readers, progress, progress.skip, landed)
                for reader in readers:
                    # every block read back and checked, whatever the cache's flags say
                    if not await reader.settle(read_back[reader.digest]):
                        raise CacheError(f"blob {reader.digest} could not be stored whole and checked in "
                                         f"{settings.cache_dir} (see the errors above; is the disk full?)")
            finally:
                nursery.cancel_scope.cancel()  # nothing left to wait for: end the fetch tasks' nursery now
    progress.finish()
    print(f"Pulled {model.reference} into {settings.cache_dir}")
    return 0


async def cmd_extract(args: argparse.Namespace) -> int:
    reference = parse(args.reference)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ModelfsError(f"--output {args.output} is a file; name a directory (it is created if missing)")
    settings = settings_for(args, reference.registry, reference.repository)
    cache = existing_cache(settings)
    async with open_registry(settings) as client:
        model, offline = await fetch_or_cached(client, cache, reference, trust=trust_policy(settings, reference))
        warn_offline(offline)
        result = await extract(client, model, args.output, cache)
    print(f"Extracted {len(result.files)} files of {model.reference} to {args.output}")
    return 0
