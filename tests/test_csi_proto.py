"""The CSI messages: csi_pb2.py is what protoc makes of csi.proto today (no hand edits, no
drift), and csi.proto declares the Identity and Node methods kubelet calls."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT

from modelfs.csi import csi_pb2


def test_generated_code_matches_the_proto(tmp_path):
    subprocess.run(["sh", str(REPO_ROOT / "scripts" / "generate_csi.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    for name in ("csi_pb2.py", "csi_pb2.pyi"):
        assert (tmp_path / name).read_text() == (REPO_ROOT / "modelfs" / "csi" / name).read_text(), (
            f"{name} is stale: run scripts/generate_csi.sh")


def test_the_services_kubelet_calls_are_declared():
    services = {s.full_name: sorted(m.name for m in s.methods) for s in csi_pb2.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "csi.v1.Identity": ["GetPluginCapabilities", "GetPluginInfo", "Probe"],
        "csi.v1.Node": ["NodeGetCapabilities", "NodeGetInfo", "NodePublishVolume", "NodeUnpublishVolume"],
    }


def test_the_checker_finds_a_field_that_differs(tmp_path):
    """scripts/check_csi_proto.py (run against the spec by hand: see its docstring) tells a
    changed field number or enum value apart from a faithful subset."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import check_csi_proto
    finally:
        sys.path.pop(0)
    ours = REPO_ROOT / "modelfs" / "csi" / "csi.proto"
    changed = tmp_path / "csi.proto"
    changed.write_text(ours.read_text().replace("string target_path = 4;", "string target_path = 9;"))
    spec = check_csi_proto.compile_descriptors(str(ours))
    assert check_csi_proto.differences(spec, spec) == []
    assert check_csi_proto.differences(check_csi_proto.compile_descriptors(str(changed)), spec) == [
        "field NodePublishVolumeRequest.target_path differs from the spec or is not in it"]
