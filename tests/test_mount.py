"""Real FUSE mounts of models in a real registry: bytes, laziness, single flight, persistence."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_MODELFILE
from trees import assert_same_tree

MiB = 1 << 20

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@pytest.fixture(scope="session")
def big_model(registry, session_cli, tmp_path_factory):
    """A 128 MiB random weight file plus a config, pushed raw (four times the 32 MiB a lazy read
    may fetch; 256 MiB cost a second more to make and push, and more to prefetch)."""
    context = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(7)
    with open(context / "model.safetensors", "wb") as out:
        for _ in range(8):
            out.write(rng.bytes(16 * MiB))
    (context / "config.json").write_text('{"hidden_size": 8}')
    (context / "Modelfile").write_text("NAME big\nMODEL model.safetensors\nCONFIG config.json\n")
    ref = f"{registry.address}/test/big:v1"
    session_cli.run("build", "-t", ref, str(context))
    session_cli.run("push", "--plain-http", ref)
    return ref, context



def test_mount_lists_without_fetching_and_serves_exact_bytes(mounts, minilm_ref, minilm_dir, proxy):
    ref = minilm_ref.replace(minilm_ref.split("/")[0], proxy.address)
    target = mounts.mount(ref, "--prefetch", "none")
    proxy.reset()
    listing = {p.name: p.stat().st_size for p in target.iterdir()}
    assert listing["model.safetensors"] == 90868376
    assert (target / "1_Pooling" / "config.json").stat().st_size == (minilm_dir / "1_Pooling" / "config.json").stat().st_size
    assert proxy.downstream_bytes == 0, "ls/stat must be answered from the manifest"
    assert_same_tree(target, minilm_dir)
    xattrs = os.listxattr(target / "model.safetensors")
    assert "user.modelfs.digest" in xattrs
    assert os.getxattr(target / "model.safetensors", "user.modelfs.cached") == b"1.0000"
    digest = os.getxattr(target / "model.safetensors", "user.modelfs.digest").decode()
    assert digest == "sha256:" + hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(OSError):
        open(target / "config.json", "w")


@pytest.mark.parametrize("packing", ["tar", "tar+gzip", "tar+zstd"])
def test_tar_layers_serve_exact_bytes(cli, mounts, registry, small_minilm, packing, proxy, tmp_path):
    ref = f"{registry.address}/packed/{packing.replace('+', '-')}:v1"
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), "--packing", packing, str(small_minilm))
    cli.run("push", "--plain-http", ref)
    target = mounts.mount(ref.replace(registry.address, proxy.address), "--prefetch", "none")
    proxy.reset()
    assert (target / "model.safetensors").stat().st_size == (small_minilm / "model.safetensors").stat().st_size
    if packing != "tar":  # compressed one-file layers are listed from annotations: nothing fetched yet
        assert proxy.downstream_bytes == 0
    assert_same_tree(target, small_minilm)
    out = tmp_path / "extracted"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    assert_same_tree(out, small_minilm)


def test_lazy_read_fetches_a_small_fraction(mounts, big_model, proxy):
    ref, context = big_model
    target = mounts.mount(ref.replace(ref.split("/")[0], proxy.address), "--prefetch", "none")
    proxy.reset()
    with open(target / "model.safetensors", "rb") as handle:
        head = handle.read(MiB)
    with open(context / "model.safetensors", "rb") as handle:
        assert head == handle.read(MiB)
    assert 0 < proxy.downstream_bytes < 32 * MiB, proxy.downstream_bytes


def test_single_flight_for_concurrent_readers(mounts, big_model, proxy):
    ref, context = big_model
    target = mounts.mount(ref.replace(ref.split("/")[0], proxy.address), "--prefetch", "none")
    proxy.reset()
    offset, length = 100 * MiB + 12345, 3 * MiB
    results: list[bytes] = []
    barrier = threading.Barrier(16)

    def reader() -> None:
        fd = os.open(target / "model.safetensors", os.O_RDONLY)
        try:
            barrier.wait()
            results.append(os.pread(fd, length, offset))
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with open(context / "model.safetensors", "rb") as handle:
        handle.seek(offset)
        expected = handle.read(length)
    assert len(results) == 16 and all(r == expected for r in results)
    # 4 blocks cover the range; read-ahead may add a window, but never 16 copies
    assert proxy.downstream_bytes < 24 * MiB, proxy.downstream_bytes


def test_cache_persists_across_mounts(mounts, big_model, proxy):
    ref, context = big_model
    proxied = ref.replace(ref.split("/")[0], proxy.address)
    target = mounts.mount(proxied, "--prefetch", "none")
    with open(target / "model.safetensors", "rb") as handle:
        handle.seek(100 * MiB)
        first = handle.read(2 * MiB)
    mounts.umount(target)
    again = mounts.mount(proxied, "--prefetch", "none")
    proxy.reset()
    with open(again / "model.safetensors", "rb") as handle:
        handle.seek(100 * MiB)
        second = handle.read(2 * MiB)
    assert first == second
    before_manifest = proxy.downstream_bytes
    assert before_manifest == 0, f"re-reading cached bytes fetched {before_manifest} bytes"


def test_prefetch_all_fills_the_cache(mounts, big_model, cli):
    ref, context = big_model
    target = mounts.mount(ref)  # --prefetch all is the default
    import time
    deadline = time.monotonic() + 120
    while os.getxattr(target / "model.safetensors", "user.modelfs.cached") != b"1.0000":
        assert time.monotonic() < deadline, "prefetch did not finish in 120 s"
        time.sleep(0.2)
    assert hashlib.sha256((target / "model.safetensors").read_bytes()).digest() == \
        hashlib.sha256((context / "model.safetensors").read_bytes()).digest()


def test_umount_cleans_a_stale_mount(mounts, minilm_ref, cli):
    target, pid = mounts.mount_daemon(minilm_ref, "--prefetch", "none", name="stale")
    os.kill(pid, 9)
    with pytest.raises(OSError):
        os.listdir(target)
    assert "stale" in cli.run("umount", str(target)).stdout
    mounts.active.remove(target)
    assert not os.path.ismount(target)


def test_sigterm_unmounts_cleanly(mounts, minilm_ref, cli):
    import time
    target, pid = mounts.mount_daemon(minilm_ref, "--prefetch", "none", name="term")
    os.kill(pid, 15)
    deadline = time.monotonic() + 20
    while os.path.ismount(target) or os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "daemon did not unmount and exit on SIGTERM"
        time.sleep(0.05)
    mounts.active.remove(target)


def test_mount_errors_are_one_line(cli, registry, mounts, tmp_path, minilm_ref):
    missing = mounts.refused(f"{registry.address}/demo/minilm:nope")
    assert missing.returncode == 1 and missing.stderr.startswith("modelfs: error: ") and "not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    nodir = cli.run("mount", "--plain-http", minilm_ref, str(tmp_path / "nodir"), check=False)
    assert nodir.returncode == 1 and "does not exist" in nodir.stderr
    (tmp_path / "afile").write_text("x")
    afile = cli.run("mount", "--plain-http", minilm_ref, str(tmp_path / "afile"), check=False)
    assert afile.returncode == 1 and "is not a directory" in afile.stderr


def test_minilm_loads_through_the_mount(mounts, minilm_ref, minilm_dir):
    from safetensors.numpy import load_file
    target = mounts.mount(minilm_ref, "--prefetch", "none")
    mounted = load_file(str(target / "model.safetensors"))
    original = load_file(str(minilm_dir / "model.safetensors"))
    assert mounted.keys() == original.keys()
    for name in original:
        assert np.array_equal(mounted[name], original[name]), name
    script = (
        "import sys, numpy as np\n"
        "from sentence_transformers import SentenceTransformer\n"
        "a = SentenceTransformer(sys.argv[1], device='cpu').encode(['modelfs serves models lazily'])\n"
        "b = SentenceTransformer(sys.argv[2], device='cpu').encode(['modelfs serves models lazily'])\n"
        "assert a.shape == (1, 384), a.shape\n"
        "assert np.array_equal(a, b), float(np.abs(a - b).max())\n"
        "print('EMBEDDING-EQUAL')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script, str(target), str(minilm_dir)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert "EMBEDDING-EQUAL" in result.stdout, result.stderr[-3000:]


def test_registry_death_gives_eio_then_recovers(cli, mounts, tmp_path, small_minilm):
    from conftest import Registry
    private = Registry(tmp_path / "private-registry")
    try:
        ref = f"{private.address}/fragile/minilm:v1"
        cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
        cli.run("push", "--plain-http", ref)
        target = mounts.mount(ref, "--prefetch", "none", "--timeout", "3")
        source = (small_minilm / "model.safetensors").read_bytes()
        with open(target / "model.safetensors", "rb") as handle:
            assert handle.read(MiB) == source[:MiB]
        private.kill()
        import time
        started = time.monotonic()
        with open(target / "model.safetensors", "rb") as handle:
            handle.seek(20 * MiB)  # far past the first MiB's read-ahead: not fetched yet
            with pytest.raises(OSError) as info:
                handle.read(MiB)
        assert info.value.errno == 5  # EIO, never wrong bytes
        assert time.monotonic() - started < 30
        # the daemon is alive: listing and cached bytes still work
        assert (target / "config.json").stat().st_size > 0
        with open(target / "model.safetensors", "rb") as handle:
            assert handle.read(MiB) == source[:MiB]
        private.start()
        # a read of the same block right after one timed out (the kernel retrying the page, or
        # an application at once) fails fast while that fetch still runs: wait that window out
        time.sleep(1)
        with open(target / "model.safetensors", "rb") as handle:
            handle.seek(20 * MiB)
            assert handle.read(MiB) == source[20 * MiB:21 * MiB]
    finally:
        private.stop()


def test_cached_model_mounts_while_its_registry_is_down(cli, mounts, tmp_path, small_minilm):
    """A host rebooting during a registry outage still mounts what it pulled."""
    from conftest import Registry
    private = Registry(tmp_path / "outage-registry")
    try:
        ref = f"{private.address}/outage/minilm:v1"
        never_pulled = f"{private.address}/outage/other:v1"
        cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
        cli.run("push", "--plain-http", ref)
        cli.run("pull", "--plain-http", ref)
        private.kill()
        target = tmp_path / "offline-mount"
        target.mkdir()
        mounted = cli.run("mount", "--plain-http", "--prefetch", "none", ref, str(target))
        mounts.active.append(target)
        # said on the terminal, not only in the daemon's log
        assert f"warning: offline: cannot reach {private.address}" in mounted.stderr
        assert f"using {ref} as cached on" in mounted.stderr
        for name in ("model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
            assert (target / name).read_bytes() == (small_minilm / name).read_bytes(), name
        log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
        assert f"cannot reach {private.address}" in log and f"using {ref} as cached on" in log
        status = next(m for m in json.loads(cli.run("status", "--json").stdout) if m["mountpoint"] == str(target))
        assert status["offline"] and f"cannot reach {private.address}" in status["offline"]
        assert "OFFLINE" in cli.run("status").stdout
        # a model this host never had is a clear one-line error, not a stale guess
        failed = mounts.refused(never_pulled)
        assert failed.returncode == 1 and f"cannot reach {private.address}" in failed.stderr
        assert "Traceback" not in failed.stderr
    finally:
        private.stop()


def test_unmount_during_prefetch_is_clean(cli, mounts, minilm_ref, minilm_dir):
    """Blocks being written and hashed in worker threads finish before the cache closes."""
    from modelfs.logfile import daemon_log_path
    for attempt in range(3):
        shutil.rmtree(cli.cache_dir / "blobs", ignore_errors=True)  # so each mount has a prefetch to do
        target = mounts.mount(minilm_ref, name=f"busy{attempt}")  # prefetch all, under way
        mounts.umount(target)
        # umount returns once the kernel let go; the daemon says "unmounted" a moment later,
        # once its worker threads finished. Wait for it: the next attempt removes the cache
        # (under a daemon still finishing, its last opens failed: an ERROR in 1 run of 10)
        daemon_log = Path(daemon_log_path(str(cli.cache_dir), str(target)))
        deadline = time.monotonic() + 10
        while "unmounted " not in daemon_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert " ERROR " not in log and "Traceback" not in log, log
    assert log.count("unmounted ") == 3
    target = mounts.mount(minilm_ref, "--prefetch", "none")
    assert (target / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()


def test_commands_that_only_read_work_from_the_cache_while_the_registry_is_down(cli, tmp_path, small_minilm):
    """inspect, pull (already complete) and extract take the cached copy, as mount does, and
    say so; a model the cache does not hold whole is a clear error."""
    from conftest import Registry
    private = Registry(tmp_path / "down-registry")
    try:
        ref = f"{private.address}/down/minilm:v1"
        cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
        cli.run("push", "--plain-http", ref)
        cli.run("pull", "--plain-http", ref)
        digest = json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)["digest"]
        private.kill()
        inspected = cli.run("inspect", "--plain-http", "--json", ref)
        assert json.loads(inspected.stdout)["digest"] == digest
        assert "warning: offline: cannot reach" in inspected.stderr
        pulled = cli.run("pull", "--plain-http", ref)
        assert "already complete there" in pulled.stdout and "warning: offline" in pulled.stderr
        out = tmp_path / "out"
        extracted = cli.run("extract", "--plain-http", ref, "--output", str(out))
        assert "warning: offline" in extracted.stderr
        assert (out / "model.safetensors").read_bytes() == (small_minilm / "model.safetensors").read_bytes()
        # a blob missing from the cache: pull cannot complete it, and says why in one line
        blobs = cli.cache_dir / "blobs" / "sha256"
        for path in blobs.glob("*.data"):
            if path.stat().st_size > 1 << 20:
                path.with_suffix(".map").unlink()
                path.unlink()
        refused = cli.run("pull", "--plain-http", ref, check=False)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and "; not in the cache: 1 blob (" in lines[-1] and "cannot be pulled" in lines[-1]
    finally:
        private.stop()
