"""The benchmark harness runs end to end (small sizes, no nginx, no MiniLM load: test_mount
loads MiniLM through a mount, and it took half this test's time) and its non-timing results
hold: a cold sequential read fetches each byte once and a second mount fetches nothing.
The soak harness runs bounded and checks every byte it reads. Speed itself is measured by
``python -m benchmarks``, never asserted here."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO_ROOT


def test_harness_runs_and_reports_every_case(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--size", "32", "--rss-size", "32", "--skip-slow",
                          "--skip-model-load", "--tar-members", "500", "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())["results"]
    for case in ("push 1 model vs skopeo copy", "cold sequential read vs curl", "warm read vs local file",
                 "pull vs skopeo copy", "CSI publish + first tensor vs pull (loopback)",
                 "warm random 4 KiB reads, whole file vs local file", "warm random 4 KiB reads, one 32 MiB tensor vs local file",
                 "mount a tar of 500 small files, cold", "mount a tar of 500 small files, warm"):
        assert results[case]["modelfs_s"] > 0 and results[case]["baseline_s"] > 0, case
        assert case in run.stdout
    assert 1.0 <= results["amplification"]["cold_registry_bytes_per_byte"] <= 1.05
    assert results["amplification"]["second_mount_registry_bytes"] == 0
    assert 0.95 <= results["warm read CPU s/GiB"]["read_back_per_byte"] <= 1.1  # each cached block read back once
    assert results["daemon peak RSS"]["file_bytes"] >= 32 << 20  # a safetensors header, then 32 MiB of tensors
    assert set(results["random 4K-1M reads (ms)"]) == {"cold_p50", "cold_p99", "warm_p50", "warm_p99"}


def test_soak_runs_bounded_and_finds_every_byte_right():
    run = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--seconds", "3", "--readers", "4", "--extra-size", "8"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    reads = int(re.search(r"reads ([0-9,]+)", run.stdout).group(1).replace(",", ""))
    assert reads > 0
    assert "wrong 0  errors 0" in run.stdout
    assert re.search(r"daemon open fds: first \d+", run.stdout)
