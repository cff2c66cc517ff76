"""Path safety: every path that comes from an artifact is hostile until proven otherwise.

Used by the mount's file tree and by ``extract``, so both refuse the same things.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping

from .errors import UnsafePathError

MAX_NAME_BYTES = 255  # NAME_MAX and PATH_MAX of Linux: longer ones cannot be created or served
MAX_PATH_BYTES = 4096
MAX_LINK_HOPS = 40  # the kernel's limit on symlinks followed while resolving one path


def clean_member_path(path: str, where: str) -> str:
    """Normalise an in-artifact path to ``a/b/c`` or raise :class:`UnsafePathError`.

    Refused: empty paths, absolute paths, any ``..`` component, NUL bytes, and paths that
    normalise to the root. ``./a//b/`` becomes ``a/b``.
    """
    if not path or "\x00" in path:
        raise UnsafePathError(f"{where}: empty or NUL-containing path {path!r}")
    try:
        encoded = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise UnsafePathError(f"{where}: path {path!r} is not a valid file name (unpaired surrogate)") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafePathError(f"{where}: path of {len(encoded)} bytes refused (the limit is {MAX_PATH_BYTES})")
    if path.startswith("/") or path.startswith("\\"):
        raise UnsafePathError(f"{where}: absolute path {path!r} refused")
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"{where}: path {path!r} contains '..'")
    if not parts:
        raise UnsafePathError(f"{where}: path {path!r} names the root")
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise UnsafePathError(f"{where}: path component {part[:40]!r}... of over {MAX_NAME_BYTES} bytes refused")
    return "/".join(parts)


def safe_join(root: str, member: str, where: str) -> str:
    """Join a cleaned member path under ``root``, refusing anything that resolves outside.

    Also refuses to follow a symlink that already exists inside ``root`` and points out of it.
    """
    rel = clean_member_path(member, where)
    root_real = os.path.realpath(root)
    target = os.path.join(root_real, *rel.split("/"))
    parent_real = os.path.realpath(os.path.dirname(target))
    if parent_real != root_real and not parent_real.startswith(root_real + os.sep):
        raise UnsafePathError(f"{where}: path {member!r} resolves outside the output directory")
    return target


def link_target_inside(member: str, link: str) -> bool:
    """Whether a symlink at ``member`` pointing to ``link`` stays inside the tree."""
    if link.startswith("/"):
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member), link))
    return resolved != ".." and not resolved.startswith("../") and resolved != "."


def link_chain_inside(member: str, links: Mapping[str, str]) -> bool:
    """Whether the symlink at ``member`` resolves inside the tree when every symlink on the
    way is followed, the way the kernel resolves it (``p/..`` is the parent of where ``p``
    points, not the directory holding ``p``), given every symlink of the tree in ``links``
    (path -> target). A lexical check of each link alone passes chains that walk out."""
    current = member.split("/")[:-1]
    pending = list(reversed(links[member].split("/")))
    if links[member].startswith("/"):
        return False
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not current:
                return False  # above the root of the tree
            current.pop()
            continue
        current.append(part)
        target = links.get("/".join(current))
        if target is None:
            continue
        hops += 1
        if hops > MAX_LINK_HOPS or target.startswith("/"):
            return False
        current.pop()
        pending.extend(reversed(target.split("/")))
    return True
