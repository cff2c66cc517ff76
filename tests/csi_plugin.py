"""The real ``modelfs csi`` plugin in a subprocess, and a real gRPC client speaking CSI to it
over its unix socket, as kubelet would, with kubelet's directory layout under a temp root."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

from modelfs.csi import csi_pb2


class CsiClient:
    def __init__(self, socket_path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")

    def call(self, service: str, method: str, request, timeout: float = 150):
        descriptor = csi_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
        response = getattr(csi_pb2, descriptor.output_type.name)
        rpc = self.channel.unary_unary(f"/csi.v1.{service}/{method}", request_serializer=type(request).SerializeToString,
                                       response_deserializer=response.FromString)
        return rpc(request, timeout=timeout)

    def publish(self, volume_id: str, target: Path, attributes: dict[str, str], secrets: dict[str, str] | None = None,
                block: bool = False, timeout: float = 150):
        capability = csi_pb2.VolumeCapability(
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        if block:
            capability.block.SetInParent()
        else:
            capability.mount.SetInParent()
        # kubelet adds the pod's identity (podInfoOnMount) and marks inline volumes ephemeral
        context = {"csi.storage.k8s.io/pod.name": "inference", "csi.storage.k8s.io/pod.namespace": "default",
                   "csi.storage.k8s.io/ephemeral": "true", **attributes}
        request = csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=str(target),
                                                   volume_capability=capability, volume_context=context,
                                                   secrets=secrets or {})
        return self.call("Node", "NodePublishVolume", request, timeout)

    def unpublish(self, volume_id: str, target: Path):
        return self.call("Node", "NodeUnpublishVolume",
                         csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)))

    def close(self) -> None:
        self.channel.close()


class Plugin:
    """``modelfs csi`` with its socket, state, cache and log under ``root``."""

    def __init__(self, root: Path, env: dict[str, str], check_interval: float = 3600, kubelet_link: bool = False) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        if kubelet_link:  # kubelet's root reached through a symlink (/var/lib/kubelet -> /data/kubelet)
            (root / "data" / "kubelet").mkdir(parents=True)
            (root / "kubelet").symlink_to(root / "data" / "kubelet")
        self.socket = root / "plugin" / "csi.sock"
        self.state = root / "state"
        self.cache = root / "cache"
        self.log = root / "plugin.log"
        self.pods = root / "kubelet" / "pods"
        self.env = env
        self.check_interval = check_interval
        self.process: subprocess.Popen | None = None
        self.client = CsiClient(self.socket)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modelfs", "csi", "--endpoint", f"unix://{self.socket}", "--node-id", "gpu-node-1",
                 "--state-dir", str(self.state), "--cache-dir", str(self.cache), "--check-interval",
                 str(self.check_interval), "--log-level", "info"], env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.call("Identity", "Probe", csi_pb2.ProbeRequest(), timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(f"the plugin did not answer a Probe:\n{self.log.read_text()}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def target(self, name: str = "model") -> Path:
        """A target path as kubelet lays it out; kubelet creates the volume's directory, the
        plugin the ``mount`` directory in it."""
        volume = self.pods / str(uuid.uuid4()) / "volumes" / "kubernetes.io~csi" / name
        volume.mkdir(parents=True)
        return volume / "mount"

    def cleanup(self) -> None:
        self.client.close()
        if self.process is not None and self.process.poll() is None:
            self.kill()
        with open("/proc/self/mountinfo") as handle:
            points = [line.split()[4] for line in handle]
        for point in reversed(points):
            if point.startswith(str(self.root)):
                subprocess.run(["umount", "-l", point], capture_output=True)


def dockerconfigjson(registry: str, username: str, password: str) -> dict[str, str]:
    """The data of a kubernetes.io/dockerconfigjson secret, as `kubectl create secret
    docker-registry` makes it (kubelet hands the decoded values to the plugin)."""
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {".dockerconfigjson": json.dumps({"auths": {registry: {"username": username, "password": password,
                                                                   "auth": auth}}})}


def as_mounted(target: Path) -> str:
    """``target`` as the mount table shows it: its parent's symlinks followed (the target
    itself, a mount point, is not stat-ed)."""
    return os.path.join(os.path.realpath(target.parent), target.name)


def mounted(target: Path) -> bool:
    with open("/proc/self/mountinfo") as handle:
        return any(line.split()[4] == as_mounted(target) for line in handle)


def daemon_of(target: Path, env: dict[str, str]) -> int:
    """The pid of the daemon serving ``target``, from `modelfs status --json`."""
    status = subprocess.run([sys.executable, "-m", "modelfs", "status", "--json"], env=env, capture_output=True,
                            text=True, check=True)
    return next(m["pid"] for m in json.loads(status.stdout) if m["mountpoint"] == as_mounted(target))


def wait_serving(target: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.listdir(target)
            if mounted(target):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{target} did not serve again within {seconds}s")
        time.sleep(0.2)
