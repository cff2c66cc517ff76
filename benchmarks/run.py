"""modelfs against its baselines, measured in the same run on this machine.

    python -m benchmarks [--size MiB]

Starts its own Distribution registry on loopback, pushes a random weight-like blob with
modelfs, and reports each case with its baseline as a ratio (higher is better for modelfs):

- cold: sequential read of the file through a fresh mount (--prefetch none, empty cache) vs
  curl downloading the same blob from the same registry;
- warm: the same read with every block cached and the page cache dropped vs reading a local
  copy of the file with the page cache dropped;
- amplification: registry bytes fetched per byte read, cold, and on a second mount;
- pull: ``modelfs pull`` vs curl of the blob.

Results are printed as a table and written to benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import Cli, Registry  # noqa: E402
from proxy import CountingProxy  # noqa: E402

MiB = 1 << 20


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_file(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(4 * MiB)
        while handle.readinto(buffer):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--size", type=int, default=1024, help="weight file size in MiB (default 1024)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-"))
    registry = Registry(work / "registry")
    proxy = CountingProxy(registry.port)
    cli = Cli(work / "home")
    results: dict[str, dict] = {}
    mounts: list[Path] = []

    def mount(ref: str, name: str) -> Path:
        target = work / name
        target.mkdir()
        cli.run("mount", "--plain-http", "--prefetch", "none", ref, str(target))
        mounts.append(target)
        return target

    def umount(target: Path) -> None:
        cli.run("umount", str(target))
        mounts.remove(target)

    try:
        context = work / "model"
        context.mkdir()
        with open(context / "model.safetensors", "wb") as out:
            for _ in range(args.size // 16 or 1):
                out.write(os.urandom(16 * MiB))
        (context / "Modelfile").write_text("NAME bench\nMODEL model.safetensors\n")
        size = (context / "model.safetensors").stat().st_size
        ref = f"{registry.address}/bench/model:v1"
        cli.run("build", "-t", ref, str(context))
        cli.run("push", "--plain-http", ref)
        manifest = json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)["manifest"]
        digest = manifest["layers"][0]["digest"]
        blob_url = f"http://{registry.address}/v2/bench/model/blobs/{digest}"

        curl = timed(lambda: subprocess.run(["curl", "-sf", "-o", "/dev/null", blob_url], check=True))
        target = mount(ref.replace(registry.address, proxy.address), "cold")
        proxy.reset()
        cold = timed(lambda: read_file(target / "model.safetensors"))
        cold_bytes = proxy.downstream_bytes
        umount(target)
        results["cold sequential read vs curl"] = {"modelfs_s": cold, "baseline_s": curl, "ratio": curl / cold,
                                                   "modelfs_MBps": size / cold / 1e6, "baseline_MBps": size / curl / 1e6}

        dropped = drop_page_cache()
        target = mount(ref.replace(registry.address, proxy.address), "warm")
        proxy.reset()
        warm = timed(lambda: read_file(target / "model.safetensors"))
        second_bytes = proxy.downstream_bytes
        umount(target)
        drop_page_cache()
        local = timed(lambda: read_file(context / "model.safetensors"))
        results["warm read vs local file"] = {"modelfs_s": warm, "baseline_s": local, "ratio": local / warm,
                                              "page_cache_dropped": dropped,
                                              "modelfs_MBps": size / warm / 1e6, "baseline_MBps": size / local / 1e6}
        results["amplification"] = {"cold_registry_bytes_per_byte_read": cold_bytes / size,
                                    "second_mount_registry_bytes": second_bytes}

        shutil.rmtree(cli.cache_dir)
        pull = timed(lambda: cli.run("pull", "--plain-http", ref))
        results["modelfs pull vs curl"] = {"modelfs_s": pull, "baseline_s": curl, "ratio": curl / pull}
    finally:
        for target in list(mounts):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        proxy.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    print(f"modelfs benchmarks ({args.size} MiB file; {machine})")
    print(f"{'case':<34} {'modelfs':>10} {'baseline':>10} {'ratio':>8}")
    for case, row in results.items():
        if "ratio" in row:
            print(f"{case:<34} {row['modelfs_s']:>9.2f}s {row['baseline_s']:>9.2f}s {row['ratio']:>7.2f}x")
    amp = results["amplification"]
    print(f"{'amplification (cold)':<34} {amp['cold_registry_bytes_per_byte_read']:>10.3f}")
    print(f"{'registry bytes, second mount':<34} {amp['second_mount_registry_bytes']:>10d}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"machine": machine, "size_mib": args.size, "results": results}, indent=2))
    return 0
