"""Faults between modelfs and a real registry: correct bytes after recovery, or EIO within
the configured time, never wrong bytes and never a dead daemon."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest
from direct import read_direct

MiB = 1 << 20


def _read(path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


# a reset, a truncated body and a flipped byte, the same way: test_integrity.py's
# test_fault_in_transit_gives_right_bytes_or_eio, over every packing with and without an index
@pytest.mark.parametrize("fault", ["503", "429", "stall"])
def test_transient_fault_is_survived_with_correct_bytes(fault, faulty, mounts, minilm_ref, minilm_dir, registry):
    target = mounts.mount(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "none",
                          "--timeout", "30", "--log-level", "info")
    source = (minilm_dir / "model.safetensors").read_bytes()
    faulty.faults = [fault, fault]
    started = time.monotonic()
    assert _read(target / "model.safetensors", 40 * MiB + 777, 3 * MiB) == source[40 * MiB + 777:43 * MiB + 777]
    assert time.monotonic() - started < 30
    assert faulty.injected[fault] >= 1
    assert (target / "model.safetensors").read_bytes() == source  # and the rest of the file too


def test_server_that_ignores_range_still_gives_the_bytes_asked(faulty, mounts, minilm_ref, minilm_dir, registry):
    """Some servers (and Distribution as a pull-through cache still filling itself) answer a
    ranged GET with 200 and the whole blob: the mount reads past what it did not ask for."""
    target = mounts.mount(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "none", "--timeout", "30")
    source = (minilm_dir / "model.safetensors").read_bytes()
    faulty.persistent = "norange"
    assert _read(target / "model.safetensors", 40 * MiB + 777, 3 * MiB) == source[40 * MiB + 777:43 * MiB + 777]
    assert faulty.injected["norange"] >= 1


# A persistent flip (EIO, never wrong bytes, then healed): test_integrity.py's
# test_persistent_flip_is_eio_never_wrong_bytes, over every packing with and without an index.


def test_stall_beyond_timeout_is_eio_in_bounded_time(faulty, mounts, minilm_ref, minilm_dir, registry):
    faulty.stall_seconds = 8
    target = mounts.mount(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "none", "--timeout", "2")
    faulty.persistent = "stall"
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        _read(target / "model.safetensors", 60 * MiB, MiB)
    assert info.value.errno == 5 and time.monotonic() - started < 6
    faulty.persistent = None
    source = (minilm_dir / "model.safetensors").read_bytes()
    deadline = time.monotonic() + 30
    while True:  # the stalled fetch ends by itself; then the block is served correctly
        try:
            assert _read(target / "model.safetensors", 60 * MiB, MiB) == source[60 * MiB:61 * MiB]
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert os.listdir(target)


def test_a_stall_window_below_the_read_deadline_makes_a_stalled_server_cost_a_retry_not_the_read(
        faulty, mounts, minilm_ref, minilm_dir, registry):
    """--stall-timeout apart from --timeout: a range that stalls is aborted after the stall
    window and asked again, and the read that waited on it succeeds within its deadline (with
    one --timeout for both, the read fails with EIO before the stalled transfer is retried)."""
    faulty.stall_seconds = 8
    target = mounts.mount(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "none",
                          "--timeout", "6", "--stall-timeout", "1")
    source = (minilm_dir / "model.safetensors").read_bytes()
    faulty.faults = ["stall"]
    started = time.monotonic()
    assert _read(target / "model.safetensors", 60 * MiB, MiB) == source[60 * MiB:61 * MiB]
    assert time.monotonic() - started < 6
    assert faulty.injected["stall"] == 1


def test_without_block_index_corruption_is_caught_when_the_blob_completes(cli, registry, faulty, mounts, tmp_path):
    context = tmp_path / "model"
    context.mkdir()
    payload = os.urandom(3 * MiB)
    (context / "w.bin").write_bytes(payload)
    (context / "Modelfile").write_text("MODEL w.bin\n")
    ref = f"{registry.address}/noindex/model:v1"
    cli.run("build", "-t", ref, str(context))
    cli.run("push", "--plain-http", "--no-block-index", ref)
    target = mounts.mount(ref.replace(registry.address, faulty.address), "--prefetch", "none", "--log-level", "info")
    faulty.faults = ["flip"]
    (target / "w.bin").read_bytes()  # may be wrong: nothing to check a lone range against
    deadline = time.monotonic() + 20
    log_dir = cli.cache_dir / "logs"
    while "does not match its digest" not in "".join(p.read_text() for p in log_dir.iterdir()):
        assert time.monotonic() < deadline, "the completed blob was not verified"
        time.sleep(0.2)
    # evicted from the cache and from the kernel's page cache, then fetched again
    assert (target / "w.bin").read_bytes() == payload


def test_a_token_the_registry_stops_accepting_is_renewed_mid_mount(cli, mounts, small_minilm, tmp_path):
    """Tokens outlive their welcome (expiry, a rotated signing key): a read that gets 401 with
    a cached token fetches a new one and goes on; the inference server never sees it."""
    from conftest import SAMPLE_MODELFILE, start_token_registry
    registry = start_token_registry(tmp_path / "token-registry")
    try:
        ref = f"{registry.address}/private/minilm:v1"
        cli.run("login", "--plain-http", registry.address, "-u", "alice", "--password-stdin", input="s3cret-pass\n")
        cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
        cli.run("push", "--plain-http", ref)
        target = mounts.mount(ref, "--prefetch", "none")
        assert (target / "config.json").read_bytes() == (small_minilm / "config.json").read_bytes()
        before = len(registry.issuer.issued)
        registry.issuer.rotate_key()
        registry.kill()
        registry.start()  # reloads the bundle: every token issued so far is refused
        assert (target / "model.safetensors").read_bytes() == (small_minilm / "model.safetensors").read_bytes()
        assert len(registry.issuer.issued) > before
        log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
        assert " ERROR " not in log and "giving up" not in log, log
    finally:
        registry.stop()
        registry.issuer.close()


def test_a_failing_registry_sees_one_retry_policy_not_the_product_of_two(faulty, mounts, minilm_ref, registry, cli):
    """Every attempt at a range goes to the registry once: the fetcher's retries are the only
    loop (the client's policy, with jitter), so a registry answering 503 gets at most that
    policy's attempts per range, then the read fails with EIO."""
    from modelfs.registry import RetryPolicy
    manifest = json.loads(cli.run("inspect", "--plain-http", "--json", minilm_ref).stdout)["manifest"]
    weights = next(layer["digest"] for layer in manifest["layers"]
                   if layer["annotations"]["org.cncf.model.filepath"] == "model.safetensors")
    target = mounts.mount(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "none", "--timeout", "60")
    faulty.only = weights
    faulty.persistent = "503"
    started = time.monotonic()
    with pytest.raises(OSError) as failed:  # O_DIRECT: one read, no page the kernel reads again
        read_direct(target / "model.safetensors", 0, 4096)
    assert failed.value.errno == errno.EIO
    assert time.monotonic() - started < 30
    # each read of a range makes the policy's attempts (not 6 client attempts times 5 fetcher
    # ones); a read-ahead run beside the read may ask for the same range: at most twice that
    attempts = RetryPolicy().attempts
    deadline = time.monotonic() + 30
    while any(count < attempts for count in faulty.faulted_ranges.values()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the read-ahead runs beside the failed read may still be making their attempts
    assert faulty.faulted_ranges and all(count in (attempts, 2 * attempts) for count in faulty.faulted_ranges.values())


# A peer holding claims too long costs a duplicate fetch, not a stuck read: test_rangefetch.py's
# test_a_frozen_peer_holding_claims_is_waited_on_for_less_than_a_short_timeout (a real frozen
# process, the wait bounded and logged); the 5 s cap under a long timeout: peer_wait's unit test there.
