"""A pod's volume attributes and secret, checked before anything is mounted (no FUSE here)."""

from __future__ import annotations

import json

import pytest

from modelfs.csi import csi_pb2
from modelfs.csi.volume import InvalidVolume, docker_config, parse_attributes, parse_publish


def test_attributes_become_mount_flags():
    reference, parsed = parse_attributes({"reference": "reg.example.com/org/llama:8b", "prefetch": "none",
                                          "timeout": "30", "plain_http": "TRUE", "uid": "1000", "file_mode": "0440"})
    assert reference == "reg.example.com/org/llama:8b"
    assert parsed == {"prefetch": "none", "timeout": 30.0, "plain_http": True, "uid": 1000, "file_mode": 0o440}


def test_publish_request_keeps_the_pods_attributes_without_kubelets():
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-abc", target_path="/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/m/mount",
        volume_capability=csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume()),
        volume_context={"reference": "reg.example.com/org/llama:8b", "plain_http": "false", "dir_mode": "750",
                        "csi.storage.k8s.io/pod.name": "p", "csi.storage.k8s.io/ephemeral": "true"})
    spec = parse_publish(request)
    assert spec.attributes == {"reference": "reg.example.com/org/llama:8b", "plain_http": "false", "dir_mode": "750"}
    assert spec.mount_flags() == ["--dir-mode", "750"]  # a false switch is no flag at all
    assert spec.docker_config is None
    assert spec.same_volume("csi-abc", spec.attributes) and not spec.same_volume("csi-abd", spec.attributes)


def test_a_relative_target_and_mount_options_are_refused():
    capability = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=["ro", "exec"]))
    request = csi_pb2.NodePublishVolumeRequest(volume_id="v", target_path="relative", volume_capability=capability)
    with pytest.raises(InvalidVolume, match="absolute path"):
        parse_publish(request)
    request.target_path = "/t"
    with pytest.raises(InvalidVolume, match="mount option 'exec' is not supported"):
        parse_publish(request)
    request.volume_capability.mount.ClearField("mount_flags")
    request.volume_capability.mount.fs_type = "ext4"
    with pytest.raises(InvalidVolume, match="fsType 'ext4'"):
        parse_publish(request)


def test_secrets_in_every_form_kubernetes_keeps_them():
    auths = {"reg.example.com": {"auth": "YWxpY2U6cHc="}}
    assert docker_config({".dockerconfigjson": json.dumps({"auths": auths})}, "reg.example.com") == {"auths": auths}
    assert docker_config({".dockercfg": json.dumps(auths)}, "reg.example.com") == {"auths": auths}
    assert docker_config({"username": "alice", "password": "pw"}, "reg.example.com") == {
        "auths": {"reg.example.com": {"username": "alice", "password": "pw"}}}
    assert docker_config({}, "reg.example.com") is None


def test_a_bad_secret_is_named_by_its_keys_never_its_values():
    for secrets, expected in [({".dockerconfigjson": "hunter2"}, "is not JSON"),
                              ({".dockerconfigjson": '["hunter2"]'}, "not a JSON object"),
                              ({".dockerconfigjson": '{"credHelpers": {"r": "hunter2"}}'}, "credential helpers"),
                              ({".dockerconfigjson": '{"hunter2": 1}'}, 'no "auths" object'),
                              ({"password": "hunter2"}, "keys password holds no registry credentials")]:
        with pytest.raises(InvalidVolume, match=expected) as refused:
            docker_config(secrets, "reg.example.com")
        assert "hunter2" not in str(refused.value)
