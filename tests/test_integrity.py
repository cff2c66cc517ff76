"""Never a wrong byte: the trust chain from the digest the user resolved to every byte served.

A fault matrix over raw, tar and tar+gzip layers, with and without a block index: bytes
flipped in transit and at rest, resets, short bodies, holes and wrong map lengths. Then the
cases that once served wrong bytes: eviction by another mount, a mirror forging the index,
an interrupted pull, blocks derived from a stream that failed. Every read gives the source's
bytes or EIO; no daemon dies; nothing hangs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import daemon_alive
from direct import read_direct_or_errno

from modelfs.storage.cache import BlockCache
from modelfs.storage.mapformat import ENTRY as _ENTRY
from modelfs.storage.mapformat import HEADER_SIZE as _HEADER_SIZE

MiB = 1 << 20
PACKINGS = ["raw", "tar", "tar+gzip"]
# (packing, block index) pairs of the matrix. An index covers only layers read by ranges (raw,
# plain tar); a compressed layer is checked whole whatever the manifest names
# (blockindex.indexable), so tar+gzip with one ran the very case tar+gzip without one runs.
MATRIX = [(packing, indexed) for packing in PACKINGS for indexed in (True, False) if indexed is False or packing != "tar+gzip"]
BY_PACKING_AND_INDEX = pytest.mark.parametrize(("packing", "indexed"), [
    pytest.param(packing, indexed, id=f"{'index' if indexed else 'noindex'}-{packing}") for packing, indexed in MATRIX])


def make_context(root: Path, weights_size: int = 3 * MiB + 12345) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    files = {"w.bin": os.urandom(weights_size), "config.json": json.dumps({"hidden": 384}).encode() * 40}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "Modelfile").write_text("MODEL w.bin\nCONFIG config.json\n")
    return files


@pytest.fixture(scope="module")
def matrix_models(registry, session_cli, tmp_path_factory):
    """One small model per (packing, block index) pair of the matrix, built and pushed once."""
    built = {}
    for packing, indexed in MATRIX:
        context = tmp_path_factory.mktemp("matrix")
        files = make_context(context)
        ref = f"{registry.address}/matrix/{packing.replace('+', '-')}-{'index' if indexed else 'noindex'}:v1"
        session_cli.run("build", "-t", ref, "--packing", packing, *([] if indexed else ["--no-block-index"]),
                        str(context))
        session_cli.run("push", "--plain-http", ref)
        built[(packing, indexed)] = (ref, files)
    return built


def _read_all(target: Path, files: dict[str, bytes]) -> dict[str, bytes | int]:
    """Each file's bytes, or the errno its read failed with."""
    out: dict[str, bytes | int] = {}
    for name in files:
        try:
            out[name] = (target / name).read_bytes()
        except OSError as exc:
            out[name] = exc.errno
    return out


def _assert_right_or_eio(got: dict[str, bytes | int], files: dict[str, bytes]) -> None:
    for name, value in got.items():
        if isinstance(value, int):
            assert value == errno.EIO, f"{name}: errno {value}"
        else:
            assert hashlib.sha256(value).hexdigest() == hashlib.sha256(files[name]).hexdigest(), f"{name}: WRONG BYTES"


def _flip_cached_bytes(cache_dir: Path) -> int:
    """Flip one byte in the middle of every cached data file; returns how many."""
    flipped = 0
    for data in (cache_dir / "blobs" / "sha256").glob("*.data"):
        size = data.stat().st_size
        if not size:
            continue
        with open(data, "r+b") as handle:
            handle.seek(size // 2)
            byte = handle.read(1)
            handle.seek(size // 2)
            handle.write(bytes([byte[0] ^ 0x10]))
        flipped += 1
    return flipped


@BY_PACKING_AND_INDEX
@pytest.mark.parametrize("fault", ["flip", "reset", "truncate"])
def test_fault_in_transit_gives_right_bytes_or_eio(packing, indexed, fault, matrix_models, faulty, mounts, registry,
                                                    cli):
    ref, files = matrix_models[(packing, indexed)]
    faulty.only = _weights_layer(cli, ref)  # tar headers (at mount) and file bytes alike
    faulty.faults = [fault, fault]
    target, pid = mounts.mount_daemon(ref.replace(registry.address, faulty.address), "--prefetch", "none",
                                      "--timeout", "20")
    got = _read_all(target, files)
    _assert_right_or_eio(got, files)
    assert got == files  # transient faults: retried, so every byte arrives right in the end
    assert faulty.injected[fault] >= 1
    assert daemon_alive(pid)
    if fault != "flip":  # a cut stream resumes where it stopped, its hash intact: no false alarm
        log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
        assert "does not match" not in log, log


def _assert_heals(target: Path, files: dict[str, bytes], seconds: float = 20.0) -> None:
    """Once the network heals every file reads right. A fetch that was retrying when it healed
    may still use up its attempts on bytes it got before (EIO once more); never wrong bytes."""
    deadline = time.monotonic() + seconds
    while True:
        got = _read_all(target, files)
        _assert_right_or_eio(got, files)
        if got == files or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == files


def _weights_layer(cli, ref: str) -> str:
    manifest = json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)["manifest"]
    return next(layer["digest"] for layer in manifest["layers"]
                if layer["annotations"]["org.cncf.model.filepath"] == "w.bin")


@BY_PACKING_AND_INDEX
def test_persistent_flip_is_eio_never_wrong_bytes(packing, indexed, matrix_models, faulty, mounts, registry, cli):
    ref, files = matrix_models[(packing, indexed)]
    faulty.only = _weights_layer(cli, ref)  # every GET of the weights layer has a flipped byte
    faulty.persistent = "flip"
    via = ref.replace(registry.address, faulty.address)
    if packing == "tar":
        # its listing comes from the tar headers, read (and checked) at mount: never from wrong bytes
        refused = mounts.refused(via, "--prefetch", "none", "--timeout", "10")
        assert refused.returncode == 1 and "does not match" in refused.stderr, refused.stderr
    else:
        target, pid = mounts.mount_daemon(via, "--prefetch", "none", "--timeout", "10")
        # O_DIRECT: one read, one round of the fetcher's retries (the kernel would read the
        # page once more after its readahead failed: a second round, about 6 s, for nothing)
        got = {name: read_direct_or_errno(target / name) for name in files}
        _assert_right_or_eio(got, files)
        assert got["w.bin"] == errno.EIO
        assert daemon_alive(pid)
        if packing == "raw" and indexed:  # caught block by block, as the log says
            log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
            assert "does not match the block index" in log, log
        faulty.persistent = None  # the network heals: nothing wrong was kept
        _assert_heals(target, files)
    assert faulty.injected["flip"] >= 1


@BY_PACKING_AND_INDEX
def test_corruption_at_rest_is_fetched_again(packing, indexed, matrix_models, mounts, cli):
    ref, files = matrix_models[(packing, indexed)]
    target = mounts.mount(ref, "--prefetch", "none")
    assert _read_all(target, files) == files
    mounts.umount(target)
    assert _flip_cached_bytes(cli.cache_dir) >= 1
    target, pid = mounts.mount_daemon(ref, "--prefetch", "none")  # a fresh mount: no page cache
    assert _read_all(target, files) == files
    assert daemon_alive(pid)


def _damage_map_entry(map_path: Path, index: int, how: str) -> None:
    offset = _HEADER_SIZE + index * _ENTRY.size
    with open(map_path, "r+b") as handle:
        handle.seek(offset)
        length = struct.unpack("<I", handle.read(4))[0]
        handle.seek(offset)
        handle.write(struct.pack("<I", length // 4 if how == "short" else length + 4096))


@pytest.mark.parametrize("fault", ["flip", "truncate", "reset"])
def test_fault_on_the_config_or_index_at_mount_is_retried(fault, matrix_models, faulty, mounts, registry):
    ref, files = matrix_models[("raw", True)]
    faulty.faults = [fault, fault]  # the first blob GETs of a mount: config, then block index
    target, pid = mounts.mount_daemon(ref.replace(registry.address, faulty.address), "--prefetch", "none")
    assert _read_all(target, files) == files
    assert faulty.injected[fault] == 2


@pytest.mark.parametrize("damage", ["hole", "short", "long"])
def test_holes_and_wrong_map_lengths_are_fetched_again_and_repaired_by_pull(damage, matrix_models, mounts, cli):
    ref, files = matrix_models[("raw", True)]
    cli.run("pull", "--plain-http", ref)
    blob = "sha256:" + hashlib.sha256(files["w.bin"]).hexdigest()
    data = cli.cache_dir / "blobs" / "sha256" / f"{blob[7:]}.data"
    if damage == "hole":  # a power cut after the map reached the disk and before the data did
        os.truncate(data, 0)
        os.truncate(data, len(files["w.bin"]))
    else:
        _damage_map_entry(data.with_suffix(".map"), 1, damage)
    target = mounts.mount(ref, "--prefetch", "none")
    assert _read_all(target, files) == files
    mounts.umount(target)
    if damage == "hole":
        os.truncate(data, 0)
        os.truncate(data, len(files["w.bin"]))
    else:
        _damage_map_entry(data.with_suffix(".map"), 2, damage)
    assert "Pulled" in cli.run("pull", "--plain-http", ref).stdout  # repairs what it finds, never trusts a flag
    assert BlockCache(str(cli.cache_dir)).entry(blob, len(files["w.bin"])).scrub() == 0
    stats = json.loads(cli.run("cache", "stats", "--json").stdout)["blobs"]
    assert next(b for b in stats if b["digest"] == blob)["verified"]
    out = cli.home / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    assert (out / "w.bin").read_bytes() == files["w.bin"]


def test_extract_fetches_again_when_the_cached_copy_is_damaged(matrix_models, cli):
    ref, files = matrix_models[("raw", False)]
    cli.run("pull", "--plain-http", ref)
    assert _flip_cached_bytes(cli.cache_dir) >= 1
    out = cli.home / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    assert (out / "w.bin").read_bytes() == files["w.bin"]


def test_damaged_block_offline_is_eio_not_wrong_bytes(mounts, cli, tmp_path):
    from conftest import Registry
    private = Registry(tmp_path / "private-registry")
    try:
        files = make_context(tmp_path / "ctx")
        ref = f"{private.address}/offline/model:v1"
        cli.run("build", "-t", ref, str(tmp_path / "ctx"))
        cli.run("push", "--plain-http", ref)
        cli.run("pull", "--plain-http", ref)
    finally:
        private.stop()  # unreachable from now on: mounts fall back to what the cache recorded
    assert _flip_cached_bytes(cli.cache_dir) >= 1
    # every byte that can be right comes from the cache: the timeout only bounds the EIO wait
    target, pid = mounts.mount_daemon(ref, "--prefetch", "none", "--timeout", "2")
    got = _read_all(target, files)
    _assert_right_or_eio(got, files)
    assert got["w.bin"] == errno.EIO
    assert daemon_alive(pid)


def test_eviction_by_another_mount_never_serves_zeros(matrix_models, mounts, cli):
    """Two mounts share a cache; one evicts under its size limit (and fetches again) while
    the other still believes the blob's blocks are present."""
    ref, files = matrix_models[("raw", True)]
    cli.run("pull", "--plain-http", ref)
    data = cli.cache_dir / "blobs" / "sha256" / f"{hashlib.sha256(files['w.bin']).hexdigest()}.data"
    pulled = data.stat().st_ino
    holder = mounts.mount(ref, "--prefetch", "none")  # its map says every block is cached; none in memory
    evictor = mounts.mount(ref, "--prefetch", "none", "--cache-max-size", "1M")
    deadline = time.monotonic() + 10
    while data.exists() and data.stat().st_ino == pulled:  # the evictor's limit loop (every 2 s) evicts the blob
        assert time.monotonic() < deadline, "the evictor did not evict"
        time.sleep(0.1)
    with open(evictor / "w.bin", "rb") as handle:  # and fetches its last block again
        handle.seek(3 * MiB)
        assert handle.read() == files["w.bin"][3 * MiB:]
    assert _read_all(holder, files) == files


def test_cache_prune_while_mounted_frees_the_space(matrix_models, mounts, cli):
    ref, files = matrix_models[("raw", True)]
    target, pid = mounts.mount_daemon(ref)
    deadline = time.monotonic() + 30
    while float(os.getxattr(target, "user.modelfs.cached")) < 1.0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cli.run("cache", "prune", "--all")
    deadline = time.monotonic() + 10
    while any("(deleted)" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
              if os.path.exists(f"/proc/{pid}/fd/{fd}")):
        assert time.monotonic() < deadline, "the daemon still holds pruned cache files"
        time.sleep(0.2)
    assert _read_all(target, files) == files


def test_interrupted_unverified_fill_never_reaches_a_later_mount(matrix_models, cli, mounts):
    """What a killed pull (or a lazy mount) leaves: blocks stored but never checked, one of
    them wrong. A later mount, with or without an index, never serves them unchecked."""
    for indexed in (True, False):
        ref, files = matrix_models[("raw", indexed)]
        blob = "sha256:" + hashlib.sha256(files["w.bin"]).hexdigest()
        cache = BlockCache(str(cli.cache_dir))
        entry = cache.entry(blob, len(files["w.bin"]))
        entry.write_block(0, files["w.bin"][:MiB])
        entry.write_block(1, os.urandom(MiB))  # wrong, stored unverified
        cache.close()
        target = mounts.mount(ref, "--prefetch", "none")
        assert _read_all(target, files) == files, indexed


def test_verify_lazy_is_opt_in_and_says_so(matrix_models, faulty, mounts, registry, cli):
    ref, files = matrix_models[("raw", False)]
    target = mounts.mount(ref.replace(registry.address, faulty.address), "--prefetch", "none", "--verify", "lazy")
    assert _read_all(target, files) == files
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert "--verify lazy" in log


def test_mirror_cannot_forge_a_block_index(registry, cli, mounts, tmp_path):
    """A mirror serving flipped bytes under the real digest, with an index that matches them
    attached, is caught: an index counts only if the manifest vouches for it or it comes
    from the registry itself, and reads fall back to the registry."""
    from conftest import Registry
    from hostile import HostileMirror
    files = make_context(tmp_path / "ctx")
    ref = f"{registry.address}/forged/model:v1"
    cli.run("build", "--no-block-index", "-t", ref, str(tmp_path / "ctx"))  # like modctl: no index
    cli.run("push", "--plain-http", ref)
    digest = json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)["digest"]
    mirror_registry = Registry(tmp_path / "mirror")
    try:
        mirror_ref = ref.replace(registry.address, mirror_registry.address)
        cli.run("push", "--plain-http", "--source", ref, mirror_ref)
        blob = "sha256:" + hashlib.sha256(files["w.bin"]).hexdigest()
        forged = bytearray(files["w.bin"])
        forged[MiB + 5] ^= 0xFF
        with HostileMirror(mirror_registry.port, {blob: bytes(forged)}) as mirror:
            mirror.attach_forged_index("forged/model", digest, {blob: bytes(forged)})
            config = cli.home / "config" / "modelfs"
            config.mkdir(parents=True, exist_ok=True)
            (config / "config.toml").write_text(
                f'[registries."{registry.address}"]\nplain_http = true\nmirrors = ["http://{mirror.address}"]\n')
            target, pid = mounts.mount_daemon(f"{registry.address}/forged/model@{digest}", "--prefetch", "none")
            assert _read_all(target, files) == files
            assert mirror.forged_served >= 1  # the mirror did try
    finally:
        mirror_registry.stop()


@pytest.mark.parametrize("packing, indexed, eio_within", [
    ("raw", True, 5.5),  # a range fetch: abandoned after --timeout without a whole block
    ("tar+gzip", False, 8.0),  # a compressed layer's stream: the same, then the readers told
])
def test_trickling_server_is_eio_within_the_timeout_then_recovers(packing, indexed, eio_within, matrix_models, faulty,
                                                                  mounts, registry):
    ref, files = matrix_models[(packing, indexed)]
    target, pid = mounts.mount_daemon(ref.replace(registry.address, faulty.address), "--prefetch", "none",
                                      "--timeout", "3")
    faulty.trickle_seconds = 12  # 2 KB/s, bounded: the proxy gives up by itself
    faulty.persistent = "trickle"
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        (target / "w.bin").read_bytes()
    assert info.value.errno == errno.EIO and time.monotonic() - started < eio_within
    faulty.persistent = None
    deadline = time.monotonic() + 40  # the trickling fetch was abandoned: a slot is free again soon
    while True:
        try:
            assert (target / "w.bin").read_bytes() == files["w.bin"]
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert daemon_alive(pid)


def test_stall_is_eio_after_one_timeout_not_two(minilm_ref, minilm_dir, faulty, mounts, registry):
    """The kernel's readahead fails first, then it retries the page: the retry must not wait
    a second full timeout."""
    faulty.stall_seconds = 12
    target = mounts.mount(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "none", "--timeout", "2")
    faulty.persistent = "stall"
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        with open(target / "model.safetensors", "rb") as handle:
            handle.seek(50 * MiB)
            handle.read(MiB)
    elapsed = time.monotonic() - started
    assert info.value.errno == errno.EIO and elapsed < 3.5, elapsed
    faulty.persistent = None


def test_umount_returns_on_a_frozen_daemon(matrix_models, mounts, cli):
    ref, _ = matrix_models[("raw", True)]
    target, pid = mounts.mount_daemon(ref, "--prefetch", "none")
    os.kill(pid, 19)  # SIGSTOP
    try:
        started = time.monotonic()
        result = cli.run("umount", str(target), timeout=60)
        assert time.monotonic() - started < 30
        assert "stale" in result.stdout
        assert not os.path.ismount(target)
        mounts.active.remove(target)
    finally:
        os.kill(pid, 9)


def test_full_cache_disk_serves_from_memory_and_leaves_no_temp_files(matrix_models, mounts, tiny_tmpfs):
    ref, files = matrix_models[("raw", True)]
    filler = tiny_tmpfs / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=16"], capture_output=True)
    target, pid = mounts.mount_daemon(ref, "--prefetch", "none", "--cache-dir", str(tiny_tmpfs))
    assert _read_all(target, files) == files
    assert not list((tiny_tmpfs / "models").glob("*.tmp")) if (tiny_tmpfs / "models").exists() else True
    ref, files = matrix_models[("raw", False)]  # without an index: refused clearly, never served unchecked
    target, pid = mounts.mount_daemon(ref, "--prefetch", "none", "--cache-dir", str(tiny_tmpfs), "--timeout", "10")
    _assert_right_or_eio(_read_all(target, files), files)
    assert daemon_alive(pid)


def test_a_model_of_many_files_fits_a_small_descriptor_limit(registry, cli, tmp_path):
    """modctl makes one layer per file: 300 files must mount and read under a limit of 256
    descriptors (two per open blob would need 600)."""
    context = tmp_path / "many"
    context.mkdir()
    files = {f"shard-{i:03d}.bin": os.urandom(1000 + i) for i in range(300)}
    for name, data in files.items():
        (context / name).write_bytes(data)
    (context / "Modelfile").write_text("MODEL shard-*.bin\n")
    ref = f"{registry.address}/many/files:v1"
    cli.run("build", "-t", ref, str(context))
    cli.run("push", "--plain-http", ref)
    target = tmp_path / "mnt"
    target.mkdir()
    result = subprocess.run(["prlimit", "--nofile=256:256", *_modelfs(cli), "mount", "--plain-http", ref, str(target)],
                            env=cli.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    try:
        pid = int(result.stdout.split("(pid ")[1].split(",")[0])
        for name, data in files.items():
            assert (target / name).read_bytes() == data, name
        assert len(os.listdir(f"/proc/{pid}/fd")) < 256
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


def _modelfs(cli) -> list[str]:
    import sys
    return [sys.executable, "-m", "modelfs"]


def test_index_attach_makes_a_third_party_artifact_lazy_and_verified(registry, cli, mounts, proxy, tmp_path):
    files = make_context(tmp_path / "ctx", weights_size=24 * MiB)
    ref = f"{registry.address}/attach/model:v1"
    cli.run("build", "--no-block-index", "-t", ref, str(tmp_path / "ctx"))  # like modctl: no index
    cli.run("push", "--plain-http", ref)
    assert "Attached a block index" in cli.run("index", "attach", "--plain-http", ref).stdout
    proxy.reset()
    target = mounts.mount(ref.replace(registry.address, proxy.address), "--prefetch", "none", "--log-level", "info")
    with open(target / "w.bin", "rb") as handle:
        handle.seek(10 * MiB)
        assert handle.read(MiB) == files["w.bin"][10 * MiB:11 * MiB]
    assert proxy.downstream_bytes < 12 * MiB  # lazy: not the whole 24 MiB blob first
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert "attached at the registry" in log
    assert (target / "w.bin").read_bytes() == files["w.bin"]


def test_an_index_of_sha256_hashes_from_earlier_pushes_still_checks_every_block(registry, cli, mounts, faulty, tmp_path):
    """Indexes pushed before BLAKE3 (version 1, sha256) keep working: attached at the registry,
    each block is checked against them and a flipped one is fetched again."""
    import trio

    from modelfs.formats import blockindex
    from modelfs.formats.spec import ARTIFACT_TYPE, OCI_MANIFEST, Descriptor
    from modelfs.index import attach
    from modelfs.registry import RegistryClient
    files = make_context(tmp_path / "ctx")
    ref = f"{registry.address}/v1index/model:v1"
    cli.run("build", "--no-block-index", "-t", ref, str(tmp_path / "ctx"))
    cli.run("push", "--plain-http", ref)
    inspected = json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)
    hashes = {layer["digest"]: blockindex.hash_blocks(str(tmp_path / "ctx" / layer["annotations"]["org.cncf.model.filepath"]),
                                                      MiB, "sha256") for layer in inspected["manifest"]["layers"]}

    async def attach_v1() -> None:
        manifest = json.dumps(inspected["manifest"], separators=(",", ":")).encode()
        subject = Descriptor(OCI_MANIFEST, inspected["digest"], len(manifest), artifact_type=ARTIFACT_TYPE)
        async with RegistryClient(registry.address, plain_http=True) as client:
            await attach(client, "v1index/model", subject, blockindex.encode(MiB, hashes, "sha256"))

    trio.run(attach_v1)
    faulty.only = _weights_layer(cli, ref)
    faulty.faults = ["flip"]
    target = mounts.mount(ref.replace(registry.address, faulty.address), "--prefetch", "none", "--log-level", "info")
    with open(target / "w.bin", "rb") as handle:
        handle.seek(MiB)
        assert handle.read(MiB) == files["w.bin"][MiB:2 * MiB]
    assert _read_all(target, files) == files
    # the flipped byte sits in the middle of the first range fetched, which may hold blocks
    # past the one read: its mismatch can be found (and logged) after that read returned
    deadline = time.monotonic() + 30
    while True:
        log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
        if "does not match the block index" in log or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "attached at the registry" in log and "does not match the block index" in log


@pytest.fixture(scope="module")
def shared_blob(registry, session_cli, tmp_path_factory):
    """One weights blob in two repositories: ``pinned`` (its manifest names a block index,
    annotation dev.modelfs.block-index) and ``plain`` (none, as modctl pushes it)."""
    context = tmp_path_factory.mktemp("shared")
    files = make_context(context)
    pinned, plain = f"{registry.address}/shared/pinned:v1", f"{registry.address}/shared/plain:v1"
    session_cli.run("build", "-t", pinned, str(context))
    session_cli.run("push", "--plain-http", pinned)
    session_cli.run("build", "--no-block-index", "-t", plain, str(context))
    session_cli.run("push", "--plain-http", plain)
    return pinned, plain, files


def _integrity_errors(cli, target: Path, at_least: int, seconds: float = 5.0) -> int:
    """The mount's integrity error count from `modelfs status` (the daemon writes it each second)."""
    deadline = time.monotonic() + seconds
    while True:
        found = next(m for m in json.loads(cli.run("status", "--json").stdout) if m["mountpoint"] == str(target))
        if found["integrity_errors"] >= at_least or time.monotonic() > deadline:
            return found["integrity_errors"]
        time.sleep(0.2)


def test_lazy_mount_of_a_pinned_blob_checks_a_block_a_lazy_mount_elsewhere_stored(shared_blob, faulty, mounts, registry,
                                                                                 cli):
    """--verify lazy relaxes only blobs without a trusted index: a block that a lazy mount of
    the unindexed repository stored unverified (a byte flipped on the way) is matched against
    the pinned repository's index before a lazy mount of it serves the block."""
    from direct import read_direct
    pinned, plain, files = shared_blob
    weights = files["w.bin"]
    faulty.only = "sha256:" + hashlib.sha256(weights).hexdigest()
    faulty.faults = ["flip"]
    lazy = mounts.mount(plain.replace(registry.address, faulty.address), "--prefetch", "none", "--verify", "lazy")
    # block 2 alone (a read far from the start: no read-ahead), one range, its middle byte flipped
    assert read_direct(lazy / "w.bin", 2 * MiB, MiB) != weights[2 * MiB:3 * MiB]  # the risk lazy takes
    mounts.umount(lazy)
    assert faulty.injected["flip"] == 1
    target = mounts.mount(pinned, "--prefetch", "none", "--verify", "lazy")
    assert read_direct(target / "w.bin") == weights
    assert _integrity_errors(cli, target, 1) == 1  # the cached block that failed the index


def test_a_block_another_process_stored_meanwhile_is_replaced_and_the_index_kept(registry, cli, mounts, faulty, tmp_path):
    """'Theirs stays': while a pinned mount fetches a block, another process (a lazy mount, a
    killed pull: here the test) stores a wrong copy of it unverified. The mount replaces it
    with the block it checked instead of keeping it, so no whole-blob check fails over a
    foreign copy, and the mount neither logs an error nor distrusts its own correct index."""
    from direct import read_direct
    context = tmp_path / "ctx"
    context.mkdir()
    weights = os.urandom(600_000)  # one block: one range request
    (context / "w.bin").write_bytes(weights)
    (context / "Modelfile").write_text("MODEL w.bin\n")
    ref = f"{registry.address}/theirs/model:v1"
    cli.run("build", "-t", ref, str(context))
    cli.run("push", "--plain-http", ref)
    blob = "sha256:" + hashlib.sha256(weights).hexdigest()
    faulty.only, faulty.stall_seconds, faulty.faults = blob, 1.0, ["stall"]
    target = mounts.mount(ref.replace(registry.address, faulty.address), "--prefetch", "none")
    got: list[bytes] = []
    reading = threading.Thread(target=lambda: got.append(read_direct(target / "w.bin")))
    reading.start()
    deadline = time.monotonic() + 20
    while not faulty.injected["stall"]:  # the mount's range request is on its way
        assert time.monotonic() < deadline
        time.sleep(0.02)
    wrong = bytearray(weights)
    wrong[1000] ^= 0x01
    cache = BlockCache(str(cli.cache_dir))
    assert cache.entry(blob, len(weights)).write_block(0, bytes(wrong)) is not None  # stored unverified
    cache.close()
    reading.join(30)
    assert got == [weights]
    time.sleep(0.5)  # the completed blob's check (if any) runs just after the read returned
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert " ERROR " not in log, log
    assert _integrity_errors(cli, target, 0) == 0
    entry = BlockCache(str(cli.cache_dir)).entry(blob, len(weights))
    assert entry.read_block(0) == weights and entry.entry_at(0).checked  # ours, checked against the index
