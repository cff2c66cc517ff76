"""Compressed layers (tar+gzip, tar+zstd) and whole-blob checks beside other processes.

What ``pull`` stored is what a mount streams from (offline too, and without fetching the
layer again); a ``cache prune`` under a whole-blob check starts the check again instead of
failing the reads waiting for it; two mounts reading one compressed layer at once stream
it once, through the claim one of them holds, and neither clears what the other fills.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import Cli
from direct import read_direct_or_errno as read_direct
from proxy import CountingProxy

MiB = 1 << 20


def make_model(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    files = {"w.bin": os.urandom(3 * MiB + 4321), "config.json": json.dumps({"hidden": 384}).encode() * 40}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "Modelfile").write_text("MODEL w.bin\nCONFIG config.json\n")
    return files


@pytest.fixture(scope="module")
def models(registry, session_cli, tmp_path_factory):
    """(reference, files, digest of the layer holding w.bin) per packing."""
    built = {}
    for packing in ("raw", "tar+gzip", "tar+zstd"):
        context = tmp_path_factory.mktemp("layers")
        files = make_model(context)
        ref = f"{registry.address}/layers/{packing.replace('+', '-')}:v1"
        session_cli.run("build", "-t", ref, "--packing", packing, "--no-block-index", str(context))
        session_cli.run("push", "--plain-http", ref)
        layers = json.loads(session_cli.run("inspect", "--plain-http", "--json", ref).stdout)["manifest"]["layers"]
        weights = next(layer for layer in layers if "weight" in layer["mediaType"])
        built[packing] = (ref, files, weights["digest"])
    return built


@pytest.mark.parametrize("packing", ["tar+gzip", "tar+zstd"])
def test_pull_stages_compressed_layers_for_an_offline_mount_and_an_online_one(packing, models, registry, tmp_path, mounts):
    ref, files, _ = models[packing]
    # offline: pulled, then the registry is gone; every file reads back
    offline_cli = Cli(tmp_path / "offline")
    gone = CountingProxy(registry.port)
    via_gone = ref.replace(registry.address, gone.address)
    offline_cli.run("pull", "--plain-http", via_gone)
    gone.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gone.port), timeout=2)
    target = mounts.mount(via_gone, "--prefetch", "none", cli=offline_cli)
    assert {name: read_direct(target / name) for name in files} == files
    # online: the first mount after a pull streams the layer from the cache, not the registry
    online_cli = Cli(tmp_path / "online")
    counting = CountingProxy(registry.port)
    try:
        via = ref.replace(registry.address, counting.address)
        online_cli.run("pull", "--plain-http", via)
        counting.reset()
        target = mounts.mount(via, "--prefetch", "none", cli=online_cli)
        assert {name: read_direct(target / name) for name in files} == files
        assert counting.downstream_bytes < 64 * 1024, counting.downstream_bytes  # the manifest, not the layers
    finally:
        counting.close()


def _reading(path: Path, into: dict[str, bytes | int]) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.__setitem__(str(path), read_direct(path)), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("packing", ["raw", "tar+gzip"])
def test_cache_prune_under_a_whole_check_never_fails_the_waiting_read(packing, models, faulty, registry, mounts, cli):
    """The blob (raw without an index) or the layer (tar+gzip) is checked whole before any
    byte is served; a prune that replaces its cache files meanwhile costs a second pass."""
    ref, files, _ = models[packing]
    target = mounts.mount(ref.replace(registry.address, faulty.address), "--prefetch", "none")
    faulty.persistent, faulty.trickle_rate = "trickle", 4 * MiB  # about a second a pass
    got: dict[str, bytes | int] = {}
    reader = _reading(target / "w.bin", got)
    time.sleep(0.5)  # under way: some blocks stored, the check not done
    cli.run("cache", "prune", "--keep-size", "0")
    reader.join(60)
    assert got[str(target / "w.bin")] == files["w.bin"]
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert "holds no file" not in log and " ERROR " not in log, log


def test_two_mounts_reading_one_compressed_layer_stream_it_once(models, faulty, registry, mounts, cli):
    """Two pods of a node: the second mount waits for the stream the first one runs, then
    finds the files checked in the cache. Neither fails, and the layer is fetched once."""
    ref, files, layer = models["tar+gzip"]
    via = ref.replace(registry.address, faulty.address)
    first = mounts.mount(via, "--prefetch", "none")
    second = mounts.mount(via, "--prefetch", "none")
    faulty.persistent, faulty.trickle_rate, faulty.only = "trickle", 4 * MiB, layer[7:]
    faulty.blob_requests = 0
    got: dict[str, bytes | int] = {}
    readers = [_reading(first / "w.bin", got)]
    time.sleep(0.3)
    readers.append(_reading(second / "w.bin", got))
    for thread in readers:
        thread.join(60)
    assert got == {str(first / "w.bin"): files["w.bin"], str(second / "w.bin"): files["w.bin"]}
    assert faulty.blob_requests == 1
