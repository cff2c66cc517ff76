"""deploy/kubernetes and the Containerfile: every object valid against the Kubernetes API
schemas of the versions a cluster may run (kubernetes-validate, strict: no unknown field),
and the pieces agreeing with each other and with the plugin (driver name, socket paths)."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml
from conftest import REPO_ROOT

from modelfs import __version__
from modelfs.csi import DRIVER_NAME
from modelfs.csi.volume import PER_VOLUME_SETTINGS

DEPLOY = REPO_ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ["1.30.0", "1.33.0", "1.37.0"]


def _objects() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((f"{path.relative_to(DEPLOY)}:{document['kind']}", document))
    return found


def _by_kind(kind: str) -> dict:
    return next(document for _, document in _objects() if document["kind"] == kind)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_kubernetes(version):
    objects = _objects()
    assert {kind.split(":")[1] for kind, _ in objects} >= {"Namespace", "CSIDriver", "ServiceAccount", "DaemonSet", "Pod"}
    for name, document in objects:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name}: {exc.message}") from None


def test_a_schema_error_is_caught():
    """The validation above can fail: a misspelt field is refused."""
    driver = _by_kind("CSIDriver")
    broken = {**driver, "spec": {**driver["spec"], "atachRequired": False}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_csidriver_is_for_ephemeral_volumes_without_attach():
    driver = _by_kind("CSIDriver")
    assert driver["metadata"]["name"] == DRIVER_NAME
    assert driver["spec"]["attachRequired"] is False and driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["volumeLifecycleModes"] == ["Ephemeral"]


def test_the_daemonset_wires_plugin_registrar_and_kubelet_together():
    pod = _by_kind("DaemonSet")["spec"]["template"]["spec"]
    plugin, registrar = (next(c for c in pod["containers"] if c["name"] == name)
                         for name in ("modelfs", "node-driver-registrar"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in plugin["volumeMounts"]}

    assert plugin["args"][0] == "csi" and "--endpoint=unix:///csi/csi.sock" in plugin["args"]
    assert "--csi-address=/csi/csi.sock" in registrar["args"]
    kubelet_socket = f"/var/lib/kubelet/plugins/{DRIVER_NAME}/csi.sock"
    assert f"--kubelet-registration-path={kubelet_socket}" in registrar["args"]
    assert volumes[mounts["/csi"]["name"]]["hostPath"]["path"] == f"/var/lib/kubelet/plugins/{DRIVER_NAME}"

    pods = mounts["/var/lib/kubelet/pods"]
    assert pods["mountPropagation"] == "Bidirectional" and plugin["securityContext"]["privileged"] is True
    assert volumes[pods["name"]]["hostPath"]["path"] == "/var/lib/kubelet/pods"
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    cache = next(a.split("=", 1)[1] for a in plugin["args"] if a.startswith("--cache-dir="))
    assert "hostPath" in volumes[mounts[cache]["name"]], "the cache must be the node's, shared by its pods"
    state = next(a.split("=", 1)[1] for a in plugin["args"] if a.startswith("--state-dir="))
    state_mount = next(path for path in mounts if state.startswith(path + "/"))
    assert volumes[mounts[state_mount]["name"]]["hostPath"]["path"].startswith("/run/"), "records on the host's tmpfs"


def test_the_example_pod_mounts_a_model_the_plugin_accepts():
    pod = _by_kind("Pod")["spec"]
    volume = next(v for v in pod["volumes"] if "csi" in v)["csi"]
    assert volume["driver"] == DRIVER_NAME and volume["readOnly"] is True
    assert set(volume["volumeAttributes"]) <= {"reference", *PER_VOLUME_SETTINGS}
    mount = next(m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == next(
        v["name"] for v in pod["volumes"] if "csi" in v))
    assert mount["mountPath"] == "/models/llama" and mount["mountPropagation"] == "HostToContainer"


def test_the_containerfile_builds_from_this_repository_and_runs_the_plugin():
    text = (REPO_ROOT / "Containerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (REPO_ROOT / path).exists(), f"Containerfile copies {path}, which is not in the repository"
    assert 'ENTRYPOINT ["modelfs"]' in text and 'CMD ["csi"]' in text
    image = next(c["image"] for c in _by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "modelfs")
    assert image.endswith(f":{__version__}")
