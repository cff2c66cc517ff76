"""The CNCF ModelPack v1 artifact format, typed.

Media types and annotation keys are exactly those of ``modelpack/model-spec`` (specs-go/v1);
the pre-CNCF ``vnd.cnai`` names that older modctl and Harbor wrote are read too. Parsing is
strict about what would make us serve wrong bytes (sizes, digests, paths) and lenient about
what does not (unknown annotations, optional config fields).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..errors import ManifestError, NotAModelError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])

ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.cncf.model.config.v1+json"
LEGACY_ARTIFACT_TYPE = "application/vnd.cnai.model.manifest.v1+json"
LEGACY_CONFIG_MEDIA_TYPE = "application/vnd.cnai.model.config.v1+json"

ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANNOTATION_MEDIATYPE_UNTESTED = "org.cncf.model.file.mediatype.untested"
LEGACY_ANNOTATION_FILEPATH = "org.cnai.model.filepath"
LEGACY_ANNOTATION_FILE_METADATA = "org.cnai.model.file.metadata+json"

_MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # Distribution's own limit; bigger is hostile
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class Packing(Enum):
    """How a layer's blob holds its file(s)."""

    RAW = "raw"
    TAR = "tar"
    TAR_GZIP = "tar+gzip"
    TAR_ZSTD = "tar+zstd"


class Kind(Enum):
    """What a layer carries; picks the media type and the Modelfile command."""

    WEIGHT = "weight"
    WEIGHT_CONFIG = "weight.config"
    DOC = "doc"
    CODE = "code"
    DATASET = "dataset"


def layer_media_type(kind: Kind, packing: Packing) -> str:
    return f"application/vnd.cncf.model.{kind.value}.v1.{packing.value}"


_LAYER_TYPE = re.compile(
    r"application/vnd\.(?:cncf|cnai)\.model\.(weight\.config|weight|doc|code|dataset|layer)\.v1\.(raw|tar|tar\+gzip|tar\+zstd)"
)


def classify_layer(media_type: str) -> tuple[Kind, Packing] | None:
    """Kind and packing of a model layer media type, or None if it is not one."""
    match = _LAYER_TYPE.fullmatch(media_type)
    if not match:
        return None
    kind_name = "weight" if match.group(1) == "layer" else match.group(1)
    return Kind(kind_name), Packing(match.group(2))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def filepath(self) -> str | None:
        return self.annotations.get(ANNOTATION_FILEPATH) or self.annotations.get(LEGACY_ANNOTATION_FILEPATH)

    @property
    def file_metadata(self) -> dict[str, Any] | None:
        raw = self.annotations.get(ANNOTATION_FILE_METADATA) or self.annotations.get(LEGACY_ANNOTATION_FILE_METADATA)
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def parse_descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: descriptor is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{where}: missing mediaType")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ManifestError(f"{where}: digest {digest!r} is not sha256:<64 hex>")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where}: size {size!r} is not a non-negative integer")
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ManifestError(f"{where}: annotations must map strings to strings")
    artifact_type = value.get("artifactType")
    return Descriptor(media_type, digest, size, dict(annotations), artifact_type if isinstance(artifact_type, str) else None)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None

    @property
    def is_model(self) -> bool:
        return self.artifact_type in (ARTIFACT_TYPE, LEGACY_ARTIFACT_TYPE) or self.config.media_type in (
            CONFIG_MEDIA_TYPE,
            LEGACY_CONFIG_MEDIA_TYPE,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["config"] = self.config.to_json()
        out["layers"] = [layer.to_json() for layer in self.layers]
        if self.subject:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def load_json(data: bytes, what: str) -> Any:
    if len(data) > _MAX_MANIFEST_BYTES:
        raise ManifestError(f"{what} is {len(data)} bytes, over the {_MAX_MANIFEST_BYTES}-byte limit")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from None


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest:
    """Parse an OCI (or Docker v2) image manifest. Indexes are rejected here; see ``is_index``."""
    doc = load_json(data, "manifest")
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    mt = doc.get("mediaType") or media_type or OCI_MANIFEST
    if mt in (OCI_INDEX, DOCKER_MANIFEST_LIST) or "manifests" in doc:
        raise ManifestError("reference points to an image index, not a single manifest")
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    config = parse_descriptor(doc.get("config"), "manifest config")
    layers_raw = doc.get("layers")
    if not isinstance(layers_raw, list):
        raise ManifestError("manifest has no layers list")
    layers = [parse_descriptor(layer, f"layer {i}") for i, layer in enumerate(layers_raw)]
    subject = parse_descriptor(doc["subject"], "subject") if doc.get("subject") else None
    annotations = doc.get("annotations") or {}
    artifact_type = doc.get("artifactType")
    return Manifest(mt, config, layers, artifact_type if isinstance(artifact_type, str) else None,
                    dict(annotations) if isinstance(annotations, dict) else {}, subject)


def is_index(data: bytes) -> bool:
    doc = load_json(data, "manifest")
    return isinstance(doc, dict) and (doc.get("mediaType") in (OCI_INDEX, DOCKER_MANIFEST_LIST) or "manifests" in doc)


def require_model(manifest: Manifest, reference: str) -> None:
    """Raise a clear error when ``reference`` is a container image or another artifact."""
    if manifest.is_model:
        return
    what = manifest.artifact_type or manifest.config.media_type
    if "image.config" in manifest.config.media_type or "container.image" in manifest.config.media_type:
        raise NotAModelError(f"{reference} is a container image ({what}), not a ModelPack model")
    raise NotAModelError(f"{reference} is not a ModelPack model (artifact type {what})")


@dataclass(frozen=True)
class ModelConfig:
    """The config blob (``application/vnd.cncf.model.config.v1+json``)."""

    descriptor: dict[str, Any]
    config: dict[str, Any]
    diff_ids: list[str]

    @property
    def name(self) -> str | None:
        return self.descriptor.get("name")

    def to_json(self) -> dict[str, Any]:
        return {
            "descriptor": self.descriptor,
            "modelfs": {"type": "layers", "diffIds": list(self.diff_ids)},
            "config": self.config,
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def parse_config(data: bytes) -> ModelConfig:
    doc = load_json(data, "model config")
    if not isinstance(doc, dict):
        raise ManifestError("model config is not a JSON object")
    descriptor = doc.get("descriptor") or {}
    config = doc.get("config") or {}
    modelfs = doc.get("modelfs") or {}
    if not isinstance(descriptor, dict) or not isinstance(config, dict) or not isinstance(modelfs, dict):
        raise ManifestError("model config: descriptor, config and modelfs must be objects")
    diff_ids = modelfs.get("diffIds") or modelfs.get("diff_ids") or []
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ManifestError("model config: modelfs.diffIds must be a list of digests")
    return ModelConfig(descriptor, config, diff_ids)
