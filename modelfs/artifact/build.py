"""``modelfs build``: a Modelfile and a context directory become a ModelPack artifact.

One layer per file, the modctl default (``--raw``): the blob *is* the file, so a weight
file's digest does not change when config.json does, and a re-push uploads only what
changed. ``packing=tar`` (optionally gzip/zstd) writes modctl's ``--raw=false`` format:
a tar holding the one file under its relative path.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..errors import ModelfsError
from ..formats import blockindex
from ..formats.spec import (
    ANNOTATION_FILE_METADATA,
    ANNOTATION_FILEPATH,
    ARTIFACT_TYPE,
    CONFIG_MEDIA_TYPE,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    ModelConfig,
    Packing,
    layer_media_type,
)
from ..formats.zstd import ZstdFile
from ..storage.cache import DEFAULT_BLOCK_SIZE
from . import modelfile as mf
from .layout import Store

# Lets generic OCI tools (oras, ORAS CLI) name the files they pull; modelfs itself reads filepath.
ANNOTATION_TITLE = "org.opencontainers.image.title"
_CONFIG_KEYS = {"ARCH": "architecture", "FORMAT": "format", "PARAMSIZE": "paramSize",
                "PRECISION": "precision", "QUANTIZATION": "quantization"}


@dataclass
class BuildResult:
    reference: str
    manifest_digest: str
    layers: list[Descriptor]
    unmatched: list[str] = field(default_factory=list)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _file_metadata(path: str, rel: str) -> dict:
    st = os.stat(path)
    return {"name": os.path.basename(rel), "mode": stat.S_IMODE(st.st_mode), "uid": 0, "gid": 0,
            "size": st.st_size, "mtime": _rfc3339(st.st_mtime), "typeflag": ord(tarfile.REGTYPE)}


def _tar_layer(store: Store, path: str, rel: str, packing: Packing) -> tuple[str, int, str]:
    """Write a one-member tar (maybe compressed) to a temp file and store it.

    Returns (digest, size, diff_id): the diffId is the digest of the uncompressed tar.
    """
    with tempfile.TemporaryFile(dir=store.root) as tmp:
        info = tarfile.TarInfo(rel)
        st = os.stat(path)
        info.size, info.mode, info.mtime = st.st_size, stat.S_IMODE(st.st_mode), int(st.st_mtime)
        with tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tar, open(path, "rb") as src:
            tar.addfile(info, src)
        tmp.seek(0)
        plain = store.add_stream(tmp)
        if packing is Packing.TAR:
            return plain.digest, plain.size, plain.digest
        tmp.seek(0)
        with tempfile.TemporaryFile(dir=store.root) as packed:
            if packing is Packing.TAR_GZIP:
                with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0) as gz:
                    while chunk := tmp.read(4 << 20):
                        gz.write(chunk)
            else:
                with ZstdFile(packed, mode="w") as zst:
                    while chunk := tmp.read(4 << 20):
                        zst.write(chunk)
            packed.seek(0)
            blob = store.add_stream(packed)
        os.unlink(store.blob_path(plain.digest))
        return blob.digest, blob.size, plain.digest


def _block_index(store: Store, layers: list[Descriptor]) -> dict[str, str]:
    """Hash every randomly readable layer block by block, store the index, and return the
    manifest annotation that names it: the manifest's digest then vouches for the index, so
    mounts may check each block as it arrives, whichever mirror served it."""
    hashes = {layer.digest: blockindex.hash_blocks(store.blob_path(layer.digest), DEFAULT_BLOCK_SIZE)
              for layer in layers if blockindex.indexable(layer.media_type)}
    if not hashes:
        return {}
    blob = store.add_bytes(blockindex.encode(DEFAULT_BLOCK_SIZE, hashes))
    return {blockindex.ANNOTATION: blob.digest}


def build(context: str, modelfile_path: str, reference: str, store: Store,
          packing: Packing = Packing.RAW, block_index: bool = True) -> BuildResult:
    try:
        with open(modelfile_path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ModelfsError(f"cannot read Modelfile {modelfile_path}: {exc.strerror}") from None
    name = os.path.basename(modelfile_path)
    parsed = mf.parse(text, name)
    if not os.path.isdir(context):
        raise ModelfsError(f"build context {context} is not a directory")
    files, unmatched = mf.resolve(parsed, context, name)
    if os.path.realpath(os.path.dirname(os.path.abspath(modelfile_path))) == os.path.realpath(context):
        unmatched = [u for u in unmatched if u != name]
    os.makedirs(store.root, exist_ok=True)
    layers: list[Descriptor] = []
    diff_ids: list[str] = []
    for item in files:
        full = os.path.join(context, item.path)
        annotations = {ANNOTATION_FILEPATH: item.path, ANNOTATION_TITLE: item.path,
                       ANNOTATION_FILE_METADATA: json.dumps(_file_metadata(full, item.path), separators=(",", ":"))}
        if packing is Packing.RAW:
            blob = store.add_file(full)
            digest, size, diff_id = blob.digest, blob.size, blob.digest
        else:
            digest, size, diff_id = _tar_layer(store, full, item.path, packing)
        layers.append(Descriptor(layer_media_type(item.kind, packing), digest, size, annotations))
        diff_ids.append(diff_id)
    meta = parsed.metadata
    descriptor = {"createdAt": _rfc3339(datetime.now(UTC).timestamp())}
    if "NAME" in meta:
        descriptor["name"] = meta["NAME"]
    if "FAMILY" in meta:
        descriptor["family"] = meta["FAMILY"]
    config = ModelConfig(descriptor, {v: meta[k] for k, v in _CONFIG_KEYS.items() if k in meta}, diff_ids)
    config_blob = store.add_bytes(config.to_bytes())
    manifest = Manifest(OCI_MANIFEST, Descriptor(CONFIG_MEDIA_TYPE, config_blob.digest, config_blob.size),
                        layers, ARTIFACT_TYPE, _block_index(store, layers) if block_index else {})
    stored = store.tag(reference, manifest.to_bytes())
    return BuildResult(reference, stored.digest, layers, unmatched)


def read_store_manifest(store: Store, reference: str) -> tuple[str, bytes]:
    blob = store.resolve(reference)
    return blob.digest, store.read_blob(blob.digest)


