"""The CSI node plugin, spoken to by a real gRPC client over its unix socket, publishing a real
model from a real registry through real FUSE mounts (kubelet's part played by the test)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import time
import uuid

import grpc
import pytest
from csi_plugin import Plugin, as_mounted, daemon_of, dockerconfigjson, mounted, wait_serving
from trees import assert_same_tree

from modelfs.csi import DRIVER_NAME, csi_pb2

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@pytest.fixture
def plugin(tmp_path, cli):
    running = Plugin(tmp_path / "node", cli.env)
    running.start()
    yield running
    running.cleanup()


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code(), failed.value.details()


def _model(reference: str, **settings: str) -> dict[str, str]:
    return {"reference": reference, "plain_http": "true", **settings}


def test_identity_and_node_queries(plugin):
    info = plugin.client.call("Identity", "GetPluginInfo", csi_pb2.GetPluginInfoRequest())
    assert info.name == DRIVER_NAME and info.vendor_version
    assert plugin.client.call("Identity", "Probe", csi_pb2.ProbeRequest()).ready.value is True
    assert not plugin.client.call("Identity", "GetPluginCapabilities", csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    assert plugin.client.call("Node", "NodeGetInfo", csi_pb2.NodeGetInfoRequest()).node_id == "gpu-node-1"
    assert not plugin.client.call("Node", "NodeGetCapabilities", csi_pb2.NodeGetCapabilitiesRequest()).capabilities
    stage = plugin.client.channel.unary_unary("/csi.v1.Node/NodeStageVolume", request_serializer=bytes,
                                              response_deserializer=bytes)
    assert _code(lambda: stage(b"", timeout=10))[0] == grpc.StatusCode.UNIMPLEMENTED
    assert os.stat(plugin.socket).st_mode & 0o077 == 0, "only root may ask for mounts"


def test_publish_serves_the_model_and_unpublish_leaves_nothing(plugin, minilm_ref, minilm_dir, cli):
    target = plugin.target()
    plugin.client.publish("vol-1", target, _model(minilm_ref))
    assert_same_tree(target, minilm_dir)
    with pytest.raises(OSError) as refused:
        open(target / "config.json", "w")
    assert refused.value.errno == errno.EROFS
    mode = os.stat(target / "config.json").st_mode & 0o777
    assert mode == 0o444, oct(mode)  # any user of the pod may read it
    pid = daemon_of(target, cli.env)

    plugin.client.publish("vol-1", target, _model(minilm_ref))  # kubelet repeats itself: success, same mount
    assert daemon_of(target, cli.env) == pid
    code, message = _code(lambda: plugin.client.publish("vol-2", target, _model(minilm_ref)))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already holds volume vol-1" in message
    code, message = _code(lambda: plugin.client.publish("vol-1", target, _model(minilm_ref, prefetch="none")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, message = _code(lambda: plugin.client.unpublish("vol-2", target))
    assert code == grpc.StatusCode.NOT_FOUND and mounted(target)

    plugin.client.unpublish("vol-1", target)
    assert not mounted(target) and not target.exists()
    assert _exits(pid), "the daemon must exit with its mount"
    assert not list((plugin.state / "volumes").iterdir()), "the record must go with the volume"
    assert not list((plugin.cache / "logs").iterdir()), "so must its daemon's log"
    plugin.client.unpublish("vol-1", target)  # a repeat succeeds


def _exits(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_publish_returns_when_the_mount_answers_not_after_a_pull(plugin, minilm_ref, minilm_dir, registry, faulty, cli):
    """The weights trickle at 2 KiB/s: a publish that waited for them would take hours."""
    manifest = json.loads(cli.run("inspect", "--plain-http", "--json", minilm_ref).stdout)["manifest"]
    faulty.only = next(layer["digest"] for layer in manifest["layers"]
                       if layer["annotations"]["org.cncf.model.filepath"] == "model.safetensors")
    faulty.persistent = "trickle"
    target = plugin.target()
    started = time.monotonic()
    plugin.client.publish("vol-slow", target, _model(minilm_ref.replace(registry.address, faulty.address)))
    assert time.monotonic() - started < 30
    assert (target / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
    assert os.getxattr(target / "model.safetensors", "user.modelfs.cached") != b"1.0000"
    plugin.client.unpublish("vol-slow", target)  # while the weights still trickle in
    assert not mounted(target) and not target.exists()


def test_two_pods_on_a_node_fetch_a_model_once(plugin, minilm_ref, minilm_dir, registry, proxy):
    reference = minilm_ref.replace(registry.address, proxy.address)
    first, second = plugin.target("a"), plugin.target("b")
    plugin.client.publish("vol-a", first, _model(reference, prefetch="none"))
    assert_same_tree(first, minilm_dir)
    fetched = proxy.downstream_bytes
    plugin.client.publish("vol-b", second, _model(reference))
    assert_same_tree(second, minilm_dir)
    size = sum(p.stat().st_size for p in minilm_dir.rglob("*") if p.is_file())
    assert fetched >= size and proxy.downstream_bytes - fetched < 64 * 1024, (fetched, proxy.downstream_bytes)


def test_two_pods_starting_at_once_fetch_a_model_once(plugin, minilm_ref, minilm_dir, registry, proxy):
    """Two daemons on one cache fetch each block once: each waits for the blocks the other
    is fetching (claims.py) instead of fetching them too."""
    reference = minilm_ref.replace(registry.address, proxy.address)
    targets = [plugin.target(f"p{i}") for i in range(2)]
    failures: list[BaseException] = []

    def publish(volume: str, target) -> None:
        try:
            plugin.client.publish(volume, target, _model(reference))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
    threads = [threading.Thread(target=publish, args=(f"vol-{i}", t)) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    for target in targets:
        assert_same_tree(target, minilm_dir)
    size = sum(p.stat().st_size for p in minilm_dir.rglob("*") if p.is_file())
    assert proxy.downstream_bytes < size * 1.05, proxy.downstream_bytes / size


@pytest.mark.parametrize(("attributes", "expected"), [
    ({}, "'reference' is required"),
    ({"reference": "registry.example.com/Org/LLAMA:8b"}, "volumeAttributes.reference"),
    ({"reference": "127.0.0.1:5000/m:v1", "refrence": "x"}, "unknown key 'refrence'"),
    ({"reference": "127.0.0.1:5000/m:v1", "prefetch": "sometimes"}, "volumeAttributes.prefetch must be"),
    ({"reference": "127.0.0.1:5000/m:v1", "timeout": "-1"}, "volumeAttributes.timeout"),
    ({"reference": "127.0.0.1:5000/m:v1", "uid": "root"}, "volumeAttributes.uid must be a number"),
    ({"reference": "127.0.0.1:5000/m:v1", "uid": "4294967296"}, "volumeAttributes.uid: '4294967296' is not a user id"),
    ({"reference": "127.0.0.1:5000/m:v1", "uid": "\u00b2"}, "volumeAttributes.uid: '\u00b2' is not a user id"),
    ({"reference": "127.0.0.1:5000/m:v1", "plain_http": "yes"}, "volumeAttributes.plain_http must be"),
    ({"reference": "127.0.0.1:5000/m:v1", "cache_dir": "/"}, "unknown key 'cache_dir'"),
])
def test_bad_attributes_are_invalid_argument(plugin, attributes, expected):
    target = plugin.target()
    code, message = _code(lambda: plugin.client.publish("vol-bad", target, attributes))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in message, message
    assert not target.exists() and not list((plugin.state / "volumes").iterdir())


def test_bad_volumes_and_secrets_are_invalid_argument(plugin, minilm_ref):
    target = plugin.target()
    cases = [
        (dict(block=True), "not a block device"),
        (dict(secrets={".dockerconfigjson": "{not json"}), ".dockerconfigjson is not JSON"),
        (dict(secrets={".dockerconfigjson": '{"credsStore": "desktop"}'}), "credential helpers"),
        (dict(secrets={"token": "abc"}), "keys token holds no registry credentials"),
    ]
    for extra, expected in cases:
        code, message = _code(lambda extra=extra: plugin.client.publish("vol-bad", target, _model(minilm_ref), **extra))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in message, message
        assert "abc" not in message and not target.exists()


def test_a_missing_model_is_not_found(plugin, registry):
    target = plugin.target()
    code, message = _code(lambda: plugin.client.publish("vol-x", target, _model(f"{registry.address}/no/such:model")))
    assert code == grpc.StatusCode.NOT_FOUND and "no/such" in message, message
    assert not target.exists() and not mounted(target)


@pytest.fixture(scope="module")
def private_model(basic_registry, session_cli, small_minilm):
    """The sample model's layout (small_minilm) in a registry that wants alice's password."""
    from conftest import SAMPLE_MODELFILE
    ref = f"{basic_registry.address}/private/minilm:v1"
    session_cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
    session_cli.run("login", "--plain-http", basic_registry.address, "-u", "alice", "--password-stdin",
                    input="s3cret-pass\n")
    try:
        session_cli.run("push", "--plain-http", ref)
    finally:
        session_cli.run("logout", basic_registry.address)
    return ref


def test_credentials_come_from_the_pods_secret(plugin, private_model, basic_registry, small_minilm, cli):
    registry = basic_registry.address
    target = plugin.target()
    # The node itself may read the model (its Docker config has alice's password): a pod that
    # gave no secret still may not.
    node_config = cli.home / "docker" / "config.json"
    node_config.parent.mkdir(parents=True, exist_ok=True)
    node_config.write_text(dockerconfigjson(registry, "alice", "s3cret-pass")[".dockerconfigjson"])
    code, message = _code(lambda: plugin.client.publish("vol-p", target, _model(private_model)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "requires authentication" in message, message
    wrong = dockerconfigjson(registry, "alice", "not-her-password")
    code, message = _code(lambda: plugin.client.publish("vol-p", target, _model(private_model), secrets=wrong))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not-her-password" not in message, message
    assert not target.exists()

    plugin.client.publish("vol-p", target, _model(private_model), secrets=dockerconfigjson(registry, "alice", "s3cret-pass"))
    assert_same_tree(target, small_minilm)
    opaque = plugin.target("opaque")
    plugin.client.publish("vol-o", opaque, _model(private_model), secrets={"username": "alice", "password": "s3cret-pass"})
    assert (opaque / "config.json").read_bytes() == (small_minilm / "config.json").read_bytes()

    logs = plugin.log.read_text() + "".join(p.read_text() for p in (plugin.cache / "logs").iterdir())
    assert "s3cret-pass" not in logs and "not-her-password" not in logs
    credentials = [p for p in (plugin.state / "volumes").rglob("config.json")]
    assert len(credentials) == 2 and all(p.stat().st_mode & 0o777 == 0o600 for p in credentials)
    assert (plugin.state / "volumes").stat().st_mode & 0o777 == 0o700
    plugin.client.unpublish("vol-p", target)
    plugin.client.unpublish("vol-o", opaque)
    assert not list((plugin.state / "volumes").iterdir()), "credentials must go with their volume"


def test_unpublish_of_a_dead_daemon_cleans_the_target(plugin, minilm_ref, cli):
    target = plugin.target()
    plugin.client.publish("vol-d", target, _model(minilm_ref))
    os.kill(daemon_of(target, cli.env), signal.SIGKILL)
    with pytest.raises(OSError) as dead:
        os.listdir(target)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    plugin.client.unpublish("vol-d", target)
    assert not mounted(target) and not target.exists()


def test_unpublish_with_a_file_still_open_detaches_and_the_file_keeps_reading(plugin, minilm_ref, minilm_dir, cli):
    target = plugin.target()
    plugin.client.publish("vol-b", target, _model(minilm_ref))
    pid = daemon_of(target, cli.env)
    with open(target / "config.json", "rb") as still_open:
        plugin.client.unpublish("vol-b", target)
        assert not mounted(target) and not target.exists()
        assert still_open.read() == (minilm_dir / "config.json").read_bytes()
    assert _exits(pid), "the daemon exits once its last file is closed"


def test_unpublish_of_a_frozen_daemon_cleans_the_target(plugin, minilm_ref, cli):
    target = plugin.target()
    plugin.client.publish("vol-f", target, _model(minilm_ref))
    pid = daemon_of(target, cli.env)
    os.kill(pid, signal.SIGSTOP)
    try:
        plugin.client.unpublish("vol-f", target)
        assert not mounted(target) and not target.exists()
        assert _exits(pid), "a daemon that does not exit after its unmount is killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_plugin_restart_brings_every_target_back(tmp_path, cli, minilm_ref, minilm_dir):
    """Killing the plugin leaves its mounts serving (each daemon is a process of its own);
    killing them too, as a restart of the plugin's container does, leaves dead mounts
    (ENOTCONN) that the next plugin mounts again at the same paths."""
    node = Plugin(tmp_path / "node", cli.env)
    try:
        node.start()
        targets = {f"vol-{i}": node.target(f"m{i}") for i in range(2)}
        for volume, target in targets.items():
            node.client.publish(volume, target, _model(minilm_ref))
        daemons = {volume: daemon_of(target, cli.env) for volume, target in targets.items()}

        node.kill()
        for target in targets.values():
            assert (target / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
        for pid in daemons.values():
            os.kill(pid, signal.SIGKILL)
        for target in targets.values():
            with pytest.raises(OSError) as dead:
                os.listdir(target)
            assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)

        node.start()
        for volume, target in targets.items():
            wait_serving(target)
            assert_same_tree(target, minilm_dir)
            assert daemon_of(target, cli.env) != daemons[volume]
        assert "mounting" in node.log.read_text() and "again" in node.log.read_text()
        for volume, target in targets.items():
            node.client.unpublish(volume, target)
            assert not mounted(target) and not target.exists()
    finally:
        node.cleanup()


def test_a_daemon_that_dies_is_mounted_again_while_the_plugin_runs(tmp_path, cli, minilm_ref, minilm_dir):
    node = Plugin(tmp_path / "node", cli.env, check_interval=0.5)
    try:
        node.start()
        target = node.target()
        node.client.publish("vol-r", target, _model(minilm_ref))
        first = daemon_of(target, cli.env)
        os.kill(first, signal.SIGKILL)
        time.sleep(0.2)
        wait_serving(target)
        assert (target / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
        assert daemon_of(target, cli.env) != first
        node.client.unpublish("vol-r", target)
        assert node.stop() == 0
    finally:
        node.cleanup()


def test_a_plugin_restart_forgets_volumes_whose_pod_is_gone(tmp_path, cli, minilm_ref):
    node = Plugin(tmp_path / "node", cli.env)
    try:
        node.start()
        target = node.target()
        node.client.publish("vol-g", target, _model(minilm_ref))
        pid = daemon_of(target, cli.env)
        node.kill()
        os.kill(pid, signal.SIGKILL)
        os.system(f"umount -l {target}")  # noqa: S605 - kubelet's orphan cleanup, in short
        target.rmdir()
        target.parent.rmdir()
        node.start()
        deadline = time.monotonic() + 20
        while list((node.state / "volumes").iterdir()):
            assert time.monotonic() < deadline, "the record of a pod that is gone must be dropped"
            time.sleep(0.1)
        assert not target.exists()
    finally:
        node.cleanup()


def test_a_damaged_record_is_reported_and_the_rest_served(tmp_path, cli, minilm_ref, minilm_dir):
    """A record the plugin cannot read (a full disk, an edit by hand) is logged at every
    pass; the plugin still starts, answers kubelet and publishes other volumes."""
    node = Plugin(tmp_path / "node", cli.env, check_interval=0.5)
    damaged = node.state / "volumes" / ("0" * 32)
    damaged.mkdir(parents=True)
    (damaged / "volume.json").write_text("{not json")
    try:
        node.start()
        target = node.target()
        node.client.publish("vol-ok", target, _model(minilm_ref))
        assert (target / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
        deadline = time.monotonic() + 10
        while node.log.read_text().count("unreadable volume record") < 2:  # passes run over the damaged record
            assert time.monotonic() < deadline, node.log.read_text()
            time.sleep(0.1)
        assert node.process.poll() is None
        node.client.unpublish("vol-ok", target)
    finally:
        node.cleanup()


def test_a_kubelet_root_through_a_symlink_is_published_left_alone_and_unpublished(tmp_path, cli, minilm_ref, minilm_dir):
    """/var/lib/kubelet -> /data/kubelet: the mount table shows the resolved path. A plugin that
    compared kubelet's path with it found nothing mounted at each pass, mounted again, and
    refused the unpublish (FAILED_PRECONDITION), so the pod never ended."""
    node = Plugin(tmp_path / "node", cli.env, check_interval=0.3, kubelet_link=True)
    try:
        node.start()
        target = node.target()
        assert as_mounted(target) != str(target)
        node.client.publish("vol-l", target, _model(minilm_ref, prefetch="none"))
        pid = daemon_of(target, cli.env)
        time.sleep(1.5)  # several passes of the check for dead mounts
        assert daemon_of(target, cli.env) == pid and mounted(target)
        log = node.log.read_text()
        assert "mounting" not in log and "cannot mount" not in log, log
        assert (target / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
        node.client.unpublish("vol-l", target)
        assert not mounted(target) and not target.exists() and _exits(pid)
        assert not list((node.state / "volumes").iterdir()) and not list((node.cache / "logs").iterdir())
    finally:
        node.cleanup()


def test_unpublishing_x_y_keeps_the_log_and_status_of_x_slash_y(plugin, minilm_ref, minilm_dir, cli):
    """Two targets whose paths differ by '-' against '/' shared one log (and one status file):
    unpublishing one deleted the other's log."""
    volumes = plugin.pods / str(uuid.uuid4()) / "volumes" / "kubernetes.io~csi"
    dashed, nested = volumes / "x-y" / "mount", volumes / "x" / "y" / "mount"
    for target in (dashed, nested):
        target.parent.mkdir(parents=True)
    plugin.client.publish("vol-dash", dashed, _model(minilm_ref, prefetch="none"))
    plugin.client.publish("vol-nest", nested, _model(minilm_ref, prefetch="none"))
    assert len(list((plugin.cache / "logs").iterdir())) == 2
    pid = daemon_of(nested, cli.env)
    plugin.client.unpublish("vol-dash", dashed)
    logs = list((plugin.cache / "logs").iterdir())
    assert len(logs) == 1 and f" at {nested}: " in logs[0].read_text()
    assert (nested / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
    time.sleep(1.2)  # its daemon rewrites its status each second, in a file of its own
    assert daemon_of(nested, cli.env) == pid
    plugin.client.unpublish("vol-nest", nested)
    assert not mounted(nested) and not list((plugin.cache / "logs").iterdir())
