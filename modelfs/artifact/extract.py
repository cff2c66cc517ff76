"""``modelfs extract``: write a model's files under ``--output``, and nowhere else.

Each blob is streamed to a temporary file inside the output directory while being hashed;
only a blob whose sha256 matches its digest is moved into place (raw) or unpacked (tar).
Blobs the cache already holds whole and verified are read from it instead of the network.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field

import trio

from ..errors import CacheError, IntegrityError, ManifestError, UnsafePathError
from ..mount.cache import BlobEntry, BlockCache, BlockDamaged
from ..mount.tarindex import DIRECTORY, HARDLINK, SYMLINK, check_tarinfo
from ..paths import clean_member_path, link_chain_inside, safe_join
from ..registry import RegistryReader
from ..resolve import Model
from ..spec import Descriptor, Packing, classify_layer
from ..zstd import ZstdError, ZstdFile

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    files: list[str] = field(default_factory=list)
    bytes_from_registry: int = 0
    bytes_from_cache: int = 0


def _copy_from_cache(entry: BlobEntry, out, where: str) -> hashlib._Hash | None:
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
                    path: str, result: ExtractResult, where: str) -> None:
    """The blob into ``path``, from the cache if it holds it whole and it checks out (whatever
    flags say), else from the registry; either way hashed here against its digest."""
    entry = cache.entry(layer.digest, layer.size) if cache else None
    with open(path, "wb") as out:
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
        hasher, size = hashlib.sha256(), 0
        async with client.stream_blob(repository, layer.digest) as response:
            async for chunk in response.aiter_raw():
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)
                if size > layer.size:
                    raise IntegrityError(f"{where}: blob is larger than the {layer.size} bytes the manifest says")
        result.bytes_from_registry += size
    if size != layer.size or "sha256:" + hasher.hexdigest() != layer.digest:
        raise IntegrityError(f"{where}: blob {layer.digest} has {size} bytes not matching its digest "
                             f"(manifest says {layer.size} bytes); nothing written")


def _place(tmp: str, output: str, relpath: str, where: str, mode: int | None) -> str:
    target = safe_join(output, relpath, where)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(target):
        os.unlink(target)
    os.replace(tmp, target)
    os.chmod(target, mode if mode is not None else 0o644)
    return target


def _untar(blob_path: str, packing: Packing, output: str, where: str, result: ExtractResult) -> None:
    """Unpack into a staging directory inside ``output`` and move the members into place only
    once the whole layer has unpacked: a layer found corrupt or hostile halfway leaves nothing."""
    staging = tempfile.mkdtemp(dir=output, prefix=".modelfs-layer-")
    try:
        for path, kind in _unpack(blob_path, packing, staging, where):
            target = _make_room(output, path, kind, f"{where}, member {path!r}")
            if target is not None:
                os.replace(os.path.join(staging, *path.split("/")), target)
                result.files.append(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_room(root: str, path: str, kind: str, where: str) -> str | None:
    """Where a member goes under ``root``, its parents made and any old entry removed; a
    directory member is simply made (None)."""
    target = safe_join(root, path, where)
    if kind == DIRECTORY:
        os.makedirs(target, exist_ok=True)
        return None
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.lexists(target):
        os.unlink(target)
    return target


def _unpack(blob_path: str, packing: Packing, root: str, where: str) -> list[tuple[str, str]]:
    """Every member of the layer written under ``root``; (path, kind) in tar order."""
    seen: set[str] = set()
    regular: set[str] = set()  # files this layer wrote: the only things a hard link may copy
    links: dict[str, str] = {}
    unpacked: list[tuple[str, str]] = []
    try:
        with open(blob_path, "rb") as raw, _decompressed(raw, packing) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                checked = check_tarinfo(info, seen, where)
                if checked is None:
                    continue
                path, kind, link = checked
                member_where = f"{where}, member {path!r}"
                unpacked.append((path, kind))
                target = _make_room(root, path, kind, member_where)
                if target is None:
                    continue
                if kind == SYMLINK:
                    links[path] = link
                    if not link_chain_inside(path, links):
                        raise UnsafePathError(f"{member_where}: symlink to {link!r} leaves the model tree once the "
                                              "links it goes through are followed")
                    os.symlink(link, target)
                elif kind == HARDLINK:
                    if link not in regular:
                        raise UnsafePathError(f"{member_where}: hard link to {link!r}, which is not a regular file "
                                              "of this layer; refusing it")
                    _copy_member(root, link, target, member_where)
                    regular.add(path)
                else:
                    source = tar.extractfile(info)
                    assert source is not None
                    with open(target, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                    os.chmod(target, info.mode & 0o755 or 0o644)
                    regular.add(path)
            while stream.read(1 << 20):  # past the tar's end: a cut or corrupt compressed stream is refused, as by the mount
                pass
    except EOFError:
        raise ManifestError(f"{where}: compressed stream ends early (truncated blob?)") from None
    except (gzip.BadGzipFile, zlib.error, ZstdError) as exc:
        raise ManifestError(f"{where}: corrupt compressed stream: {exc}") from None
    except tarfile.TarError as exc:
        raise ManifestError(f"{where}: cannot unpack: {exc}") from None
    return unpacked


def _copy_member(root: str, member: str, target: str, where: str) -> None:
    """A hard link becomes a copy of a file this layer wrote, read without following any
    link out of ``root``: the resolved source must be inside and be that regular file."""
    root_real = os.path.realpath(root)
    source = os.path.realpath(os.path.join(root_real, *member.split("/")))
    if not source.startswith(root_real + os.sep):
        raise UnsafePathError(f"{where}: hard link to {member!r} resolves outside the output directory")
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UnsafePathError(f"{where}: hard link to {member!r} cannot be copied: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise UnsafePathError(f"{where}: hard link to {member!r}, which is not a regular file")
        with open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def _decompressed(raw, packing: Packing):
    """The tar stream inside a layer. Concatenated gzip members and zstd frames are one stream,
    as Go's readers (modctl, containerd) treat them; tarfile's own "r|gz" stops after the first."""
    if packing is Packing.TAR_ZSTD:
        return ZstdFile(raw, mode="r")
    if packing is Packing.TAR_GZIP:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


async def extract(client: RegistryReader, model: Model, output: str, cache: BlockCache | None = None) -> ExtractResult:
    os.makedirs(output, exist_ok=True)
    result = ExtractResult()
    for number, layer in enumerate(model.manifest.layers):
        where = f"layer {number} ({layer.filepath or layer.digest})"
        classified = classify_layer(layer.media_type)
        packing = classified[1] if classified else (Packing.RAW if layer.filepath else None)
        if packing is None:
            raise ManifestError(f"{where}: unknown media type {layer.media_type!r} and no file path")
        if packing is Packing.RAW:
            if not layer.filepath:
                raise ManifestError(f"{where}: raw layer has no org.cncf.model.filepath annotation")
            clean_member_path(layer.filepath, where)
            safe_join(output, layer.filepath, where)
        fd, tmp = tempfile.mkstemp(dir=output, prefix=".modelfs-")
        os.close(fd)
        try:
            await _download(client, cache, model.reference.repository, layer, tmp, result, where)
            if packing is Packing.RAW:
                if layer.filepath is None:
                    raise ManifestError(f"{where}: a raw layer without a file path annotation")
                meta = layer.file_metadata or {}
                mode = meta.get("mode") if isinstance(meta.get("mode"), int) else None
                _place(tmp, output, layer.filepath, where, (mode & 0o755) if mode is not None else None)
                result.files.append(clean_member_path(layer.filepath, where))
            else:
                await trio.to_thread.run_sync(_untar, tmp, packing, output, where, result)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return result

