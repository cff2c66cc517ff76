"""``inspect``, ``pull`` and ``extract``: a model resolved (from the registry, or as recorded
in the cache while it cannot be reached) and read, with parts from :mod:`modelfs.compose`."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence

import trio

from .. import signing
from ..artifact.extract import extract
from ..compose import existing_cache, model_view, open_registry, open_session, trust_policy
from ..errors import CacheError, ModelfsError, UnavailableError
from ..formats import blockindex
from ..formats.blockindex import BlockIndex
from ..formats.spec import Descriptor
from ..formats.view import View
from ..mount.binding import FileReaders, check_signed_files
from ..mount.fetcher import BlobReader, Fetcher
from ..mount.tree import build_tree, listed_by_streaming
from ..mount.viewblocks import ViewBlocks, settle_blocks
from ..reference import parse
from ..registry import RegistryReader
from ..resolve import Model, describe, fetch_or_cached, held_whole, record, recorded_index, trusted_index
from ..storage.cache import BlockCache
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
    """Every blob of the model (of its view, with ``--include`` / ``--exclude``: of a plain tar
    the manifest's index covers, only the blocks the view needs, :mod:`~modelfs.mount.viewblocks`)
    into the block cache, fetched as a mount fetches (the same policy: ``timeout``, ``workers``,
    ``verify``, and the signature policy), then every block read back and checked."""
    reference = parse(args.reference)
    settings = settings_for(args, reference.registry, reference.repository)
    view = model_view(settings)
    async with open_session(settings, reference) as session:
        found = await session.resolve()
        model = found.model
        async with trio.open_nursery() as nursery:
            fetcher = session.fetcher(nursery, found.index)
            try:
                if found.offline is not None and not view.everything:  # listing them must not try the network
                    _require_held(session.cache, model, [layer for layer in model.manifest.layers
                                                         if listed_by_streaming(layer)], found.offline)
                layers, needs = await _view_layers(model, fetcher, view)
                readers = [fetcher.reader(layer.digest, layer.size) for layer in layers]
                if found.offline is not None:  # nothing to fetch if every blob is here and checked; else say why not
                    _require_held(session.cache, model, layers, found.offline,
                                  {reader.digest: needs.of(reader) for reader in readers} if needs else None)
                    warn_offline(found.offline)
                    await check_signed_files(model, fetcher, view)  # its signed files still checked, from the cache
                    print(f"Pulled {model.reference} into {settings.cache_dir} (already complete there)")
                    return 0
                progress = Progress(sum(needs.bytes(r) if needs else r.size for r in readers), f"pull {reference}")
                read_back: dict[str, set[int]] = {reader.digest: set() for reader in readers}

                async def landed(reader: BlobReader, blocks: list[int]) -> None:
                    # read back as each run lands, beside the runs still on the wire
                    await reader.read_back(blocks)
                    read_back[reader.digest].update(blocks)

                await fetcher.prefetch(readers, progress, progress.skip, landed, needs.of if needs else None)
                for reader in readers:
                    # every block (of a view: every block it needs) read back and checked, whatever the cache's flags say
                    blocks = needs.of(reader) if needs else None
                    settled = (await reader.settle(read_back[reader.digest]) if blocks is None
                               else await settle_blocks(reader, blocks, read_back[reader.digest]))
                    if not settled:
                        raise CacheError(f"blob {reader.digest} could not be stored whole and checked in "
                                         f"{settings.cache_dir} (see the errors above; is the disk full?)")
                await check_signed_files(model, fetcher, view)  # the mount's per-file signature checks, from the cache
                record(session.cache, model, found.index.data if found.index else b"")  # pulled: whole and checked
            finally:
                nursery.cancel_scope.cancel()  # nothing left to wait for: end the fetch tasks' nursery now
    progress.finish()
    print(f"Pulled {model.reference} into {settings.cache_dir}")
    return 0


def _require_held(cache: BlockCache, model: Model, layers: list[Descriptor], offline: str,
                  blocks: Mapping[str, Sequence[int] | None] | None = None) -> None:
    """Offline, every blob of ``layers`` (of each, the ``blocks`` a view needs) checked in the
    cache, or one line naming those that are not (a wider view than the one pulled is the
    likely cause)."""
    missing = [layer for layer in layers if not held_whole(cache, model, [layer], blocks)]
    if missing:
        raise UnavailableError(f"{offline}; not in the cache: {_blobs(missing)}, so it cannot be pulled until the "
                               "registry answers")


def _blobs(layers: list[Descriptor]) -> str:
    """Blobs named for one line: their files where an annotation says, else their digests."""
    names = [layer.filepath or layer.digest[:19] for layer in layers]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{len(names)} blob{'s' if len(names) > 1 else ''} ({', '.join(names[:3])}{more})"


async def _view_layers(model: Model, fetcher: Fetcher, view: View) -> tuple[list[Descriptor], ViewBlocks | None]:
    """The layers a pull of ``view`` fetches, and the blocks of each it needs (None: all of
    every one): every layer without a view; else the tree is built and checked over all
    layers, as a mount builds it, cut to the view, and its layers taken (of a plain tar a
    trusted index vouches for, only the blocks of the view's members and of its headers).
    A compressed layer only streaming can list is fetched whole first, so listing streams it
    from the cache (streamed from the registry, then fetched for the cache, it cost twice)."""
    if view.everything:
        return list(model.manifest.layers), None
    await fetcher.prefetch([fetcher.reader(layer.digest, layer.size) for layer in model.manifest.layers
                            if listed_by_streaming(layer)])
    tree = await build_tree(model, FileReaders(fetcher), view)
    needs = ViewBlocks(tree, fetcher.cache.block_size)
    fetcher.confine(needs.confine)
    return tree.layers(), needs


async def cmd_extract(args: argparse.Namespace) -> int:
    reference = parse(args.reference)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ModelfsError(f"--output {args.output} is a file; name a directory (it is created if missing)")
    settings = settings_for(args, reference.registry, reference.repository)
    view = model_view(settings)  # a bad view refused before the registry is asked
    cache = existing_cache(settings)
    async with open_registry(settings) as client:
        model, offline = await fetch_or_cached(client, cache, reference, trust=trust_policy(settings, reference))
        warn_offline(offline)
        index = None if view.everything else await _named_index(client, cache, model, offline)
        result = await extract(client, model, args.output, cache, view, index)
    print(f"Extracted {len(result.files)} files of {model.reference} to {args.output}")
    return 0


async def _named_index(client: RegistryReader, cache: BlockCache | None, model: Model,
                       offline: str | None) -> BlockIndex | None:
    """The block index the manifest names (recorded beside the cache, offline), which lets
    ``extract`` of a view read a plain tar layer's members block by block; None without one
    (an index only attached at the registry counts only with the blob checked whole)."""
    if offline is not None:
        data = recorded_index(cache, model) if cache is not None else None
        return blockindex.decode(data) if data else None
    found = await trusted_index(client, model)
    return found.index if found is not None and found.vouched else None
