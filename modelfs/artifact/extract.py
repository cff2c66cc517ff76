"""``modelfs extract``: write a model's files under ``--output``, and nowhere else.

Each blob is streamed to a file in a staging directory inside ``--output`` while being
hashed; only a blob whose sha256 matches its digest becomes a file (raw) or is unpacked
(tar), into the staging directory (:mod:`modelfs.artifact.staging`). Every path goes through
the tree check the mount uses (:class:`modelfs.formats.tree_check.TreeCheck`), across all layers,
and nothing moves into ``--output`` before the whole tree passed it. Blobs the cache already
holds whole and verified are read from it instead of the network.

With a view (``--include`` / ``--exclude``, :mod:`modelfs.formats.view`) the whole tree is
still checked, and only the view's paths move into ``--output``: a raw layer outside it is
never downloaded; a plain tar layer whose blocks the block index the manifest names covers
is listed from its headers and only the view's members are read, by ranges, each block
checked against the index (:mod:`.tarblocks`); any other tar layer is read whole (its
member list is inside it), its members outside the view staged only until the end (a hard
link in the view may copy one).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

import httpx
import trio

from ..errors import CacheError, IntegrityError, ManifestError, SignatureError, UnsafePathError
from ..formats.blockindex import BlockIndex
from ..formats.paths import clean_member_path
from ..formats.spec import Descriptor, Packing, classify_layer
from ..formats.tarindex import Member, RangeSource, iter_members
from ..formats.tree_check import DIRECTORY, HARDLINK, REGULAR, SYMLINK, TreeCheck, layer_label, vet
from ..formats.view import View
from ..formats.zstd import ZstdError, ZstdFile
from ..registry import RegistryReader
from ..resolve import Model
from ..signing.filechecks import FileChecks
from ..storage.cache import BlockCache
from ..storage.entry import BlobEntry
from ..storage.store import BlockDamaged
from .staging import Staging, writing
from .tarblocks import CHUNK, CheckedBlocks, expected_hashes

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    files: list[str] = field(default_factory=list)
    bytes_from_registry: int = 0
    bytes_from_cache: int = 0


def _copy_from_cache(entry: BlobEntry, out: BinaryIO, where: str) -> hashlib._Hash | None:
    """Copy a complete cached blob into ``out``, every block checked as it is read back;
    None (and the damage dropped from the cache) if it does not read back whole."""
    hasher = hashlib.sha256()
    try:
        for index in range(entry.nblocks):
            block = entry.read_block(index)
            hasher.update(block)
            out.write(block)
    except BlockDamaged as exc:
        log.warning("%s: %s; fetching the blob from the registry instead", where, exc)
        entry.forget(index)
        return None
    except CacheError as exc:
        log.warning("%s: %s; fetching the blob from the registry instead", where, exc)
        return None
    return hasher


async def _download(client: RegistryReader, cache: BlockCache | None, repository: str, layer: Descriptor,
                    out: BinaryIO, result: ExtractResult, where: str) -> None:
    """The blob into ``out``, from the cache if it holds it whole and it checks out (whatever
    flags say), else from the registry; either way hashed here against its digest."""
    entry = cache.entry(layer.digest, layer.size) if cache else None
    if entry is not None and entry.complete:
        hasher = _copy_from_cache(entry, out, where)
        if hasher is not None and "sha256:" + hasher.hexdigest() == layer.digest:
            result.bytes_from_cache += layer.size
            return
        if hasher is not None:
            log.warning("%s: the cached copy does not match its digest; dropping it and fetching again", where)
            entry.clear()
        out.seek(0)
        out.truncate()
    # a blob that does not match (a mirror's: untrusted by design) makes the client leave its
    # mirrors out a while, and it is read once more, from the registry itself (README, "Trust")
    wrong = await _receive_blob(client, repository, layer, out, result, first_try=True)
    if wrong is not None:
        client.suspect(f"blob {layer.digest}")
        out.seek(0)
        out.truncate()
        wrong = await _receive_blob(client, repository, layer, out, result, first_try=False)
    if wrong is not None:
        raise IntegrityError(f"{where}: blob {layer.digest} {wrong}; nothing written")


async def _receive_blob(client: RegistryReader, repository: str, layer: Descriptor, out: BinaryIO,
                        result: ExtractResult, first_try: bool) -> str | None:
    """The blob streamed into ``out``, hashed as it comes; what is wrong with it, if anything
    (never more than the manifest's size is taken). ``first_try``: a connection that breaks
    mid-body only cuts the blob short (a mirror's: read again by :func:`_download`)."""
    hasher, size = hashlib.sha256(), 0
    try:
        async with client.stream_blob(repository, layer.digest) as response:
            async for chunk in response.aiter_raw():
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)
                if size > layer.size:
                    break
    except httpx.TransportError:
        if not first_try:
            raise
    result.bytes_from_registry += size
    if size > layer.size:
        return f"is larger than the {layer.size} bytes the manifest says"
    if size != layer.size or "sha256:" + hasher.hexdigest() != layer.digest:
        return f"has {size} bytes not matching its digest (manifest says {layer.size} bytes)"
    return None


def _check_tarinfo(info: tarfile.TarInfo, seen: set[str], where: str) -> tuple[str, str, str] | None:
    """Vet one member read by :mod:`tarfile`: (clean path, kind, link) or None."""
    if info.isdir():
        kind = DIRECTORY
    elif info.issym():
        kind = SYMLINK
    elif info.islnk():
        kind = HARDLINK
    elif info.isreg():
        kind = REGULAR
    else:
        raise UnsafePathError(f"{where}, member {info.name!r}: tar entry type {info.type!r} (device, fifo or unknown) refused")
    vetted = vet(info.name, kind, info.linkname, seen, where)
    return None if vetted is None else (vetted[0], kind, vetted[1])


def _unpack(staging: Staging, blob: str, packing: Packing, check: TreeCheck, where: str, result: ExtractResult,
            view: View) -> None:
    """Every member of a tar layer checked against the whole tree so far and staged, in one
    pass over the (decompressed) blob."""
    seen: set[str] = set()
    try:
        with staging.blob(blob) as raw, _decompressed(raw, packing) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                checked = _check_tarinfo(info, seen, where)
                if checked is None:
                    continue
                path, kind, link = checked
                member_where = f"{where}, member {path!r}"
                check.add(path, kind, member_where, where, link)
                with writing(member_where, staging.output):
                    _stage_member(staging, tar, info, path, kind, link)
                if kind != DIRECTORY and view.keeps(path):
                    result.files.append(path)
            while stream.read(1 << 20):  # past the tar's end: a cut or corrupt compressed stream is refused, as by the mount
                pass
    except EOFError:
        raise ManifestError(f"{where}: compressed stream ends early (truncated blob?)") from None
    except (gzip.BadGzipFile, zlib.error, ZstdError) as exc:
        raise ManifestError(f"{where}: corrupt compressed stream: {exc}") from None
    except tarfile.TarError as exc:
        raise ManifestError(f"{where}: cannot unpack: {exc}") from None
    except RecursionError:  # tarfile reads the header after each PAX header recursively
        raise ManifestError(f"{where}: cannot unpack: too many tar extended headers in a row") from None


def _stage_member(staging: Staging, tar: tarfile.TarFile, info: tarfile.TarInfo, path: str, kind: str, link: str) -> None:
    if kind == DIRECTORY:
        staging.directory(path)
    elif kind == SYMLINK:
        staging.symlink(path, link)
    elif kind == HARDLINK:
        staging.copy(link, path)
    else:
        source = tar.extractfile(info)
        assert source is not None
        with staging.new_file(path, info.mode & 0o755 or 0o644) as out:
            shutil.copyfileobj(source, out, 1 << 20)


def _decompressed(raw: BinaryIO, packing: Packing) -> BinaryIO:
    """The tar stream inside a layer. Concatenated gzip members and zstd frames are one stream,
    as Go's readers (modctl, containerd) treat them; tarfile's own "r|gz" stops after the first."""
    if packing is Packing.TAR_ZSTD:
        return ZstdFile(raw, mode="r")  # type: ignore[return-value]
    if packing is Packing.TAR_GZIP:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _packing(layer: Descriptor, where: str) -> Packing:
    classified = classify_layer(layer.media_type)
    packing = classified[1] if classified else (Packing.RAW if layer.filepath else None)
    if packing is None:
        raise ManifestError(f"{where}: unknown media type {layer.media_type!r} and no file path")
    return packing


async def _stage_layer(client: RegistryReader, cache: BlockCache | None, model: Model, number: int, staging: Staging,
                       check: TreeCheck, result: ExtractResult, view: View, index: BlockIndex | None = None) -> None:
    """One layer downloaded, verified and staged; a raw layer's path is checked against the
    tree before its blob is fetched, and outside the view it is not fetched at all. Of a
    plain tar layer ``index`` (one the manifest names) covers, a view takes only its members'
    blocks and the headers' (:mod:`.tarblocks`)."""
    layer = model.manifest.layers[number]
    where = layer_label(number, layer)
    packing = _packing(layer, where)
    path = None
    if packing is Packing.RAW:
        if not layer.filepath:
            raise ManifestError(f"{where}: raw layer has no org.cncf.model.filepath annotation")
        path = clean_member_path(layer.filepath, where)
        check.add(path, REGULAR, where)
        if not view.keeps(path):
            return
    expected = expected_hashes(index, layer) if packing is Packing.TAR and not view.everything else None
    if expected is not None and index is not None and not _cached_whole(cache, layer):
        blocks = CheckedBlocks(client, model.reference.repository, layer, expected, index.block_hash, index.block_size)
        if cache is not None and cache.block_size == index.block_size:
            blocks.entry = cache.entry(layer.digest, layer.size)  # blocks a pull of the view stored
        try:
            await _stage_tar_members(blocks, staging, check, result, view, where)
        finally:
            result.bytes_from_registry += blocks.fetched
            result.bytes_from_cache += blocks.from_cache
        return
    blob = f"blob-{number}"
    with writing(where, staging.output):
        with staging.blob(blob, write=True) as out:
            await _download(client, cache, model.reference.repository, layer, out, result, where)
        if path is not None:
            meta = layer.file_metadata or {}
            mode = meta.get("mode") if isinstance(meta.get("mode"), int) else None
            staging.adopt(blob, path, (mode & 0o755 or 0o644) if mode is not None else 0o644)
            result.files.append(path)
            return
    try:
        await trio.to_thread.run_sync(_unpack, staging, blob, packing, check, where, result, view)
    finally:
        staging.drop_blob(blob)


def _cached_whole(cache: BlockCache | None, layer: Descriptor) -> bool:
    """The cache holds the blob complete: read from it whole (no network), as before."""
    return cache is not None and cache.entry(layer.digest, layer.size).complete


async def _stage_tar_members(blocks: CheckedBlocks, staging: Staging, check: TreeCheck, result: ExtractResult,
                             view: View, where: str) -> None:
    """A plain tar layer listed from its headers (as the mount lists it: every member
    vetted and checked against the whole tree), and only the view's members staged as they
    come, their bytes read by ranges, every block checked against the index. A kept hard
    link to a member outside the view gets that member's bytes."""
    regular: dict[str, Member] = {}  # path -> the regular member its bytes are (a hard link: its source's)
    staged: set[str] = set()
    async for member in iter_members(RangeSource(blocks.read), where, blocks.layer.size):
        member_where = f"{where}, member {member.path!r}"
        check.add(member.path, member.kind, member_where, where, member.link)
        kept = member.kind != DIRECTORY and view.keeps(member.path)
        with writing(member_where, staging.output):
            if member.kind == DIRECTORY:
                staging.directory(member.path)
            elif member.kind == SYMLINK:
                staging.symlink(member.path, member.link)
            else:
                source = regular[member.link] if member.kind == HARDLINK else member
                regular[member.path] = source
                if kept and source.path in staged:
                    staging.copy(source.path, member.path)
                elif kept:
                    await _stage_bytes(blocks, staging, member.path, source)
                if kept:
                    staged.add(member.path)
        if kept:
            result.files.append(member.path)


async def _stage_bytes(blocks: CheckedBlocks, staging: Staging, path: str, source: Member) -> None:
    """A file of ``source``'s bytes, read by ranges in chunks, each block checked."""
    with staging.new_file(path, source.mode & 0o755 or 0o644) as out:
        for at in range(0, source.size, CHUNK):
            out.write(await blocks.read(source.offset + at, min(CHUNK, source.size - at)))


def _check_signed(checks: FileChecks, staging: Staging, check: TreeCheck, files: list[str]) -> None:
    """The signature checks no layer digest stands for (a file in a tar layer, another hash,
    shards: :mod:`modelfs.signing.filechecks`), run on the staged files before anything moves
    into ``--output``: a file that differs refuses the model under enforce (SignatureError)."""
    # the whole artifact is judged (a statement signs the model, not a view of it); only the
    # files staged for the view are read
    listing: dict[str, int | None] = {path: None for path, kind in check.kinds().items() if kind == REGULAR}
    sizes: dict[str, int] = {}
    for path in files:
        if check.kind(path) == REGULAR:
            with staging.staged_file(path) as handle:
                sizes[path] = os.fstat(handle.fileno()).st_size
    checks.judge_listing(listing | sizes)
    for path, size in sizes.items():
        shards = checks.shards(path)
        if not shards:
            continue
        with staging.staged_file(path) as handle:
            for shard in shards:
                start, end = shard.span(size)
                handle.seek(start)
                hasher = shard.hasher()
                while start < end:
                    chunk = handle.read(min(1 << 20, end - start))
                    if not chunk:
                        break
                    hasher.update(chunk)
                    start += len(chunk)
                if hasher.hexdigest() == shard.digest:
                    continue
                line = checks.mismatch(path, shard, size)
                if checks.enforcing:
                    raise SignatureError(line)
                log.warning("signatures = warn: extracting anyway: %s", line)
                break


def _make_output(output: str) -> list[str]:
    """``--output`` and its missing parents made; those made, deepest first (removed again
    if the model is refused: --output is left as it was)."""
    missing: list[str] = []
    path = os.path.abspath(output)
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    made: list[str] = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        made.append(directory)
    return made[::-1]


def _unmake(made: list[str]) -> None:
    """Remove the directories :func:`_make_output` made, deepest first, if still empty."""
    for directory in made:
        try:
            os.rmdir(directory)
        except OSError:
            return


async def extract(client: RegistryReader, model: Model, output: str, cache: BlockCache | None = None,
                  view: View | None = None, index: BlockIndex | None = None) -> ExtractResult:
    """Every layer staged, the whole tree checked (the mount's check), then the view of it
    moved into ``--output`` at once: a refused model leaves ``--output`` as it was."""
    view = view or View()
    with writing("a staging directory", output):
        made = _make_output(output)
        try:
            staging = Staging(output)
        except BaseException:
            _unmake(made)
            raise
    try:
        result, check = ExtractResult(), TreeCheck()
        for number in range(len(model.manifest.layers)):
            await _stage_layer(client, cache, model, number, staging, check, result, view, index)
        check.finish()
        if model.verdict is not None and model.verdict.file_checks is not None:
            await trio.to_thread.run_sync(_check_signed, model.verdict.file_checks, staging, check, result.files)
        with writing("the model's files", output):
            await trio.to_thread.run_sync(staging.commit, check, view.select(check.kinds()))
    except BaseException:
        staging.discard()  # not awaited: it must run when the command is cancelled (Ctrl-C) too
        _unmake(made)
        raise
    staging.discard()
    return result
