"""Layers to a file tree: a pure listing. Every file says what bytes it is, every path is safe.

- raw layers: the blob is the file, named by ``org.cncf.model.filepath``;
- tar layers: members located by reading headers only (:mod:`modelfs.formats.tarindex`), each
  file ``size`` bytes at ``offset`` of the layer's blob;
- tar+gzip / tar+zstd layers: no random access, so a file is a member of the layer, unpacked
  (the data path streams the blob once, :mod:`modelfs.mount.stream`).

Every path, link and conflict across layers is decided by :class:`modelfs.formats.tree_check.TreeCheck`,
which ``extract`` uses too, before the mount serves anything.

The tree holds no reader: building it reads only what listing needs, through
:class:`LayerReads` (a tar's headers, a compressed layer's member list), and the data path
binds a reader to a file when it is first used (:mod:`modelfs.mount.binding`). Listing and
stat are answered from this tree, never from the registry.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from ..errors import ManifestError
from ..formats.paths import clean_member_path
from ..formats.spec import Descriptor, Packing, classify_layer
from ..formats.tarindex import Member, ReadAt, index_tar
from ..formats.tree_check import DIRECTORY, HARDLINK, REGULAR, SYMLINK, TreeCheck, layer_label
from ..formats.view import View
from ..resolve import Model

log = logging.getLogger(__name__)

ROOT_INODE = 1


@dataclass(frozen=True)
class Layer:
    """A layer as its files refer to it (one per layer, shared by all of its files)."""

    descriptor: Descriptor
    packing: Packing
    where: str  # how messages name it: "layer 3 (model.safetensors)"

    @property
    def streamed(self) -> bool:
        """Compressed: no random access, its files are members unpacked from one stream."""
        return self.packing in (Packing.TAR_GZIP, Packing.TAR_ZSTD)


@dataclass
class Node:
    inode: int
    name: str
    kind: str  # "dir" | "file" | "symlink"
    mode: int
    mtime_ns: int
    size: int = 0
    # a file's bytes: ``size`` bytes at ``offset`` of the blob of ``layer`` or, in a streamed
    # layer, of its member ``member`` unpacked (None for directories and symlinks)
    layer: Layer | None = None
    offset: int = 0
    member: str = ""
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

    def __init__(self, mtime_ns: int, max_nodes: int = MAX_NODES, manifest_layers: list[Descriptor] | None = None
                 ) -> None:
        self.manifest_layers = manifest_layers or []
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "", DIRECTORY, 0o755, mtime_ns)}
        self.check = TreeCheck()
        self.mtime_ns = mtime_ns
        self.max_nodes = max_nodes
        self._distinct: list[Node] | None = None  # distinct_files(), until a file is added
        self._inodes = ROOT_INODE  # the last inode number given (a cut leaves gaps, never reuses one)
        self._whole: dict[str, int | None] | None = None  # whole_listing(), kept when a view cuts the tree
        self.listed: dict[str, list[tuple[int, int]]] = {}  # by blob digest: (offset, size) of each read listing made

    def _new_inode(self, where: str) -> int:
        """The next inode number; a hostile tar of millions of empty members stops here, not at OOM."""
        if len(self.nodes) >= self.max_nodes:
            raise ManifestError(f"{where}: the model has over {self.max_nodes:,} files and directories; refusing it")
        self._inodes += 1
        return self._inodes

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
        self._distinct = None
        return node

    def cut(self, view: View) -> None:
        """Keep only what ``view`` selects of the whole checked tree (:meth:`View.select`, the
        one decision ``pull`` and ``extract`` use too): files, links and directories outside
        it are gone from listing, lookup, stat, prefetch and the status, as if never there."""
        kept = view.select(self.check.kinds())
        if kept is None:
            return
        self._whole = self.whole_listing()
        stack: list[tuple[Node, str]] = [(self.nodes[ROOT_INODE], "")]
        while stack:
            directory, path = stack.pop()
            for name, inode in list(directory.children.items()):
                child_path = f"{path}/{name}" if path else name
                if child_path in kept:
                    if self.nodes[inode].kind == DIRECTORY:
                        stack.append((self.nodes[inode], child_path))
                    continue
                del directory.children[name]
                self._drop(inode)
        self._distinct = None

    def file_paths(self) -> Iterator[tuple[str, int]]:
        """(path, inode) of every regular file of the tree as it is served (the paths a
        signed statement names)."""
        stack = [(ROOT_INODE, "")]
        while stack:
            inode, prefix = stack.pop()
            for name, child in self.nodes[inode].children.items():
                node = self.nodes[child]
                path = f"{prefix}{name}"
                if node.kind == DIRECTORY:
                    stack.append((child, path + "/"))
                elif node.layer is not None:
                    yield path, child

    def whole_listing(self) -> dict[str, int | None]:
        """path -> size of every regular file of the whole model, before any view cut it:
        what a signature over the model is judged against."""
        if self._whole is not None:
            return dict(self._whole)
        return {path: self.nodes[inode].size for path, inode in self.file_paths()}

    def _drop(self, inode: int) -> None:
        """A node and everything under it, gone (a loop, whatever the depth)."""
        stack = [inode]
        while stack:
            node = self.nodes.pop(stack.pop())
            stack.extend(node.children.values())

    def view_spans(self) -> dict[str, list[tuple[int, int]]] | None:
        """Blob digest -> the (offset, size) ranges of it a view of the tree reads: its files'
        bytes, and what listing it read (a plain tar's headers, read again by the next mount);
        None when no view cut the tree (every byte of every blob is wanted). Files of a
        streamed layer have no ranges of its blob: that layer is wanted whole."""
        if self._whole is None:
            return None
        spans: dict[str, list[tuple[int, int]]] = {}
        for node in self.files():
            layer = node.layer
            if layer is not None and not layer.streamed:
                digest = layer.descriptor.digest
                if digest not in spans:  # listing's reads copied once per blob, not once per file
                    spans[digest] = list(self.listed.get(digest, ()))
                spans[digest].append((node.offset, node.size))
        return spans

    def layers(self) -> list[Descriptor]:
        """The layers whose bytes the tree's files are, in manifest order: what a ``pull`` of a
        view fetches (a compressed layer whole, even for one of its files: it has no random
        access), with every layer only streaming could list (a later mount lists it again)."""
        wanted = {node.layer.descriptor.digest for node in self.files() if node.layer is not None}
        return [layer for layer in self.manifest_layers if layer.digest in wanted or listed_by_streaming(layer)]

    def files(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == REGULAR]

    def distinct_files(self) -> list[Node]:
        """One file per distinct run of bytes the data path reads: a blob (raw and plain tar
        layers, however many files it holds) or a member of a streamed layer (hard links share
        it), in tree order. Asked every second for the status: kept once the tree is built."""
        if self._distinct is None:
            seen: dict[tuple[str, str], Node] = {}
            for node in self.files():
                if node.layer is not None:
                    seen.setdefault((node.layer.descriptor.digest, node.member), node)
            self._distinct = list(seen.values())
        return self._distinct


class LayerReads(Protocol):
    """What building the tree reads of the layers; the data path implements it
    (:class:`modelfs.mount.binding.FileReaders`), the tree binds nothing."""

    def read_at(self, layer: Descriptor) -> ReadAt:
        """Range reads of a layer's blob (a plain tar's headers)."""
        ...

    async def unpack_members(self, layer: Layer) -> list[Member]:
        """The members of a streamed layer, which only streaming it can tell."""
        ...


def listed_by_streaming(layer: Descriptor) -> bool:
    """A compressed layer only streaming it can list (no one-file annotations): building the
    tree streams it whole, a view or not."""
    classified = classify_layer(layer.media_type)
    streamed = classified is not None and classified[1] in (Packing.TAR_GZIP, Packing.TAR_ZSTD)
    return streamed and not _listed_by_annotations(layer)


def _listed_by_annotations(descriptor: Descriptor) -> bool:
    """A compressed layer of one file (modctl's) that its annotations list: no stream needed."""
    meta = descriptor.file_metadata or {}
    size = meta.get("size")
    return bool(descriptor.filepath) and isinstance(size, int) and size >= 0 and meta.get("typeflag", 48) in (0, 48, "0")


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


async def build_tree(model: Model, layers: LayerReads, view: View | None = None) -> Tree:
    """The model's tree, checked whole over every layer, then cut to ``view`` (if given)."""
    created = model.config.descriptor.get("createdAt")
    mtime_ns = 0
    if isinstance(created, str):
        try:
            mtime_ns = seconds_to_ns(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
        except (ValueError, OverflowError):
            pass
    tree = Tree(mtime_ns, manifest_layers=model.manifest.layers)
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
                     layer=Layer(layer, packing, where), offset=0)
        elif packing is Packing.TAR:
            members = await index_tar(_noted(layers.read_at(layer), tree.listed.setdefault(layer.digest, [])),
                                      layer.size, where)
            _add_members(tree, members, Layer(layer, packing, where))
        else:
            await _add_compressed(tree, layers, Layer(layer, packing, where), mode, meta_mtime or mtime_ns)
    tree.check.finish()
    if view is not None:
        tree.cut(view)
    return tree


def _noted(read_at: ReadAt, reads: list[tuple[int, int]]) -> ReadAt:
    """``read_at``, each read noted in ``reads`` (what a view of the layer needs to list it again)."""
    async def read(offset: int, size: int) -> bytes:
        reads.append((offset, size))
        return await read_at(offset, size)
    return read


def _add_members(tree: Tree, members: list[Member], layer: Layer) -> None:
    where = layer.where
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
        tree.place(member.path, member_where, kind=REGULAR, mode=source.mode or 0o644,
                   mtime_ns=seconds_to_ns(member.mtime), size=source.size, layer=layer,
                   offset=0 if layer.streamed else source.offset, member=source.path if layer.streamed else "")
        by_path[member.path] = source


async def _add_compressed(tree: Tree, layers: LayerReads, layer: Layer, mode: int, mtime_ns: int) -> None:
    """modctl's one-file layers are listed from their annotations and streamed on first read;
    others are streamed now, since only their contents say which files they hold."""
    descriptor, where = layer.descriptor, layer.where
    if _listed_by_annotations(descriptor):
        path = clean_member_path(descriptor.filepath or "", where)
        size = (descriptor.file_metadata or {})["size"]
        tree.add(path, where, kind=REGULAR, mode=mode, mtime_ns=mtime_ns, size=size, layer=layer, member=path)
        return
    _add_members(tree, await layers.unpack_members(layer), layer)
