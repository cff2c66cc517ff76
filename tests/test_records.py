"""The cache's model records (modelfs/storage/records.py): typed, and the same JSON on disk
as modelfs has always written, so records written by earlier versions still read."""

from __future__ import annotations

import base64
import json

from modelfs.storage.records import ModelRecord, ModelRecords, RecordedLayer

DIGEST = "sha256:" + "ab" * 32
LAYERS = [{"digest": "sha256:" + "01" * 32, "size": 123, "path": "config.json"},
          {"digest": "sha256:" + "02" * 32, "size": 4567, "path": ""}]


def _current(reference: str = "registry.example/org/model", digest: str = DIGEST, recorded: float = 1.7e9) -> dict:
    """A record as mount and pull write it (its keys in the order they always had)."""
    return {"reference": reference, "digest": digest, "recorded": recorded, "layers": LAYERS,
            "manifest": base64.b64encode(b'{"manifest": 1}').decode(), "media_type": "application/vnd.oci.image.manifest.v1+json",
            "config": base64.b64encode(b'{"config": 1}').decode(), "index": base64.b64encode(b"index bytes").decode()}


def test_a_record_reads_typed_and_writes_back_the_same_json():
    doc = _current()
    record = ModelRecord.from_json(doc)
    assert record.manifest == b'{"manifest": 1}' and record.config == b'{"config": 1}' and record.index == b"index bytes"
    assert record.layers[0] == RecordedLayer("sha256:" + "01" * 32, 123, "config.json")
    assert json.dumps(record.to_json()) == json.dumps(doc)
    assert record.summary() == {k: v for k, v in doc.items() if k not in ("manifest", "config", "media_type")}


def test_records_written_before_offline_mounts_still_read(tmp_path):
    """The first records (cache stats only) had neither the time, nor manifest and config."""
    old = {"reference": "registry.example/org/old", "digest": "sha256:" + "cd" * 32, "layers": LAYERS}
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ("cd" * 32 + ".json")).write_text(json.dumps(old))
    records = ModelRecords(str(tmp_path))
    [record] = records.all()
    assert record.recorded is None and not record.manifest and record.summary() == old
    assert records.newest("registry.example/org/old") is None  # nothing to mount offline from


def test_the_newest_record_with_a_manifest_is_found_by_reference_or_digest(tmp_path):
    records = ModelRecords(str(tmp_path))
    records.add(ModelRecord.from_json(_current(digest="sha256:" + "11" * 32, recorded=100.0)))
    records.add(ModelRecord.from_json(_current(digest="sha256:" + "22" * 32, recorded=200.0)))
    records.add(ModelRecord.from_json(_current(reference="registry.example/other", digest="sha256:" + "33" * 32)))
    found = records.newest("registry.example/org/model")
    assert found is not None and found.digest == "sha256:" + "22" * 32
    by_digest = records.newest("registry.example/org/model", "sha256:" + "11" * 32)
    assert by_digest is not None and by_digest.recorded == 100.0
    assert json.loads((tmp_path / "models" / ("11" * 32 + ".json")).read_text()) == _current(
        digest="sha256:" + "11" * 32, recorded=100.0)
    assert not list((tmp_path / "models").glob("*.tmp")) and not list((tmp_path / "models").glob(".tmp*"))


def test_a_record_that_does_not_parse_is_passed_over_and_still_forgotten(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.json").write_text("{not json")
    (models / "b.json").write_text("[1, 2]")
    (models / "c.json").write_text(json.dumps({"reference": "r", "layers": []}))  # no digest
    (models / "d.json").write_text(json.dumps({**_current(), "manifest": "abc"}))  # not base64
    (models / "e.json").write_text(json.dumps(_current()))
    records = ModelRecords(str(tmp_path))
    assert [r.digest for r in records.all()] == [DIGEST]
    assert records.forget_all() == 5 and records.all() == []
