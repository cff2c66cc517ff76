"""What makes up each model pulled or mounted, kept beside its blocks: ``models/<hex>.json``.

A record names the model's blobs (``cache stats`` shows how much of each model is cached)
and, since a mount or pull keeps them, its manifest, config and block index as bytes, so the
model can be mounted again while the registry cannot be reached. Those bytes are trusted for
nothing by being here: their digests are checked again on use (:mod:`modelfs.resolve`).

The JSON is what modelfs has always written: ``reference``, ``digest``, ``recorded`` (Unix
time), ``layers`` (``digest``, ``size``, ``path``), then, when kept, ``manifest``,
``media_type``, ``config`` and ``index`` (bytes as base64). Records from before any of those
were kept still read; one that does not parse is passed over, as if absent. Each is
replaced whole (:func:`modelfs.atomic.atomic_write`); a disk too full to take a record costs
only the record: it is logged, and nothing is left behind.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..atomic import atomic_write
from ..errors import CacheError

log = logging.getLogger(__name__)

# Kept for offline mounts, left out of what ``cache stats --json`` shows.
_OFFLINE_ONLY = ("manifest", "media_type", "config")


@dataclass(frozen=True)
class RecordedLayer:
    digest: str
    size: int
    path: str = ""  # org.cncf.model.filepath, if the layer named one


@dataclass(frozen=True)
class ModelRecord:
    reference: str  # without a digest
    digest: str  # of the manifest
    layers: tuple[RecordedLayer, ...]
    recorded: float | None = None  # when; None in records written before it was kept
    manifest: bytes = b""  # exactly as served: its digest is checked on use
    media_type: str = ""
    config: bytes = b""
    index: bytes = b""  # the block index the manifest names, if one was trusted

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"reference": self.reference, "digest": self.digest}
        if self.recorded is not None:
            doc["recorded"] = self.recorded
        doc["layers"] = [{"digest": layer.digest, "size": layer.size, "path": layer.path} for layer in self.layers]
        if self.manifest:
            doc.update(manifest=_b64(self.manifest), media_type=self.media_type, config=_b64(self.config))
        if self.index:
            doc["index"] = _b64(self.index)
        return doc

    def summary(self) -> dict[str, Any]:
        """What ``cache stats --json`` shows: the record without the bytes kept for offline mounts."""
        return {k: v for k, v in self.to_json().items() if k not in _OFFLINE_ONLY}

    @classmethod
    def from_json(cls, doc: Any) -> ModelRecord:
        """Raises ValueError if ``doc`` is not a record (any version's)."""
        if not isinstance(doc, dict) or not isinstance(doc.get("reference"), str) or not isinstance(doc.get("digest"), str):
            raise ValueError("not a model record")
        layers = doc.get("layers", [])
        if not isinstance(layers, list) or not all(isinstance(item, dict) for item in layers):
            raise ValueError("a model record's layers are not a list of layers")
        recorded = doc.get("recorded")
        return cls(doc["reference"], doc["digest"], tuple(_layer(item) for item in layers),
                   float(recorded) if recorded is not None else None,
                   _bytes(doc, "manifest"), str(doc.get("media_type") or ""), _bytes(doc, "config"), _bytes(doc, "index"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bytes(doc: dict[str, Any], key: str) -> bytes:
    value = doc.get(key) or ""
    if not isinstance(value, str):
        raise ValueError(f"a model record's {key} is not base64")
    return base64.b64decode(value)


def _layer(item: dict[str, Any]) -> RecordedLayer:
    if not isinstance(item.get("digest"), str) or not isinstance(item.get("size"), int):
        raise ValueError("a model record's layer has no digest or size")
    return RecordedLayer(item["digest"], item["size"], str(item.get("path") or ""))


class ModelRecords:
    """The records under a cache root's ``models/``."""

    def __init__(self, root: str) -> None:
        self.directory = os.path.join(root, "models")

    def add(self, record: ModelRecord) -> None:
        """Keep ``record``, replacing the one of the same manifest digest."""
        path = os.path.join(self.directory, record.digest.split(":", 1)[-1] + ".json")
        try:
            atomic_write(path, json.dumps(record.to_json()).encode())
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise CacheError(f"cannot record {record.reference} in {self.directory}: {exc.strerror}") from None
            log.warning("cannot record %s in the cache (%s); an offline mount will not find it", record.reference,
                        exc.strerror)

    def all(self) -> list[ModelRecord]:
        """Every record that reads, in file name order."""
        found = []
        for name in self._names():
            try:
                with open(os.path.join(self.directory, name)) as handle:
                    found.append(ModelRecord.from_json(json.load(handle)))
            except (OSError, ValueError):
                continue
        return found

    def newest(self, reference: str, digest: str | None = None) -> ModelRecord | None:
        """The newest record of ``reference`` (or of ``digest``, if given) that kept its manifest."""
        found = [r for r in self.all() if r.manifest and (r.digest == digest if digest else r.reference == reference)]
        return max(found, key=lambda r: r.recorded or 0, default=None)

    def forget_all(self) -> int:
        """Delete every record (``cache prune --all``); returns how many there were."""
        count = 0
        for name in self._names():
            try:
                os.unlink(os.path.join(self.directory, name))
                count += 1
            except OSError:
                continue
        return count

    def _names(self) -> list[str]:
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        return sorted(name for name in names if name.endswith(".json"))
