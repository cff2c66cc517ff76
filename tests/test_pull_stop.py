"""A pull or an extract stopped (SIGTERM, SIGKILL) while a worker is in a read from a trickling
registry: SIGTERM stops it at once with one line and status 143, as Ctrl-C does with 130
(test_cli.py), an extract's staging directory removed; a SIGKILLed extract's is removed by
the next extract into that --output, never a live one's or the user's. The pull run after a
stopped one pulls the right bytes (what the stopped one stored is trusted only as far as it
was checked)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def _stopped_mid_trickle(cli, faulty, weights: str, signum: int, *command: str) -> tuple[int, str]:
    """Run ``modelfs COMMAND``, stop it with ``signum`` once a worker is reading the
    trickling weights; its exit status and stderr. It must stop within 3 s."""
    process = subprocess.Popen([sys.executable, "-m", "modelfs", *command], env=cli.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not any(weights.rsplit(":", 1)[1] in path for path, _ in faulty.requests):
            assert time.monotonic() < deadline and process.poll() is None, "it never asked for the weights"
            time.sleep(0.05)
        time.sleep(0.5)  # a worker is in the trickling read now, some blocks landed
        process.send_signal(signum)
        started = time.monotonic()
        _, stderr = process.communicate(timeout=10)
        assert time.monotonic() - started < 3
        return process.returncode, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        faulty.persistent = None


@pytest.fixture
def trickling(faulty, minilm_ref, minilm_dir, registry):
    """The sample model's reference through the proxy, its weights trickling; their digest."""
    weights = "sha256:" + hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    faulty.only, faulty.persistent = weights, "trickle"
    return minilm_ref.replace(registry.address, faulty.address), weights


def _staging(out) -> list[str]:
    return sorted(name for name in os.listdir(out) if name.startswith(".modelfs-extract-"))


def test_a_pull_stopped_mid_trickle_says_so_then_run_again_extracts_the_right_bytes(cli, faulty, trickling,
                                                                                    minilm_dir, tmp_path):
    ref, weights = trickling
    status, stderr = _stopped_mid_trickle(cli, faulty, weights, signal.SIGTERM, "pull", "--plain-http", ref)
    assert status == 128 + signal.SIGTERM
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"modelfs: error: pull of {ref} stopped (SIGTERM); nothing is recorded as pulled")
    assert "Traceback" not in stderr
    cli.run("pull", "--plain-http", ref)
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", "-o", str(out), ref)
    assert (out / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()


def test_an_extract_stopped_by_sigterm_says_so_and_removes_its_staging_directory(cli, faulty, trickling, tmp_path):
    ref, weights = trickling
    out = tmp_path / "out"
    out.mkdir()
    status, stderr = _stopped_mid_trickle(cli, faulty, weights, signal.SIGTERM, "extract", "--plain-http", "-o",
                                          str(out), ref)
    assert status == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1].startswith(f"modelfs: error: extract of {ref} stopped (SIGTERM)")
    assert os.listdir(out) == []


def test_a_killed_extracts_staging_directory_is_removed_by_the_next_but_no_live_one_or_the_users(
        cli, faulty, trickling, minilm_dir, tmp_path):
    ref, weights = trickling
    out = tmp_path / "out"
    out.mkdir()
    status, _ = _stopped_mid_trickle(cli, faulty, weights, signal.SIGKILL, "extract", "--plain-http", "-o",
                                     str(out), ref)
    assert status == -signal.SIGKILL
    [killed] = _staging(out)
    live = out / f".modelfs-extract-{os.getpid()}-{'0' * 16}"  # a running extract's: its process alive, locked
    live.mkdir()
    users = [out / ".modelfs-extract-mine", out / f".modelfs-extract-999999999-{'1' * 16}-notes"]
    for path in users:
        path.mkdir()
    lock = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cli.run("extract", "--plain-http", "-o", str(out), ref)
    finally:
        os.close(lock)
    assert killed not in _staging(out)
    assert _staging(out) == sorted(path.name for path in [live, *users])
    assert (out / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()


def test_a_push_stopped_by_sigterm_as_a_scripts_background_job_says_so_in_one_line(cli, tmp_path):
    """A shell script's background job runs with SIGINT ignored, so trio has no handler of
    its own for it; SIGTERM must still stop the push cleanly (one line, no traceback)."""
    silent = socket.socket()  # a registry that accepts and never answers: the push waits in its first request
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "a.txt").write_text("a")
    (tmp_path / "Modelfile").write_text("NAME a\nCONFIG a.txt\n")
    ref = f"127.0.0.1:{silent.getsockname()[1]}/stops/a:v1"
    cli.run("build", "-t", ref, "-f", str(tmp_path / "Modelfile"), str(tmp_path / "ctx"))
    push = subprocess.Popen([sys.executable, "-m", "modelfs", "push", "--plain-http", ref], env=cli.env,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        silent.settimeout(10)
        connection = silent.accept()[0]  # the push is in its first request now
        time.sleep(0.3)
        push.send_signal(signal.SIGTERM)
        _, stderr = push.communicate(timeout=10)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
        silent.close()
        if "connection" in locals():
            connection.close()
    assert push.returncode == 128 + signal.SIGTERM
    assert stderr.splitlines() == [f"modelfs: error: push of {ref} stopped (SIGTERM); the tag is written last, so it "
                                   "was not moved; blobs already uploaded are skipped by the next push"]


def test_the_sweep_follows_no_link_named_like_a_staging_directory(tmp_path):
    """A symlink (or a file) named as a dead extract's staging directory is the user's, or
    planted: neither it nor what it points at is touched; a real abandoned one is removed."""
    from modelfs.artifact.staging import sweep_abandoned

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("keep")
    link, plain = out / f".modelfs-extract-999999999-{'a' * 16}", out / f".modelfs-extract-999999999-{'b' * 16}"
    link.symlink_to(elsewhere)
    plain.write_text("mine")
    abandoned = out / f".modelfs-extract-999999999-{'c' * 16}"
    (abandoned / "tree" / "d").mkdir(parents=True)
    (abandoned / "tree" / "d" / "f").write_text("f")
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sweep_abandoned(fd) == [abandoned.name]
    finally:
        os.close(fd)
    assert link.is_symlink() and (elsewhere / "keep").read_text() == "keep" and plain.read_text() == "mine"
    assert not abandoned.exists()
