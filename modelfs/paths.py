"""Path safety: every path that comes from an artifact is hostile until proven otherwise.

Used by the mount's file tree and by ``extract``, so both refuse the same things.
"""

from __future__ import annotations

import os
import posixpath

from .errors import UnsafePathError


def clean_member_path(path: str, where: str) -> str:
    """Normalise an in-artifact path to ``a/b/c`` or raise :class:`UnsafePathError`.

    Refused: empty paths, absolute paths, any ``..`` component, NUL bytes, and paths that
    normalise to the root. ``./a//b/`` becomes ``a/b``.
    """
    if not path or "\x00" in path:
        raise UnsafePathError(f"{where}: empty or NUL-containing path {path!r}")
    if path.startswith("/") or path.startswith("\\"):
        raise UnsafePathError(f"{where}: absolute path {path!r} refused")
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"{where}: path {path!r} contains '..'")
    if not parts:
        raise UnsafePathError(f"{where}: path {path!r} names the root")
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
