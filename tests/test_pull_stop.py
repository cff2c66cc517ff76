"""A pull stopped (SIGTERM, SIGKILL) while a worker is in a read from a trickling registry,
then run again: it stops at once, and the run after it pulls the right bytes (what the stopped
one stored is trusted only as far as it was checked). Ctrl-C's one line: test_cli.py."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=["sigterm"])
def test_a_pull_stopped_mid_trickle_then_run_again_extracts_the_right_bytes(signum, cli, faulty, minilm_ref, minilm_dir,
                                                                            registry, tmp_path):
    weights = "sha256:" + hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    faulty.only, faulty.persistent = weights, "trickle"
    ref = minilm_ref.replace(registry.address, faulty.address)
    pull = subprocess.Popen([sys.executable, "-m", "modelfs", "pull", "--plain-http", ref],
                            env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not any(weights.rsplit(":", 1)[1] in path for path, _ in faulty.requests):
            assert time.monotonic() < deadline and pull.poll() is None, "pull never asked for the weights"
            time.sleep(0.05)
        time.sleep(0.5)  # a worker is in the trickling read now, some blocks landed
        pull.send_signal(signum)
        started = time.monotonic()
        pull.communicate(timeout=10)
        assert time.monotonic() - started < 3
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait()
        faulty.persistent = None
    cli.run("pull", "--plain-http", ref)
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", "-o", str(out), ref)
    assert (out / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()
