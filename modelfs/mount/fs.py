"""The FUSE layer: thin pyfuse3 handlers over the tree and the fetcher. The tree holds no
reader: a file's is looked up through :class:`.binding.FileReaders`, bound at first use.

Content is immutable (a manifest digest never changes), so the kernel may keep entries,
attributes and pages as long as it likes: long timeouts and ``keep_cache``. Writes are
refused with EROFS. A failed fetch is EIO for that read only; nothing here lets an exception
escape into pyfuse3 except ``FUSEError``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from ..errors import ModelfsError
from ..formats.tree_check import DIRECTORY, SYMLINK
from .binding import FileReaders
from .stats import ReadTimer
from .tree import ROOT_INODE, Node, Tree
from .viewblocks import ViewBlocks

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

TIMEOUT = 24 * 3600.0
XATTR_DIGEST = b"user.modelfs.digest"
XATTR_CACHED = b"user.modelfs.cached"
XATTR_MEDIA_TYPE = b"user.modelfs.mediatype"
XATTR_MODEL = b"user.modelfs.model"
XATTRS = (XATTR_DIGEST, XATTR_CACHED, XATTR_MEDIA_TYPE, XATTR_MODEL)


def _guarded(handler: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """No request may end the mount: whatever a handler raises besides ``FUSEError`` (a bug,
    an entry no check foresaw) becomes EIO for that request and a log line."""

    @functools.wraps(handler)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            ops = args[0]
            if isinstance(ops, ModelFS):
                ops.stats.handler_errors += 1
            log.exception("unexpected error in %s%r; answering EIO", handler.__name__, args[1:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return guarded


def _encoded(value: str) -> bytes:
    """An attribute value from an artifact as bytes, whatever characters it holds (a lone
    surrogate in a media type must not fail ``listxattr``)."""
    return value.encode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Permissions:
    """Who the files belong to and who may read them (``uid=``, ``gid=``, ``file_mode=``,
    ``dir_mode=``, as mount-s3 and other FUSE filesystems take them).

    By default the mounting user owns everything, and a file keeps the read and exec bits the
    artifact recorded: private to that user, as the mount is. With ``allow_other`` the
    default is 0444 for files (0555 for those the artifact marks executable) and 0555 for
    directories: weights saved as 0600 (``safetensors.save_file`` writes them so) must be
    readable by an inference server that runs as another user. An explicit ``file_mode``
    applies to every file, plus exec for whoever may read where the artifact had exec bits.
    """

    uid: int
    gid: int
    file_mode: int | None = None
    dir_mode: int | None = None
    allow_other: bool = False

    def of_file(self, recorded: int) -> int:
        executable = bool(recorded & 0o111)
        if self.file_mode is not None:
            return self.file_mode | ((self.file_mode & 0o444) >> 2 if executable else 0)
        if self.allow_other:
            return 0o555 if executable else 0o444
        return recorded & 0o555 or 0o444

    def of_directory(self) -> int:
        return 0o555 if self.dir_mode is None else self.dir_mode


class ModelFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, readers: FileReaders, model_name: str, permissions: Permissions | None = None,
                 needs: ViewBlocks | None = None) -> None:
        super().__init__()
        self.tree, self.readers, self.model_name = tree, readers, model_name
        self.needs = needs  # of each blob, the blocks the view needs: what "cached" counts
        self.fetcher = readers.fetcher
        self.permissions = permissions or Permissions(os.getuid(), os.getgid())
        self.stats = self.fetcher.stats
        self._inodes: dict[str, list[Node]] | None = None  # reader key -> the files it serves
        self.fetcher.on_dropped.append(self.forget_pages)

    def files_of(self, key: str) -> list[Node]:
        """The files whose bytes a reader serves, by its key: a raw layer's digest (one
        file), a tar layer's (each member), or the derived key of a file of a compressed
        layer (``layerstream.derived_key``). The tree never changes once mounted."""
        if self._inodes is None:
            self._inodes = {}
            for node in self.tree.files():
                if node.layer is not None:
                    self._inodes.setdefault(self.readers.key(node), []).append(node)
        return self._inodes.get(key, [])

    async def forget_pages(self, key: str) -> None:
        """Bytes served of the reader ``key`` were dropped (``BlobReader.drop``, the one path):
        make the kernel drop its cached pages of every file they were served as, so a mapping
        faults and reads again (correct bytes, or EIO), whatever the layer's packing."""
        for node in self.files_of(key):
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, node.inode, False)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: never looked up, so the kernel holds none of its pages
                    log.warning("cannot invalidate kernel cache of %s: %s", self.path_of(node), exc)

    def _node(self, inode: int) -> Node:
        try:
            return self.tree.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.generation = 0
        attrs.entry_timeout = TIMEOUT
        attrs.attr_timeout = TIMEOUT
        if node.kind == DIRECTORY:
            attrs.st_mode = stat.S_IFDIR | self.permissions.of_directory()
            attrs.st_nlink = 2 + sum(1 for c in node.children.values() if self.tree.nodes[c].kind == DIRECTORY)
            attrs.st_size = 4096
        elif node.kind == SYMLINK:
            attrs.st_mode = stat.S_IFLNK | 0o777
            attrs.st_nlink = 1
            attrs.st_size = len(os.fsencode(node.link))
        else:
            attrs.st_mode = stat.S_IFREG | self.permissions.of_file(node.mode)
            attrs.st_nlink = 1
            attrs.st_size = node.size
        attrs.st_uid, attrs.st_gid = self.permissions.uid, self.permissions.gid
        attrs.st_blksize = 1 << 20
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        return attrs

    @_guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            return self._attrs(parent)
        if name == b"..":
            return self._attrs(self._node(parent.parent))
        child = parent.children.get(os.fsdecode(name))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.tree.nodes[child])

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    @_guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.kind != SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.link)

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._node(inode).kind != DIRECTORY:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._node(fh)
        names = sorted(node.children)
        for position in range(start_id, len(names)):
            child = self.tree.nodes[node.children[names[position]]]
            if not pyfuse3.readdir_reply(token, os.fsencode(names[position]), self._attrs(child), position + 1):
                return

    @_guarded
    async def releasedir(self, fh: int) -> None:
        return None

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.kind == DIRECTORY:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.layer is not None:
            try:
                await self.readers.opened(node)  # bound here, at its first open
            except ModelfsError as exc:  # its signature check refuses it
                log.error("open of %s refused: %s", self.path_of(node), exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    @_guarded
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:  # type: ignore[override]
        node = self._node(fh)
        if node.layer is None or off >= node.size:
            return b""
        size = min(size, node.size - off)
        self.stats.reads += 1
        try:
            with ReadTimer(self.stats.read_latency):
                data = await self.readers.read_view(node, off, size)
            self.stats.bytes_served += len(data)
            return data
        except ModelfsError as exc:
            self.stats.read_errors += 1
            log.error("read of %s at %d (+%d) failed: %s", self.path_of(node), off, size, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            self.stats.read_errors += 1
            log.exception("unexpected error reading %s at %d (+%d)", self.path_of(node), off, size)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_guarded
    async def release(self, fh: int) -> None:
        return None

    @_guarded
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not (mode & os.W_OK)

    def path_of(self, node: Node) -> str:
        parts = []
        while node.inode != ROOT_INODE:
            parts.append(node.name)
            node = self.tree.nodes[node.parent]
        return "/".join(reversed(parts))

    def _xattr(self, node: Node, name: bytes) -> bytes | None:
        if name == XATTR_MODEL:
            return _encoded(self.model_name)
        if node.inode == ROOT_INODE and name == XATTR_CACHED:
            readers, needs = self.readers.every(self.tree), self.needs
            part = {r.digest for r in readers if needs and needs.of(r) is not None}  # a view's blocks of the blob
            total = sum(needs.bytes(r) if needs and r.digest in part else r.size for r in readers)
            cached = sum(needs.local_bytes(r) if needs and r.digest in part else r.cached_fraction() * r.size
                         for r in readers)
            return f"{cached / total if total else 1.0:.4f}".encode()
        if node.layer is None:
            return None
        if name == XATTR_DIGEST:
            return _encoded(node.layer.descriptor.digest)
        if name == XATTR_MEDIA_TYPE:
            return _encoded(node.layer.descriptor.media_type)
        if name == XATTR_CACHED:
            return f"{self.readers.reader(node).cached_fraction():.4f}".encode()
        return None

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattr(self._node(inode), name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        node = self._node(inode)
        return [name for name in XATTRS if self._xattr(node, name) is not None]

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        total = sum(n.size for n in self.tree.files())
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = (total + 4095) // 4096
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.tree.nodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data
