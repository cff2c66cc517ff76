"""The composition root: the one place where a command's parts are built from its settings.

Every command that talks to a registry or reads blobs gets its parts here, from one
:class:`~modelfs.resolved.ResolvedSettings` and nothing else:

- the registry client, reading through the mirrors configured for its registry (writes --
  ``login``, ``push``, ``index attach`` -- go to the registry itself);
- the block cache;
- the signature policy (:func:`trust_policy`), which every resolve of a model checks before
  anything of it is served or kept (:func:`modelfs.resolve.fetch_or_cached`);
- the model, and the block index trusted for it under its signatures' verdict (or the ones
  recorded at the last pull or mount, when the registry cannot be reached);
- the :class:`~modelfs.mount.fetcher.Fetcher`, with the :class:`FetchPolicy` made from the
  settings (``timeout``, ``workers``, ``verify``).

``modelfs mount`` (:func:`modelfs.mount.daemon.serve`), ``pull``, ``inspect``, ``extract``,
``verify``, ``sign`` and the registry commands come here; the CSI plugin starts each
volume's daemon as ``modelfs mount --foreground``, so its mounts are built here too. Before
this module, ``pull`` built its Fetcher with the default policy, and ``timeout =`` and
``workers =`` in the config did not reach it.

Whether a client gives up at once on a registry that refuses connections (every command) or
waits for it (a mount daemon, which systemd or the CSI plugin started for the long run) is
decided here too, by the caller's ``fail_fast``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio

from . import signing
from .config import Mirror
from .formats import blockindex
from .formats.blockindex import TrustedIndex
from .formats.view import View
from .mount.fetcher import Fetcher, FetchPolicy
from .reference import Reference
from .registry import RegistryReader
from .registry.client import RegistryClient
from .registry.mirrors import MirroredClient, open_client
from .resolve import Model, check_layer_sizes, fetch_or_cached, recorded_index, trusted_index
from .resolved import ResolvedSettings
from .storage.cache import BlockCache

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_registry(settings: ResolvedSettings, registry: str | None = None, *,
                        fail_fast: bool = True) -> AsyncIterator[RegistryClient | MirroredClient]:
    """A client that reads from ``registry`` (default: the one ``settings`` were resolved
    for) through its configured mirrors, honouring its ``plain_http`` and ``ca_file``."""
    async with _opened(settings, registry, list(settings.mirrors), fail_fast) as client:
        yield client


@asynccontextmanager
async def open_writer(settings: ResolvedSettings, registry: str | None = None) -> AsyncIterator[RegistryClient]:
    """A client of ``registry`` itself, never a mirror: for ``login``, ``push`` and ``index attach``."""
    async with _opened(settings, registry, [], True) as client:
        assert isinstance(client, RegistryClient)  # no mirrors: the registry's own client
        yield client


@asynccontextmanager
async def _opened(settings: ResolvedSettings, registry: str | None, mirrors: list[Mirror], fail_fast: bool
                  ) -> AsyncIterator[RegistryClient | MirroredClient]:
    host = registry or settings.registry
    if host is None:
        raise ValueError("no registry to open")
    async with open_client(host, plain_http=settings.plain_http, ca_file=settings.ca_file, mirrors=mirrors,
                           fail_fast=fail_fast) as client:
        yield client


def open_cache(settings: ResolvedSettings) -> BlockCache:
    return BlockCache(settings.cache_dir)


def existing_cache(settings: ResolvedSettings) -> BlockCache | None:
    """The block cache, if there is one (commands that only read never create it, so a
    read-only directory with no cache in it is no cache, not an error)."""
    held = os.path.isdir(os.path.join(settings.cache_dir, "blobs", "sha256"))
    return BlockCache(settings.cache_dir) if held else None


def fetch_policy(settings: ResolvedSettings) -> FetchPolicy:
    """How every fetch of this command behaves, from its settings: the same for a mount and
    a pull."""
    return FetchPolicy(timeout=settings.timeout, stall_timeout=settings.stall_timeout, workers=settings.workers,
                       verify=settings.verify)


def model_view(settings: ResolvedSettings, within: View | None = None) -> View:
    """The files a mount serves, a pull fetches and an extract writes (``--include`` /
    ``--exclude``, doc/CONFIGURATION.md "Selective views"): the same for all three; ``within``
    a view this one may only narrow (a CSI pod's, the node's)."""
    return View.of(settings.include, settings.exclude, within)


def trust_policy(settings: ResolvedSettings, reference: Reference, verifying: bool = False) -> signing.Policy:
    """The signature policy for ``reference`` from its five signature settings (flags, then the
    config's ``[trust."..."]`` scope, then its top level: :mod:`modelfs.signing.policy`).
    ``settings`` must have been resolved for that reference's repository: a scope may name it."""
    if (settings.registry, settings.repository) != (reference.registry, reference.repository):
        raise ValueError(f"settings resolved for {settings.registry}/{settings.repository}, not {reference}")
    values = {name: getattr(settings, name) for name in signing.policy.NAMES}
    return signing.policy.make(values, reference, settings.trust_scope, verifying)


@dataclass(frozen=True)
class TrustedModel:
    """A model to read and what vouches for its blocks."""

    model: Model
    index: TrustedIndex | None  # None: each blob is served once it has been checked whole
    offline: str | None  # why the recorded copy is used (the registry could not be reached), else None


async def resolve_model(client: RegistryReader, cache: BlockCache, reference: Reference, trust: signing.Policy
                        ) -> TrustedModel:
    """The model, its signatures checked under ``trust``, and its block index (the one its
    verdict allows). While the registry cannot be reached, a model recorded in the cache at
    the last mount or pull is used (checked against its digests), with the block index
    recorded beside it if its manifest names that index."""
    model, offline = await fetch_or_cached(client, cache, reference, trust=trust)
    if offline is not None:
        data = recorded_index(cache, model)
        index = TrustedIndex(blockindex.decode(data), vouched=True, data=data) if data else None
        return TrustedModel(model, index, offline)
    await check_layer_sizes(client, model)
    index = await trusted_index(client, model)
    if index is None:
        log.info("block index: none; each blob is served once it has been checked whole against its digest")
    else:
        log.info("block index: %s; every block is checked before it is served",
                 "named by the manifest" if index.vouched else "attached at the registry (blobs also checked whole)")
    return TrustedModel(model, index, None)


@dataclass
class Session:
    """One command's parts for one reference: its settings, the cache and the client. The
    Fetchers it makes are closed when the session ends, after the nurseries they ran in."""

    settings: ResolvedSettings
    reference: Reference
    cache: BlockCache
    client: RegistryClient | MirroredClient
    trust: signing.Policy
    verdict: signing.Verdict | None = None  # on the model :meth:`resolve` found
    _fetchers: list[Fetcher] = field(default_factory=list)

    async def resolve(self) -> TrustedModel:
        found = await resolve_model(self.client, self.cache, self.reference, self.trust)
        self.verdict = found.model.verdict
        return found

    def fetcher(self, nursery: trio.Nursery, index: TrustedIndex | None) -> Fetcher:
        """The Fetcher of this command's blobs; its tasks run in ``nursery``. The verdict on
        the model resolved may rule ``--verify lazy`` out (:func:`signing.lazy_allowed`)."""
        policy = fetch_policy(self.settings)
        if policy.lazy and not signing.lazy_allowed(self.verdict):
            policy = replace(policy, verify="full")
        fetcher = Fetcher(self.cache, self.client, self.reference.repository, nursery, policy, index=index)
        self._fetchers.append(fetcher)
        return fetcher

    def close(self) -> None:
        """Only once every nursery a Fetcher ran in has ended: a descriptor closed under a
        worker thread could be reused by another file meanwhile."""
        for fetcher in self._fetchers:
            fetcher.close()
        self._fetchers.clear()
        self.cache.close()


@asynccontextmanager
async def open_session(settings: ResolvedSettings, reference: Reference, *, fail_fast: bool = True
                       ) -> AsyncIterator[Session]:
    """The signature policy, the cache and a client for ``reference``'s registry, closed
    (Fetchers first, then the cache) when the block ends."""
    trust = trust_policy(settings, reference)  # a policy that cannot be built fails before anything opens
    cache = open_cache(settings)
    session: Session | None = None
    try:
        async with open_registry(settings, reference.registry, fail_fast=fail_fast) as client:
            session = Session(settings, reference, cache, client, trust)
            yield session
    finally:
        if session is not None:
            session.close()
        else:
            cache.close()
