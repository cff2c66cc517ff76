"""The ModelPack format: what parses, and the one-line error for what does not."""

import json

import pytest

from modelfs.errors import ManifestError, NotAModelError
from modelfs.formats.spec import (
    ARTIFACT_TYPE,
    CONFIG_MEDIA_TYPE,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Kind,
    Manifest,
    Packing,
    classify_layer,
    is_index,
    layer_media_type,
    parse_config,
    parse_manifest,
    require_model,
)

DIGEST = "sha256:" + "ab" * 32
CONFIG = {"mediaType": CONFIG_MEDIA_TYPE, "digest": DIGEST, "size": 2}
LAYER = {"mediaType": layer_media_type(Kind.WEIGHT, Packing.RAW), "digest": DIGEST, "size": 10,
         "annotations": {"org.cncf.model.filepath": "model.safetensors"}}


def manifest(**changes) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
           "config": CONFIG, "layers": [LAYER]}
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def test_a_model_manifest_round_trips():
    parsed = parse_manifest(manifest())
    assert parsed.is_model and parsed.layers[0].filepath == "model.safetensors"
    assert parse_manifest(parsed.to_bytes()) == parsed


@pytest.mark.parametrize("data, fragment", [
    (b"{not json", "manifest is not valid JSON"),
    (b"[]", "manifest is not a JSON object"),
    (b" " * (4 * 1024 * 1024 + 1), "over the 4194304-byte limit"),
    (manifest(manifests=[]), "image index, not a single manifest"),
    (manifest(mediaType=OCI_INDEX), "image index, not a single manifest"),
    (manifest(schemaVersion=1), "unsupported manifest schemaVersion 1"),
    (manifest(config=None), "manifest config: descriptor is not an object"),
    (manifest(layers=None), "manifest has no layers list"),
    (manifest(layers=[{**LAYER, "mediaType": ""}]), "layer 0: missing mediaType"),
    (manifest(layers=[{**LAYER, "digest": "sha256:abc"}]), "layer 0: digest 'sha256:abc' is not sha256:<64 hex>"),
    (manifest(layers=[{**LAYER, "digest": "md5:" + "a" * 32}]), "is not sha256:<64 hex>"),
    (manifest(layers=[LAYER, {**LAYER, "size": -1}]), "layer 1: size -1 is not a non-negative integer"),
    (manifest(layers=[{**LAYER, "size": True}]), "size True is not a non-negative integer"),
    (manifest(layers=[{**LAYER, "size": "10"}]), "size '10' is not a non-negative integer"),
    (manifest(layers=[{**LAYER, "annotations": {"k": 1}}]), "layer 0: annotations must map strings to strings"),
    (manifest(subject={"mediaType": OCI_MANIFEST}), "subject: digest None is not sha256:<64 hex>"),
])
def test_malformed_manifests_say_why(data, fragment):
    with pytest.raises(ManifestError) as info:
        parse_manifest(data)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_indexes_are_recognised():
    assert is_index(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode())
    assert is_index(json.dumps({"schemaVersion": 2, "manifests": []}).encode())
    assert not is_index(manifest())


@pytest.mark.parametrize("changes, fragment", [
    ({"artifactType": None, "config": {**CONFIG, "mediaType": "application/vnd.oci.image.config.v1+json"}},
     "is a container image (application/vnd.oci.image.config.v1+json), not a ModelPack model"),
    ({"artifactType": None, "config": {**CONFIG, "mediaType": "application/vnd.docker.container.image.v1+json"}},
     "is a container image"),
    ({"artifactType": "application/vnd.example.thing", "config": {**CONFIG, "mediaType": "application/json"}},
     "is not a ModelPack model (artifact type application/vnd.example.thing)"),
])
def test_non_models_are_refused_by_name(changes, fragment):
    with pytest.raises(NotAModelError) as info:
        require_model(parse_manifest(manifest(**changes)), "r.io/x:y")
    assert str(info.value).startswith("r.io/x:y ") and fragment in str(info.value)


@pytest.mark.parametrize("artifact_type, config_type", [
    (ARTIFACT_TYPE, "application/json"),
    (None, CONFIG_MEDIA_TYPE),
    ("application/vnd.cnai.model.manifest.v1+json", "application/json"),  # written by older modctl
    (None, "application/vnd.cnai.model.config.v1+json"),
])
def test_models_are_recognised_by_artifact_or_config_type(artifact_type, config_type):
    require_model(parse_manifest(manifest(artifactType=artifact_type, config={**CONFIG, "mediaType": config_type})), "r")


@pytest.mark.parametrize("media_type, expected", [
    ("application/vnd.cncf.model.weight.v1.raw", (Kind.WEIGHT, Packing.RAW)),
    ("application/vnd.cncf.model.weight.config.v1.tar", (Kind.WEIGHT_CONFIG, Packing.TAR)),
    ("application/vnd.cncf.model.doc.v1.tar+gzip", (Kind.DOC, Packing.TAR_GZIP)),
    ("application/vnd.cncf.model.code.v1.tar+zstd", (Kind.CODE, Packing.TAR_ZSTD)),
    ("application/vnd.cncf.model.dataset.v1.raw", (Kind.DATASET, Packing.RAW)),
    ("application/vnd.cnai.model.layer.v1.tar", (Kind.WEIGHT, Packing.TAR)),
    ("application/vnd.cncf.model.weight.v1.tar+lz4", None),
    ("application/vnd.oci.image.layer.v1.tar+gzip", None),
])
def test_layer_media_types_classify(media_type, expected):
    assert classify_layer(media_type) == expected


def test_every_kind_and_packing_names_a_type_that_classifies_back():
    for kind in Kind:
        for packing in Packing:
            assert classify_layer(layer_media_type(kind, packing)) == (kind, packing)


def test_config_parses_and_round_trips():
    doc = {"descriptor": {"name": "minilm", "family": "bert"}, "config": {"format": "safetensors"},
           "modelfs": {"type": "layers", "diffIds": [DIGEST]}}
    config = parse_config(json.dumps(doc).encode())
    assert config.name == "minilm" and config.diff_ids == [DIGEST]
    assert parse_config(config.to_bytes()) == config


@pytest.mark.parametrize("doc, fragment", [
    ([], "model config is not a JSON object"),
    ({"descriptor": "minilm"}, "descriptor, config and modelfs must be objects"),
    ({"modelfs": {"diffIds": "sha256:x"}}, "modelfs.diffIds must be a list of digests"),
    ({"modelfs": {"diffIds": [1]}}, "modelfs.diffIds must be a list of digests"),
])
def test_malformed_configs_say_why(doc, fragment):
    with pytest.raises(ManifestError, match=fragment.replace(".", r"\.")):
        parse_config(json.dumps(doc).encode())


def test_file_metadata_is_read_leniently():
    meta = Descriptor(LAYER["mediaType"], DIGEST, 1, {"org.cncf.model.file.metadata+json": '{"mode": 420}'})
    assert meta.file_metadata == {"mode": 420}
    for raw in ("not json", "[1, 2]"):
        assert Descriptor(LAYER["mediaType"], DIGEST, 1, {"org.cncf.model.file.metadata+json": raw}).file_metadata is None
    assert Manifest(OCI_MANIFEST, Descriptor(CONFIG_MEDIA_TYPE, DIGEST, 2), []).is_model
