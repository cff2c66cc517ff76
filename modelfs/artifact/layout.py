"""A local OCI image layout: where ``build`` puts artifacts and ``push`` takes them from.

Standard layout (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``), one store for all
models, each manifest named by the ``org.opencontainers.image.ref.name`` annotation holding
the full reference, so ``skopeo copy oci:<store>:<ref>`` reads it as well as we do.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from ..atomic import atomic_write
from ..errors import IntegrityError, NotFoundError
from ..formats.spec import OCI_MANIFEST

REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 4 * 1024 * 1024


def default_store_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/modelfs/store"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "modelfs", "store")


@dataclass(frozen=True)
class StoredBlob:
    digest: str
    size: int


class Store:
    def __init__(self, root: str) -> None:
        self.root = root

    def _init(self) -> None:
        os.makedirs(os.path.join(self.root, "blobs", "sha256"), exist_ok=True)
        layout = os.path.join(self.root, "oci-layout")
        if not os.path.exists(layout):
            atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}')
        if not os.path.exists(self._index_path):
            atomic_write(self._index_path, json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}).encode())

    @property
    def _index_path(self) -> str:
        return os.path.join(self.root, "index.json")

    def blob_path(self, digest: str) -> str:
        algo, _, hexpart = digest.partition(":")
        return os.path.join(self.root, "blobs", algo, hexpart)

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def add_bytes(self, data: bytes) -> StoredBlob:
        self._init()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            atomic_write(self.blob_path(digest), data)
        return StoredBlob(digest, len(data))

    def add_stream(self, source: BinaryIO) -> StoredBlob:
        """Copy a stream into the store, hashing on the fly (never the whole blob in memory)."""
        self._init()
        hasher = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "blobs", "sha256"), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            digest = "sha256:" + hasher.hexdigest()
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.blob_path(digest))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return StoredBlob(digest, size)

    def add_file(self, path: str) -> StoredBlob:
        with open(path, "rb") as source:
            return self.add_stream(source)

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in the local store {self.root}") from None

    def read_blob(self, digest: str) -> bytes:
        with self.open_blob(digest) as handle:
            data = handle.read()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"local store blob {digest} is corrupt")
        return data

    def _index(self) -> dict:
        try:
            with open(self._index_path, "rb") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {"schemaVersion": 2, "manifests": []}

    def tag(self, reference: str, manifest: bytes, media_type: str = OCI_MANIFEST) -> StoredBlob:
        """Store a manifest and name it ``reference`` (replacing an older one of that name)."""
        blob = self.add_bytes(manifest)
        index = self._index()
        entries = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != reference]
        entries.append({"mediaType": media_type, "digest": blob.digest, "size": blob.size,
                        "annotations": {REF_NAME: reference}})
        index["manifests"] = entries
        atomic_write(self._index_path, json.dumps(index, indent=2).encode())
        return blob

    def resolve(self, reference: str) -> StoredBlob:
        for entry in self._index().get("manifests", []):
            if entry.get("annotations", {}).get(REF_NAME) == reference:
                return StoredBlob(entry["digest"], entry["size"])
        raise NotFoundError(f"{reference} is not in the local store {self.root}; run `modelfs build -t {reference}` first")

    def references(self) -> Iterator[str]:
        for entry in self._index().get("manifests", []):
            name = entry.get("annotations", {}).get(REF_NAME)
            if name:
                yield name

    def entries(self) -> list[tuple[str, str, int]]:
        """(reference, manifest digest, bytes of its blobs) of every model in the store."""
        out = []
        for entry in self._index().get("manifests", []):
            name = entry.get("annotations", {}).get(REF_NAME)
            if name:
                out.append((name, entry["digest"], sum(self._blob_sizes(entry["digest"]).values())))
        return out

    def _blob_sizes(self, manifest_digest: str) -> dict[str, int]:
        """The blobs a stored manifest needs (itself, config, layers, a named block index)."""
        try:
            manifest = json.loads(self.read_blob(manifest_digest))
        except (NotFoundError, IntegrityError, ValueError):
            return {}
        needed = {manifest_digest: os.path.getsize(self.blob_path(manifest_digest))}
        for blob in [manifest.get("config", {}), *manifest.get("layers", [])]:
            if isinstance(blob, dict) and isinstance(blob.get("digest"), str):
                needed[blob["digest"]] = int(blob.get("size", 0))
        named = manifest.get("annotations", {}).get("dev.modelfs.block-index")
        if isinstance(named, str) and self.has_blob(named):
            needed[named] = os.path.getsize(self.blob_path(named))
        return needed

    def untag(self, reference: str) -> StoredBlob:
        """Forget the name ``reference``, then delete every blob no remaining name needs."""
        found = self.resolve(reference)
        index = self._index()
        index["manifests"] = [m for m in index.get("manifests", [])
                              if m.get("annotations", {}).get(REF_NAME) != reference]
        atomic_write(self._index_path, json.dumps(index, indent=2).encode())
        return found

    @contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """Builds hold the store shared, garbage collection exclusive: blobs a build has
        written but not yet named are never collected under it."""
        self._init()
        with open(os.path.join(self.root, ".lock"), "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield

    def collect_garbage(self) -> int:
        """Delete blobs no named manifest needs; returns the bytes freed."""
        with self.locked(exclusive=True):
            return self._collect_garbage()

    def _collect_garbage(self) -> int:
        needed: set[str] = set()
        for entry in self._index().get("manifests", []):
            needed.update(self._blob_sizes(entry["digest"]))
        directory = os.path.join(self.root, "blobs", "sha256")
        freed = 0
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name.startswith(".") or "sha256:" + name in needed:
                continue
            path = os.path.join(directory, name)
            try:
                freed += os.path.getsize(path)
                os.unlink(path)
            except OSError:
                continue
        return freed

