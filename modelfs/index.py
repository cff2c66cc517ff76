"""Layers to a file tree: every file knows (blob, offset, size), every path is safe.

- raw layers: the blob is the file, named by ``org.cncf.model.filepath``;
- tar layers: members located by reading headers only (:mod:`modelfs.tarindex`);
- tar+gzip / tar+zstd layers: no random access, so the compressed blob is fetched into the
  cache, checked, and each member is unpacked into a cache entry of its own ("derived"
  entries, keyed by the layer digest and member path).

Listing and stat are answered from this tree, never from the registry.
"""

from __future__ import annotations

import hashlib
import io
import logging
import stat
import tarfile
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

import trio

from .errors import ManifestError, UnsafePathError
from .fetcher import BlobReader, Fetcher
from .resolve import Model
from .spec import Descriptor, Packing, classify_layer
from .paths import clean_member_path
from .tarindex import DIRECTORY, HARDLINK, REGULAR, SYMLINK, check_tarinfo, index_tar

log = logging.getLogger(__name__)

ROOT_INODE = 1


@dataclass
class Node:
    inode: int
    name: str
    kind: str  # "dir" | "file" | "symlink"
    mode: int
    mtime_ns: int
    size: int = 0
    reader: BlobReader | None = None
    offset: int = 0
    layer: Descriptor | None = None
    link: str = ""
    children: dict[str, int] = field(default_factory=dict)
    parent: int = ROOT_INODE


class Tree:
    def __init__(self, mtime_ns: int) -> None:
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", DIRECTORY, 0o755, mtime_ns)}
        self._origin: dict[str, str] = {}
        self.mtime_ns = mtime_ns

    def _directory(self, parts: list[str], where: str) -> Node:
        node = self.nodes[ROOT_INODE]
        for part in parts:
            child = node.children.get(part)
            if child is None:
                new = Node(len(self.nodes) + 1, part, DIRECTORY, 0o755, self.mtime_ns, parent=node.inode)
                self.nodes[new.inode] = new
                node.children[part] = new.inode
                node = new
            else:
                node = self.nodes[child]
                if node.kind != DIRECTORY:
                    raise UnsafePathError(f"{where}: {'/'.join(parts)} is both a file and a directory")
        return node

    def add(self, path: str, where: str, **attrs: object) -> Node:
        parts = path.split("/")
        parent = self._directory(parts[:-1], where)
        if parts[-1] in parent.children:
            raise UnsafePathError(f"{where}: duplicate path {path!r} (also in {self._origin.get(path, 'another layer')})")
        node = Node(len(self.nodes) + 1, parts[-1], parent=parent.inode, **attrs)  # type: ignore[arg-type]
        self.nodes[node.inode] = node
        parent.children[parts[-1]] = node.inode
        self._origin[path] = where
        return node

    def files(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == REGULAR]

    def readers(self) -> list[BlobReader]:
        seen: dict[str, BlobReader] = {}
        for node in self.files():
            if node.reader is not None:
                seen.setdefault(node.reader.digest, node.reader)
        return list(seen.values())


def _metadata_mode(layer: Descriptor) -> tuple[int, int | None]:
    meta = layer.file_metadata or {}
    mode = meta.get("mode")
    mtime = meta.get("mtime")
    mtime_ns = None
    if isinstance(mtime, str):
        try:
            mtime_ns = int(datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp() * 1e9)
        except ValueError:
            mtime_ns = None
    return (stat.S_IMODE(mode) & 0o777 if isinstance(mode, int) else 0o644), mtime_ns


async def build_tree(model: Model, fetcher: Fetcher) -> Tree:
    created = model.config.descriptor.get("createdAt")
    mtime_ns = 0
    if isinstance(created, str):
        try:
            mtime_ns = int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() * 1e9)
        except ValueError:
            pass
    tree = Tree(mtime_ns)
    for number, layer in enumerate(model.manifest.layers):
        where = f"layer {number} ({layer.digest[:19]}, {layer.filepath or layer.media_type})"
        classified = classify_layer(layer.media_type)
        packing = classified[1] if classified else None
        if packing is None:
            if not layer.filepath:
                raise ManifestError(f"{where}: unknown media type {layer.media_type!r} and no file path; refusing it")
            log.warning("%s: unknown media type %s, served as a plain file", where, layer.media_type)
            packing = Packing.RAW
        reader = fetcher.reader(layer.digest, layer.size)
        mode, meta_mtime = _metadata_mode(layer)
        if packing is Packing.RAW:
            if not layer.filepath:
                raise ManifestError(f"{where}: raw layer has no org.cncf.model.filepath annotation")
            path = clean_member_path(layer.filepath, where)
            tree.add(path, where, kind=REGULAR, mode=mode, mtime_ns=meta_mtime or mtime_ns, size=layer.size,
                     reader=reader, offset=0, layer=layer)
        elif packing is Packing.TAR:
            members = await index_tar(reader.read, layer.size, where)
            _add_members(tree, members, reader, layer, where, lambda m: reader)
        else:
            await _unpack_compressed(tree, fetcher, reader, layer, packing, where)
    return tree


def _add_members(tree: Tree, members: list, reader: BlobReader, layer: Descriptor, where: str,
                 reader_for: Callable[[object], BlobReader]) -> None:
    by_path = {}
    for member in members:
        member_where = f"{where}, member {member.path!r}"
        if member.kind == DIRECTORY:
            tree._directory(member.path.split("/"), member_where)
            continue
        if member.kind == SYMLINK:
            tree.add(member.path, member_where, kind=SYMLINK, mode=0o777, mtime_ns=member.mtime * 10**9, link=member.link)
            continue
        source = by_path[member.link] if member.kind == HARDLINK else member
        tree.add(member.path, member_where, kind=REGULAR, mode=source.mode or 0o644, mtime_ns=member.mtime * 10**9,
                 size=source.size, reader=reader_for(source), offset=source.offset, layer=layer)
        by_path[member.path] = source


@dataclass(frozen=True)
class _Unpacked:
    path: str
    kind: str
    offset: int
    size: int
    mode: int
    mtime: int
    link: str
    digest: str


def derived_key(layer_digest: str, path: str) -> str:
    """Cache key of a member unpacked from a compressed layer."""
    return "sha256:" + hashlib.sha256(f"{layer_digest}\0{path}".encode()).hexdigest()


async def _unpack_compressed(tree: Tree, fetcher: Fetcher, reader: BlobReader, layer: Descriptor,
                             packing: Packing, where: str) -> None:
    await fetcher.prefetch([reader])
    if not reader.entry.verified:
        ok = await trio.to_thread.run_sync(reader.entry.verify)
        if not ok:
            raise ManifestError(f"{where}: blob does not match its digest")
    unpacked = await trio.to_thread.run_sync(_unpack, fetcher, reader, layer, packing, where)
    by_path: dict[str, _Unpacked] = {}
    for member in unpacked:
        member_where = f"{where}, member {member.path!r}"
        if member.kind == DIRECTORY:
            tree._directory(member.path.split("/"), member_where)
        elif member.kind == SYMLINK:
            tree.add(member.path, member_where, kind=SYMLINK, mode=0o777, mtime_ns=member.mtime * 10**9, link=member.link)
        else:
            source = by_path[member.link] if member.kind == HARDLINK else member
            by_path[member.path] = source
            tree.add(member.path, member_where, kind=REGULAR, mode=source.mode or 0o644, mtime_ns=member.mtime * 10**9,
                     size=source.size, reader=fetcher.reader(source.digest, source.size), offset=0, layer=layer)


class _EntryFile(io.RawIOBase):
    """A sync file view of a complete cache entry, for tarfile running in a worker thread."""

    def __init__(self, reader: BlobReader) -> None:
        self.entry, self.pos = reader.entry, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self.pos >= self.entry.size:
            return 0
        bs = self.entry.block_size
        index, start = divmod(self.pos, bs)
        block = self.entry.read_block(index)[start:]
        n = min(len(buffer), len(block))
        buffer[:n] = block[:n]
        self.pos += n
        return n


def _open_decompressed(reader: BlobReader, packing: Packing) -> io.BufferedIOBase:
    raw = io.BufferedReader(_EntryFile(reader), buffer_size=1 << 20)
    if packing is Packing.TAR_GZIP:
        import gzip
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    try:
        import zstandard
    except ImportError:
        raise ManifestError("tar+zstd layers need the 'zstandard' package (pip install zstandard)") from None
    return zstandard.ZstdDecompressor().stream_reader(raw)  # type: ignore[return-value]


def _copy_member(entry, tar: tarfile.TarFile, info: tarfile.TarInfo, where: str) -> None:
    if entry.verified:
        return
    source = tar.extractfile(info)
    assert source is not None
    for index in range(entry.nblocks):
        data = source.read(entry.block_length(index))
        if len(data) != entry.block_length(index):
            raise ManifestError(f"{where}: member is truncated")
        if not entry.has(index):
            entry.write_block(index, data)
    entry.mark_verified()  # the layer it came from was checked against its digest


def _unpack(fetcher: Fetcher, reader: BlobReader, layer: Descriptor, packing: Packing, where: str) -> list[_Unpacked]:
    """Runs in a worker thread: decompress, check each member, copy files into derived entries."""
    out: list[_Unpacked] = []
    seen: set[str] = set()
    try:
        stream = _open_decompressed(reader, packing)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                checked = check_tarinfo(info, seen, where)
                if checked is None:
                    continue
                path, kind, link = checked
                if kind == REGULAR:
                    key = derived_key(layer.digest, path)
                    _copy_member(fetcher.cache.entry(key, info.size), tar, info, f"{where}, member {path!r}")
                else:
                    key = ""
                out.append(_Unpacked(path, kind, 0, info.size if kind == REGULAR else 0, info.mode & 0o777,
                                     int(info.mtime), link, key))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ManifestError(f"{where}: cannot unpack: {exc}") from None
    return out
