"""Every setting of :mod:`modelfs.settings`, resolved once for one registry (and
repository), typed.

A command resolves its settings here, once: the flag (or fstab option), then the config's
``[registries."host"]`` table (for a signature setting, the longest ``[trust."..."]`` scope
that contains the repository), then its top level, then the declared default (the order
:func:`modelfs.settings.resolve` keeps), plus the mirrors that table names. What it then
builds from them -- the registry client, the cache, the fetch policy, the signature policy --
it builds in :mod:`modelfs.compose`, from this object alone.

The fields carry no defaults of their own: :func:`resolve_settings` fills each from the one
table, and constructing the object with a field the table lacks (or without one it has) fails
at once. tests/test_settings.py keeps the field names equal to the table's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import Config, Mirror
from .dirs import default_cache_dir
from .settings import SETTINGS, resolve


@dataclass(frozen=True)
class ResolvedSettings:
    registry: str | None  # the registry these were resolved for; None: the config's top level only
    repository: str | None  # the repository too, for the signature settings; None: the registry's alone
    mirrors: tuple[Mirror, ...]  # the config's mirrors for that registry, tried in order, then it
    trust_scope: str | None  # the [trust."..."] table the signature settings came from, if any
    cache_dir: str
    plain_http: bool
    ca_file: str | None
    log_level: str | None
    prefetch: str
    timeout: float
    stall_timeout: float | None
    workers: int
    verify: str
    cache_max_size: int
    metrics: str | None
    allow_other: bool
    allow_nonempty: bool
    uid: int | None
    gid: int | None
    file_mode: int | None
    dir_mode: int | None
    log_max_size: int
    include: list[str] | None  # the view (modelfs/formats/view.py): None, every file
    exclude: list[str] | None
    signatures: str | None  # enforce, warn, off; None: enforce when a key or identity is given, else off
    key: list[str] | None
    certificate_identity: list[str] | None
    certificate_oidc_issuer: str | None
    trusted_root: str | None


def resolve_settings(given: Mapping[str, Any], config: Config, registry: str | None = None,
                     repository: str | None = None) -> ResolvedSettings:
    """Every setting for ``registry`` (and ``repository``) from ``given`` (a command's flags,
    by setting name; None where not given) over ``config``. The cache directory may also come
    from ``MODELFS_CACHE_DIR``, between the flag and the config."""
    scope = config.trust_scope(registry, repository) if registry else None
    values = {s.name: resolve(s.name, given.get(s.name), config, registry, scope) for s in SETTINGS}
    values["cache_dir"] = (given.get("cache_dir") or os.environ.get("MODELFS_CACHE_DIR")
                           or resolve("cache_dir", None, config) or default_cache_dir())
    mirrors = tuple(config.registry(registry).mirrors) if registry else ()
    return ResolvedSettings(registry=registry, repository=repository if registry else None, mirrors=mirrors,
                            trust_scope=scope, **values)
