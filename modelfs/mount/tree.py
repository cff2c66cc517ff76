"""Layers to a file tree: every file knows (blob, offset, size), every path is safe.

- raw layers: the blob is the file, named by ``org.cncf.model.filepath``;
- tar layers: members located by reading headers only (:mod:`modelfs.mount.tarindex`);
- tar+gzip / tar+zstd layers: no random access, so the blob is streamed once and each
  member lands in a cache entry of its own as it is decompressed (:mod:`modelfs.mount.layerstream`).

Every path, link and conflict across layers is decided by :class:`modelfs.tree_check.TreeCheck`,
which ``extract`` uses too, before the mount serves anything.

Listing and stat are answered from this tree, never from the registry.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ..errors import ManifestError
from ..paths import clean_member_path
from ..resolve import Model
from ..spec import Descriptor, Packing, classify_layer
from ..tree_check import DIRECTORY, HARDLINK, REGULAR, SYMLINK, TreeCheck, layer_label
from .fetcher import BlobReader, Fetcher
from .tarindex import Member, index_tar

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
    """The nodes the mount serves, made only for paths :class:`TreeCheck` accepted: the one
    check ``extract`` uses too, so both refuse the same models with the same words."""

    def __init__(self, mtime_ns: int, max_nodes: int = MAX_NODES) -> None:
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", DIRECTORY, 0o755, mtime_ns)}
        self.check = TreeCheck()
        self.mtime_ns = mtime_ns
        self.max_nodes = max_nodes

    def _new_inode(self, where: str) -> int:
        """The next inode number; a hostile tar of millions of empty members stops here, not at OOM."""
        if len(self.nodes) >= self.max_nodes:
            raise ManifestError(f"{where}: the model has over {self.max_nodes:,} files and directories; refusing it")
        return len(self.nodes) + 1

    def directory(self, path: str, where: str) -> Node:
        """The directory node at ``path`` (checked), made with its parents if new; a loop, not
        recursion, whatever the depth."""
        node = self.nodes[ROOT_INODE]
        for part in path.split("/") if path else ():
            child = node.children.get(part)
            if child is None:
                new = Node(self._new_inode(where), part, DIRECTORY, 0o755, self.mtime_ns, parent=node.inode)
                self.nodes[new.inode] = new
                node.children[part] = new.inode
                node = new
            else:
                node = self.nodes[child]
                assert node.kind == DIRECTORY, f"{where}: the tree check let a path through a {node.kind}"
        return node

    def add(self, path: str, where: str, **attrs: object) -> Node:
        """Check one file or symlink against the whole tree, then make its node."""
        self.check.add(path, str(attrs["kind"]), where, link=str(attrs.get("link", "")))
        return self.place(path, where, **attrs)

    def place(self, path: str, where: str, **attrs: object) -> Node:
        """The node of a path the tree check has accepted."""
        parent_path, _, name = path.rpartition("/")
        parent = self.directory(parent_path, where)
        node = Node(self._new_inode(where), name, parent=parent.inode, **attrs)  # type: ignore[arg-type]
        self.nodes[node.inode] = node
        parent.children[name] = node.inode
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
        where = layer_label(number, layer)
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
    tree.check.finish()
    return tree


def _add_members(tree: Tree, members: list[Member], layer: Descriptor, where: str,
                 locate: Callable[[Member], tuple[BlobReader, int]]) -> None:
    by_path: dict[str, Member] = {}  # this layer's regular files, the only things a hard link may name
    for member in members:
        member_where = f"{where}, member {member.path!r}"
        tree.check.add(member.path, member.kind, member_where, where, member.link)
        if member.kind == DIRECTORY:
            tree.directory(member.path, member_where)
            continue
        if member.kind == SYMLINK:
            tree.place(member.path, member_where, kind=SYMLINK, mode=0o777, mtime_ns=seconds_to_ns(member.mtime),
                       link=member.link)
            continue
        source = by_path[member.link] if member.kind == HARDLINK else member
        reader, offset = locate(source)
        tree.place(member.path, member_where, kind=REGULAR, mode=source.mode or 0o644,
                   mtime_ns=seconds_to_ns(member.mtime), size=source.size, reader=reader, offset=offset, layer=layer)
        by_path[member.path] = source


async def _add_compressed(tree: Tree, fetcher: Fetcher, layer: Descriptor, packing: Packing, where: str,
                          mode: int, mtime_ns: int) -> None:
    """modctl's one-file layers are listed from their annotations and streamed on first read;
    others are streamed now, since only their contents say which files they hold."""
    stream = fetcher.layer_stream(layer, packing, where)
    meta = layer.file_metadata or {}
    size = meta.get("size")
    if layer.filepath and isinstance(size, int) and size >= 0 and meta.get("typeflag", 48) in (0, 48, "0"):
        path = clean_member_path(layer.filepath, where)
        tree.add(path, where, kind=REGULAR, mode=mode, mtime_ns=mtime_ns, size=size,
                 reader=stream.target(path, size), offset=0, layer=layer)
        return
    members = await stream.collect()
    _add_members(tree, members, layer, where, lambda m: (stream.targets[m.path], 0))
