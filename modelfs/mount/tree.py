"""Layers to a file tree: every file knows (blob, offset, size), every path is safe.

- raw layers: the blob is the file, named by ``org.cncf.model.filepath``;
- tar layers: members located by reading headers only (:mod:`modelfs.mount.tarindex`);
- tar+gzip / tar+zstd layers: no random access, so the blob is streamed once and each
  member lands in a cache entry of its own as it is decompressed (:mod:`modelfs.mount.stream`).

Listing and stat are answered from this tree, never from the registry.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ..errors import ManifestError, UnsafePathError
from ..paths import clean_member_path, link_chain_inside
from ..resolve import Model
from ..spec import Descriptor, Packing, classify_layer
from .fetcher import BlobReader, Fetcher
from .stream import LayerStream
from .tarindex import DIRECTORY, HARDLINK, REGULAR, SYMLINK, Member, index_tar

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


def seconds_to_ns(seconds: float) -> int:
    """A timestamp from an artifact as nanoseconds that fit a signed 64-bit stat field (a
    hostile GNU base-256 mtime of 2**80 must not reach the kernel as an overflow)."""
    return max(0, min(int(seconds * 10**9), 2**63 - 1))


MAX_NODES = 1_000_000  # files, links and directories; real models have thousands


class Tree:
    def __init__(self, mtime_ns: int, max_nodes: int = MAX_NODES) -> None:
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", DIRECTORY, 0o755, mtime_ns)}
        self._origin: dict[str, str] = {}
        self.symlinks: dict[str, str] = {}  # path -> target, to check whole chains once complete
        self.mtime_ns = mtime_ns
        self.max_nodes = max_nodes

    def _new_inode(self, where: str) -> int:
        """The next inode number; a hostile tar of millions of empty members stops here, not at OOM."""
        if len(self.nodes) >= self.max_nodes:
            raise ManifestError(f"{where}: the model has over {self.max_nodes:,} files and directories; refusing it")
        return len(self.nodes) + 1

    def _directory(self, parts: list[str], where: str) -> Node:
        node = self.nodes[ROOT_INODE]
        for depth, part in enumerate(parts, 1):
            child = node.children.get(part)
            if child is None:
                new = Node(self._new_inode(where), part, DIRECTORY, 0o755, self.mtime_ns, parent=node.inode)
                self.nodes[new.inode] = new
                node.children[part] = new.inode
                node = new
            else:
                node = self.nodes[child]
                if node.kind != DIRECTORY:
                    raise UnsafePathError(f"{where}: {'/'.join(parts[:depth])} is both a file and a directory")
        return node

    def add(self, path: str, where: str, **attrs: object) -> Node:
        parts = path.split("/")
        parent = self._directory(parts[:-1], where)
        existing = parent.children.get(parts[-1])
        if existing is not None and self.nodes[existing].kind == DIRECTORY:
            raise UnsafePathError(f"{where}: {path} is both a file and a directory")
        if existing is not None:
            raise UnsafePathError(f"{where}: duplicate path {path!r} (also in {self._origin.get(path, 'another layer')})")
        node = Node(self._new_inode(where), parts[-1], parent=parent.inode, **attrs)  # type: ignore[arg-type]
        self.nodes[node.inode] = node
        parent.children[parts[-1]] = node.inode
        self._origin[path] = where
        if node.kind == SYMLINK:
            self.symlinks[path] = node.link
        return node

    def check_links(self) -> None:
        """Refuse any symlink that leaves the tree once whole chains are followed (a link
        through another link's ``..``); each link alone was checked when it was added."""
        for path in self.symlinks:
            if not link_chain_inside(path, self.symlinks):
                raise UnsafePathError(f"{self._origin[path]}: symlink {path!r} -> {self.symlinks[path]!r} leaves the "
                                      "model tree once the links it goes through are followed")

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
            mtime_ns = seconds_to_ns(datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp())
        except (ValueError, OverflowError):
            mtime_ns = None
    return (stat.S_IMODE(mode) & 0o777 if isinstance(mode, int) else 0o644), mtime_ns


async def build_tree(model: Model, fetcher: Fetcher) -> Tree:
    created = model.config.descriptor.get("createdAt")
    mtime_ns = 0
    if isinstance(created, str):
        try:
            mtime_ns = seconds_to_ns(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
        except (ValueError, OverflowError):
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
        mode, meta_mtime = _metadata_mode(layer)
        if packing is Packing.RAW:
            if not layer.filepath:
                raise ManifestError(f"{where}: raw layer has no org.cncf.model.filepath annotation")
            path = clean_member_path(layer.filepath, where)
            tree.add(path, where, kind=REGULAR, mode=mode, mtime_ns=meta_mtime or mtime_ns, size=layer.size,
                     reader=fetcher.reader(layer.digest, layer.size), offset=0, layer=layer)
        elif packing is Packing.TAR:
            reader = fetcher.reader(layer.digest, layer.size)
            members = await index_tar(reader.read, layer.size, where)
            def locate(member: Member, reader: BlobReader = reader) -> tuple[BlobReader, int]:
                return reader, member.offset

            _add_members(tree, members, layer, where, locate)
        else:
            await _add_compressed(tree, fetcher, layer, packing, where, mode, meta_mtime or mtime_ns)
    tree.check_links()
    return tree


def _add_members(tree: Tree, members: list[Member], layer: Descriptor, where: str,
                 locate: Callable[[Member], tuple[BlobReader, int]]) -> None:
    by_path: dict[str, Member] = {}
    for member in members:
        member_where = f"{where}, member {member.path!r}"
        if member.kind == DIRECTORY:
            tree._directory(member.path.split("/"), member_where)
            continue
        if member.kind == SYMLINK:
            tree.add(member.path, member_where, kind=SYMLINK, mode=0o777, mtime_ns=seconds_to_ns(member.mtime),
                     link=member.link)
            continue
        source = member
        if member.kind == HARDLINK:
            found = by_path.get(member.link)
            if found is None:
                raise UnsafePathError(f"{member_where}: hard link to {member.link!r}, which is not a regular file of "
                                      "this layer (a link, a directory or missing); refusing it")
            source = found
        reader, offset = locate(source)
        tree.add(member.path, member_where, kind=REGULAR, mode=source.mode or 0o644, mtime_ns=seconds_to_ns(member.mtime),
                 size=source.size, reader=reader, offset=offset, layer=layer)
        by_path[member.path] = source


async def _add_compressed(tree: Tree, fetcher: Fetcher, layer: Descriptor, packing: Packing, where: str,
                          mode: int, mtime_ns: int) -> None:
    """modctl's one-file layers are listed from their annotations and streamed on first read;
    others are streamed now, since only their contents say which files they hold."""
    stream = LayerStream(fetcher, layer, packing, where)
    meta = layer.file_metadata or {}
    size = meta.get("size")
    if layer.filepath and isinstance(size, int) and size >= 0 and meta.get("typeflag", 48) in (0, 48, "0"):
        path = clean_member_path(layer.filepath, where)
        tree.add(path, where, kind=REGULAR, mode=mode, mtime_ns=mtime_ns, size=size,
                 reader=stream.target(path, size), offset=0, layer=layer)
        return
    members = await stream.collect()
    _add_members(tree, members, layer, where, lambda m: (stream.targets[m.path], 0))
