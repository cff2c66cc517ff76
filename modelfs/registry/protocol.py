"""What reading a model needs from a registry, as a Protocol: the one registry client and the
client that reads through mirrors first both provide it, and everything that only reads
(resolving, mounting, pulling, extracting) is typed against it, so either can be passed and
the type checker says so."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from .client import BlobBody
from .ranges import BlobLocation


class RegistryReader(Protocol):
    registry: str

    @property
    def ca_file(self) -> str | None: ...

    async def get_manifest(self, repository: str, target: str) -> tuple[bytes, str, str]: ...

    async def get_blob(self, repository: str, digest: str, max_size: int = 4 << 20) -> bytes: ...

    async def blob_size(self, repository: str, digest: str) -> int | None: ...

    async def referrers(self, repository: str, digest: str) -> bytes | None: ...

    def stream_blob(self, repository: str, digest: str, start: int | None = None,
                    end: int | None = None) -> AbstractAsyncContextManager[BlobBody]: ...

    async def blob_location(self, repository: str, digest: str) -> BlobLocation: ...

    async def locate_blob(self, repository: str, digest: str) -> BlobLocation: ...

    def moved_location(self, location: BlobLocation, url: str) -> BlobLocation: ...
