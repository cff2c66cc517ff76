"""Prefetch at a real mount (issue 23): metadata first, then the shards the index's
``weight_map`` names, by name (the order loaders read them), seen at the registry through the recording proxy (tests/faults.py);
the status says when the metadata was ready. The policy's own tests: test_prefetch.py."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

MiB = 1 << 20
SHARDS = {3: 3.5, 1: 6.5, 4: 4.5, 2: 5.5}  # weight_map order (first appearance): size in MiB


def _safetensors(size: int, seed: int) -> bytes:
    header = json.dumps({"__metadata__": {"format": "pt"}, f"w{seed}": {
        "dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + os.urandom(size)


@pytest.fixture(scope="module")
def sharded(registry, session_cli, tmp_path_factory):
    """(reference, {file name: bytes}, {blob digest: file name})."""
    root = tmp_path_factory.mktemp("sharded")
    names = {i: f"model-0000{i}-of-00004.safetensors" for i in SHARDS}
    files = {names[i]: _safetensors(int(mib * MiB), i) for i, mib in SHARDS.items()}
    weight_map = {f"layer.{n}.w": names[i] for n, i in enumerate(SHARDS)}
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = b'{"architectures": ["Test"]}'
    files["tokenizer.json"] = json.dumps({"vocab": list(range(5000))}).encode()
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "Modelfile").write_text("CONFIG config.json tokenizer.json model.safetensors.index.json\n"
                                    "MODEL *.safetensors\n")
    ref = f"{registry.address}/prefetch/sharded:v1"
    session_cli.run("build", "-t", ref, str(root))
    session_cli.run("push", "--plain-http", ref)
    layers = json.loads(session_cli.run("inspect", "--plain-http", "--json", ref).stdout)["manifest"]["layers"]
    by_digest = {layer["digest"]: layer["annotations"]["org.cncf.model.filepath"] for layer in layers}
    return ref, files, by_digest


def _status(cli, target: Path) -> dict:
    return next(m for m in json.loads(cli.run("status", "--json").stdout) if m["mountpoint"] == str(target))


def test_prefetch_fetches_headers_first_then_shards_by_name(cli, mounts, sharded, faulty, registry):
    ref, files, by_digest = sharded
    # one request slot: the registry sees the runs in the order prefetch takes them
    target = mounts.mount(ref.replace(registry.address, faulty.address), "--workers", "1", "--log-level", "debug")
    deadline = time.monotonic() + 30
    while (found := _status(cli, target))["bytes_local"] < found["bytes_total"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found["bytes_local"] == found["bytes_total"]

    def start(asked: str) -> int:
        return int(asked.removeprefix("bytes=").split("-")[0]) if asked else 0

    seen = [(by_digest[path.rsplit("/", 1)[1]], start(asked)) for path, asked in faulty.requests
            if path.rsplit("/", 1)[1] in by_digest]
    # every header (block 0 of every shard) and every small file reached the registry before
    # any of prefetch's runs (which start past the header block)
    assert {name for name, offset in seen if offset == 0} == set(files)
    last_header = max(i for i, (_, offset) in enumerate(seen) if offset == 0)
    bulk = [i for i, (_, offset) in enumerate(seen) if offset >= MiB]
    assert bulk and min(bulk) > last_header
    # prefetch took the shards the index names by name, as loaders read them: not by size, not
    # by first appearance in the weight_map (sorted by tensor name, it put lm_head's shard, the
    # last, first). Its runs go out at once, over several connections: the daemon's log says
    # the order it chose.
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    taken = [line.rsplit(" of ", 1)[1] for line in log.splitlines() if "prefetching blocks" in line]
    assert [by_digest[digest] for digest in taken] == [f"model-0000{i}-of-00004.safetensors" for i in sorted(SHARDS)]
    # status says the metadata was ready, and how long it took
    assert found["metadata"].startswith("ready (7 files, ")  # 4 headers, the index, config, tokenizer
    assert found["metadata_seconds"] < 10
    assert ", metadata ready (7 files" in cli.run("status").stdout
    for name, data in files.items():  # every byte right
        assert (target / name).read_bytes() == data


@pytest.fixture(scope="module")
def two_blobs(registry, session_cli, tmp_path_factory):
    """(reference, {name: bytes}, {name: blob digest}): a.bin, which prefetch takes first, and b.bin."""
    root = tmp_path_factory.mktemp("two-blobs")
    files = {"a.bin": os.urandom(3 * MiB), "b.bin": os.urandom(5 * MiB)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "Modelfile").write_text("MODEL a.bin b.bin\n")
    ref = f"{registry.address}/prefetch/two-blobs:v1"
    session_cli.run("build", "-t", ref, str(root))
    session_cli.run("push", "--plain-http", ref)
    layers = json.loads(session_cli.run("inspect", "--plain-http", "--json", ref).stdout)["manifest"]["layers"]
    return ref, files, {layer["annotations"]["org.cncf.model.filepath"]: layer["digest"] for layer in layers}


def test_a_read_is_served_beside_a_prefetch_run_the_registry_stalls(mounts, two_blobs, faulty, registry):
    """``--workers 1``, the registry stalling every request for the blob prefetch takes first:
    prefetch's run held the one request slot for the stall window (the --timeout), and a read
    of the other file timed out behind it (EIO). Now the read takes a slot past the total."""
    from direct import read_direct
    ref, files, digests = two_blobs
    faulty.stall_seconds = 8
    faulty.only, faulty.persistent = digests["a.bin"], "stall"
    try:
        target = mounts.mount(ref.replace(registry.address, faulty.address), "--workers", "1", "--timeout", "4")
        time.sleep(0.5)  # prefetch's run of a.bin is on the wire, stalled, in the only slot
        started = time.monotonic()
        assert read_direct(target / "b.bin", 0, MiB) == files["b.bin"][:MiB]
        assert time.monotonic() - started < 3
    finally:
        faulty.persistent = None
