"""Where ``extract`` puts a model's files until the whole tree has passed its check.

Everything is unpacked into a fresh staging directory inside ``--output`` (same filesystem, so
moving into place is a rename) and moved into place only once every layer has unpacked and
the whole tree passed :class:`modelfs.formats.tree_check.TreeCheck`: a model refused at its last layer
leaves ``--output`` as it was. Staging rather than listing the members first keeps
``extract`` one pass over a compressed layer: its member list is known only once it has been
decompressed, and decompressing twice costs a second pass of CPU over the whole model.

Every step works on directory descriptors, one component at a time, with ``O_NOFOLLOW``:
nothing already in ``--output`` (a symlink left there, or planted) is followed, a path as
deep as Linux allows (1,500 directories fit in its 4096 bytes) needs no path string longer
than a name, and no walk recurses or holds more than two descriptors.

A staging directory is named for the process that made it (``.modelfs-extract-PID-RANDOM``)
and holds an ``flock`` on itself for as long as that process runs. An extract stopped by
SIGINT or SIGTERM removes its own; one killed outright (SIGKILL, the OOM killer, a lost host)
cannot, so each extract first removes those in its ``--output`` that are provably abandoned
(:func:`sweep_abandoned`): named so, ours (same uid), not locked, and their process gone.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import BinaryIO

from ..errors import ModelfsError, UnsafePathError
from ..formats.paths import link_chain_escape
from ..formats.tree_check import DIRECTORY, TreeCheck

log = logging.getLogger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


class Cursor:
    """One open directory that steps down by name, never through a link, and back up by
    ``..``, each step up checked to land where the step down came from: one descriptor
    whatever the depth (holding one per level would pass the usual limit of 1,024)."""

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self._above: list[tuple[int, int]] = []

    def down(self, name: str, create: bool = False) -> None:
        if create:
            try:
                os.mkdir(name, 0o755, dir_fd=self.fd)
            except FileExistsError:
                pass  # ours, or refused just below if it is not a directory
        fd = os.open(name, _DIR, dir_fd=self.fd)
        self._above.append(_identity(self.fd))
        os.close(self.fd)
        self.fd = fd

    def up(self) -> None:
        fd = os.open("..", _DIR, dir_fd=self.fd)
        if _identity(fd) != self._above.pop():
            os.close(fd)
            raise ModelfsError("a directory being extracted was moved by another process; stopping")
        os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _what(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a symlink" if stat.S_ISLNK(mode) else "a file"


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove ``name`` under ``parent_fd`` and all below it, following no link, without
    recursion (``shutil.rmtree`` recurses, and fails on a tree 1,500 directories deep)."""
    info = _lstat(name, parent_fd)
    if info is None:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    cursor = Cursor(parent_fd)
    try:
        cursor.down(name)
        names, pending = [name], [os.listdir(cursor.fd)]
        while pending:
            if not pending[-1]:
                pending.pop()
                cursor.up()
                os.rmdir(names.pop(), dir_fd=cursor.fd)
                continue
            child = pending[-1].pop()
            child_info = _lstat(child, cursor.fd)
            if child_info is not None and stat.S_ISDIR(child_info.st_mode):
                cursor.down(child)
                names.append(child)
                pending.append(os.listdir(cursor.fd))
            elif child_info is not None:
                os.unlink(child, dir_fd=cursor.fd)
    finally:
        cursor.close()


_PREFIX = ".modelfs-extract-"
_ABANDONABLE = re.compile(re.escape(_PREFIX) + r"([0-9]+)-[0-9a-f]{16}")


def _lock(fd: int) -> bool:
    """Take the staging directory's lock without waiting; False if another process holds it
    (or the filesystem cannot lock a directory: then nobody's is ever taken for abandoned)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _process_gone(pid: int) -> bool:
    """Checked beside the lock because a new staging directory exists for a moment before its
    maker locks it; a pid reused since only keeps a leftover until the next extract."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


def sweep_abandoned(out_fd: int) -> list[str]:
    """Remove the staging directories directly in ``out_fd`` whose extract was killed: only
    a directory (never through a link) named as :class:`Staging` names its own, owned by this
    user, whose lock nobody holds and whose process is gone; the lock is held while it is
    removed, so two extracts sweeping at once never race. Best effort: a failure here never
    stops the extract. Returns the names removed."""
    removed: list[str] = []
    try:
        names = [name for name in os.listdir(out_fd) if name.startswith(_PREFIX)]
    except OSError:
        return removed
    for name in names:
        match = _ABANDONABLE.fullmatch(name)
        if match is None or not _process_gone(int(match[1])):
            continue
        try:
            fd = os.open(name, _DIR, dir_fd=out_fd)
        except OSError:  # gone, not a directory, or a symlink: not ours to touch
            continue
        try:
            if os.fstat(fd).st_uid == os.getuid() and _lock(fd):
                remove_tree(out_fd, name)
                removed.append(name)
        except OSError as exc:
            log.debug("leaving the abandoned staging directory %s: %s", name, exc)
        finally:
            os.close(fd)
    return removed


class Staging:
    """A staging directory inside ``--output``: ``tree/`` holds the model as unpacked so far,
    blobs are downloaded beside it. :meth:`commit` moves the tree into ``--output``;
    :meth:`discard` removes everything. The parent directory of the last path written is
    kept open (tar members come grouped by directory)."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.out_fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # --output itself is the user's to name
        sweep_abandoned(self.out_fd)
        while True:
            self.name = f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
            try:
                os.mkdir(self.name, 0o700, dir_fd=self.out_fd)
                break
            except FileExistsError:
                continue  # 64 random bits: another run's, or a leftover of one
            except BaseException:
                os.close(self.out_fd)
                raise
        self.fd = os.open(self.name, _DIR, dir_fd=self.out_fd)
        _lock(self.fd)  # held until the process ends: what tells a later sweep it is alive
        os.mkdir("tree", 0o755, dir_fd=self.fd)
        self.tree_fd = os.open("tree", _DIR, dir_fd=self.fd)
        self._parent: tuple[str, int] | None = None  # a CLI run: a failure above leaks at most two descriptors

    # -- writing the staged tree (paths the tree check accepted) --------------------------

    def _open_parent(self, path: str) -> int:
        """The directory holding ``path`` in the staged tree, made if new (the caller keeps
        the cached one open)."""
        parent = path.rpartition("/")[0]
        if self._parent is not None and self._parent[0] == parent:
            return self._parent[1]
        cursor = Cursor(self.tree_fd)
        try:
            for part in parent.split("/") if parent else ():
                cursor.down(part, create=True)
        except BaseException:
            cursor.close()
            raise
        if self._parent is not None:
            os.close(self._parent[1])
        self._parent = (parent, cursor.fd)
        return cursor.fd

    def directory(self, path: str) -> None:
        parent = self._open_parent(path)
        try:
            os.mkdir(path.rpartition("/")[2], 0o755, dir_fd=parent)
        except FileExistsError:
            pass  # made for an earlier path beneath it; the tree check knows it is a directory

    @contextmanager
    def new_file(self, path: str, mode: int) -> Iterator[BinaryIO]:
        """A regular file at ``path``, created (never opened through a link) with ``mode``."""
        fd = os.open(path.rpartition("/")[2], _NEW_FILE, 0o600, dir_fd=self._open_parent(path))
        with os.fdopen(fd, "wb") as out:
            yield out
            os.fchmod(out.fileno(), mode)

    def symlink(self, path: str, link: str) -> None:
        os.symlink(link, path.rpartition("/")[2], dir_fd=self._open_parent(path))

    def copy(self, source: str, path: str) -> None:
        """A hard link becomes a copy of a regular file staged earlier (the tree check says
        it is one), opened without following any link."""
        with os.fdopen(self._open_staged(source), "rb") as reader:
            info = os.fstat(reader.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UnsafePathError(f"hard link to {source!r}, which is not a regular file")
            with self.new_file(path, stat.S_IMODE(info.st_mode)) as out:
                shutil.copyfileobj(reader, out, 1 << 20)

    def _open_staged(self, path: str) -> int:
        """A descriptor of the staged ``path``, opened to read, no link followed on the way."""
        cursor = Cursor(self.tree_fd)
        try:
            parent, _, name = path.rpartition("/")
            for part in parent.split("/") if parent else ():
                cursor.down(part)
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cursor.fd)
        finally:
            cursor.close()

    @contextmanager
    def staged_file(self, path: str) -> Iterator[BinaryIO]:
        """A regular file of the staged tree opened to read, no link followed on the way."""
        with os.fdopen(self._open_staged(path), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise UnsafePathError(f"{path!r} is not a regular file")
            yield handle

    def adopt(self, blob_name: str, path: str, mode: int) -> None:
        """A downloaded raw blob becomes the file at ``path``."""
        parent = self._open_parent(path)
        name = path.rpartition("/")[2]
        os.rename(blob_name, name, src_dir_fd=self.fd, dst_dir_fd=parent)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    @contextmanager
    def blob(self, name: str, write: bool = False) -> Iterator[BinaryIO]:
        """A downloaded blob beside the staged tree: made new to write, or opened to read."""
        flags = _NEW_FILE if write else os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(name, flags, 0o600, dir_fd=self.fd), "wb" if write else "rb") as handle:
            yield handle

    def drop_blob(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    # -- into --output ---------------------------------------------------------------------

    def commit(self, check: TreeCheck, kept: set[str] | None = None) -> None:
        """Move the staged tree into ``--output``: first every clash with what ``--output``
        already holds is looked for (a directory of the model where it has a file or a
        symlink, a file of the model where it has a directory), and refused before anything
        moves; then new entries are renamed in (a new directory whole), and a file of the
        model replaces a file or symlink of the same name (extracting again), never
        writing through it. With ``kept`` (a view's paths, :meth:`View.select`) only those
        move: a new directory is made and filled, not moved whole."""
        links = {path: link for path, link in check.symlinks().items() if kept is None or path in kept}
        self._check_links_with_output(check, links)
        children = check.children()
        if kept is not None:
            children = {path: [name for name in names if (f"{path}/{name}" if path else name) in kept]
                        for path, names in children.items()}
        self._merge(check, children, move=False, whole=kept is None)
        self._merge(check, children, move=True, whole=kept is None)

    def _check_links_with_output(self, check: TreeCheck, model_links: dict[str, str]) -> None:
        """Refuse a model symlink whose chain leaves ``--output`` once the links ``--output``
        already holds are followed too (an earlier extract's, or the user's): the tree check
        sees one model, and a chain may pass through a link the model does not have (or one
        it has outside the view, which is not written)."""
        links = _LinksWithOutput(model_links, self.out_fd)
        for path, link in model_links.items():
            escape = link_chain_escape(path, links)
            if escape is not None:
                through = "; ".join(f"{hop!r} -> {links[hop]!r}" for hop in escape[0]) or "no other link"
                raise UnsafePathError(f"{check.where(path)}: symlink {path!r} -> {link!r} leaves --output {self.output} "
                                      f"through links already there ({through}); nothing written")

    def _merge(self, check: TreeCheck, children: dict[str, list[str]], move: bool, whole: bool = True) -> None:
        """Walk the model's directories that ``--output`` already has, one descriptor per
        side, iteratively; ``move`` False only looks for clashes. Not ``whole`` (a view), a
        new directory is made and walked too, since the staged one holds more than the view."""
        out = Cursor(self.out_fd)
        staged = Cursor(self.tree_fd) if move else None
        try:
            stack: list[tuple[str, list[str]]] = [("", list(children[""]))]
            while stack:
                directory, names = stack[-1]
                if not names:
                    stack.pop()
                    if stack:
                        out.up()
                        if staged is not None:
                            staged.up()
                    continue
                name = names.pop()
                path = f"{directory}/{name}" if directory else name
                existing = _lstat(name, out.fd)
                is_dir = check.kind(path) == DIRECTORY
                if existing is None and (whole or not is_dir):
                    if staged is not None:
                        os.rename(name, name, src_dir_fd=staged.fd, dst_dir_fd=out.fd)
                    continue
                if existing is None:  # a directory of a view: nothing there can clash
                    if staged is None:
                        continue
                    os.mkdir(name, 0o755, dir_fd=out.fd)
                elif is_dir != stat.S_ISDIR(existing.st_mode):
                    model = "a directory" if is_dir else "a file"
                    raise UnsafePathError(f"{check.where(path)}: {path!r} is {model} of the model and already "
                                          f"{_what(existing.st_mode)} in --output {self.output}; nothing written")
                if not is_dir:
                    if staged is not None:
                        os.replace(name, name, src_dir_fd=staged.fd, dst_dir_fd=out.fd)
                    continue
                out.down(name)
                if staged is not None:
                    staged.down(name)
                stack.append((path, list(children[path])))
        finally:
            out.close()
            if staged is not None:
                staged.close()

    def discard(self) -> None:
        """Remove the staging directory and everything in it (after a commit, only itself)."""
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None
        for fd in (self.tree_fd, self.fd):
            os.close(fd)
        try:
            remove_tree(self.out_fd, self.name)
        finally:
            os.close(self.out_fd)


class _LinksWithOutput(Mapping[str, str]):
    """The symlinks a path resolves through once the model is in ``--output``: the model's
    own where it has the path, else what ``--output`` already holds there (read without
    following any link: every directory above it is opened with ``O_NOFOLLOW``)."""

    def __init__(self, model: dict[str, str], out_fd: int) -> None:
        self.model, self.out_fd = model, out_fd

    def __getitem__(self, path: str) -> str:
        if path in self.model:
            return self.model[path]
        parent, _, name = path.rpartition("/")
        cursor = Cursor(self.out_fd)
        try:
            for part in parent.split("/") if parent else ():
                cursor.down(part)
            return os.readlink(name, dir_fd=cursor.fd)
        except OSError:  # missing, not a directory on the way, or not a link: nothing to follow
            raise KeyError(path) from None
        finally:
            cursor.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.model)

    def __len__(self) -> int:
        return len(self.model)


@contextmanager
def writing(where: str, output: str) -> Iterator[None]:
    """An error of the output's filesystem (full, read-only, no permission) as one line that
    names what was being written."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        raise ModelfsError(f"{where}: cannot be written under --output {output}: {reason}") from None
