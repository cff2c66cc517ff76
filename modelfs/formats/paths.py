"""Path safety: every path that comes from an artifact is hostile until proven otherwise.

Used by :mod:`modelfs.formats.tree_check`, through which the mount's file tree and ``extract`` both
pass, so both refuse the same things.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from ..errors import UnsafePathError

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


def link_target_inside(member: str, link: str) -> bool:
    """Whether a symlink at ``member`` pointing to ``link`` stays inside the tree."""
    if link.startswith("/"):
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member), link))
    return resolved != ".." and not resolved.startswith("../") and resolved != "."


def link_chain_inside(member: str, links: Mapping[str, str]) -> bool:
    """Whether the symlink at ``member`` resolves inside the tree (see :func:`link_chain_escape`)."""
    return link_chain_escape(member, links) is None


def link_chain_escape(member: str, links: Mapping[str, str]) -> tuple[list[str], bool] | None:
    """None if the symlink at ``member`` resolves inside the tree when every symlink on the
    way is followed, the way the kernel resolves it (``p/..`` is the parent of where ``p``
    points, not the directory holding ``p``), given every symlink of the tree in ``links``
    (path -> target); else the other links followed on the way out, and whether it was a
    loop (more than the kernel's 40 hops). A lexical check of each link alone passes chains
    that walk out."""
    if links[member].startswith("/"):
        return [], False
    current = member.split("/")[:-1]
    pending = list(reversed(links[member].split("/")))
    followed: list[str] = []
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not current:
                return followed, False  # above the root of the tree
            current.pop()
            continue
        current.append(part)
        hop = "/".join(current)
        target = links.get(hop)
        if target is None:
            continue
        followed.append(hop)
        if len(followed) > MAX_LINK_HOPS:
            return followed[:3], True
        if target.startswith("/"):
            return followed, False
        current.pop()
        pending.extend(reversed(target.split("/")))
    return None
