"""Small reads of cached blocks: what a tar layer of many small files costs to mount, and
what random 4 KiB reads through a warm mount cost against the same reads of a local file.

    python -m benchmarks.smallreads [--members N] [--size MiB]

Run alone (its own registry, a few minutes) or as cases of ``python -m benchmarks``. Each
cached block is checked when read back from disk (a 1 MiB read, xxh3, lz4 for text); these
cases show whether a small read pays that again every time (a 100,000-member tar took
148-240 s to mount that way) or once per block held in memory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Bench, MiB, drop_page_cache, peak_rss, timed, write_safetensors

WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"
PAGE = 4096


def many_member_tar(count: int, seed: int = 7) -> bytes:
    """A tar of ``count`` small text files in 100 directories, as Python's tarfile writes a
    tree it walks: a float mtime gives every member a PAX record (three header reads each)."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"tokens", b"vocab", b"merges", b"</s>"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for number in range(count):
            data = b" ".join(rng.choice(words) for _ in range(rng.randrange(10, 120)))
            info = tarfile.TarInfo(f"d{number % 100:03d}/f{number:06d}.txt")
            info.size, info.mtime = len(data), 1_700_000_000.25 + number
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_mount_case(bench: Bench, members: int) -> None:
    """Mount a tar layer of ``members`` small files: cold (the first mount fetches the blob
    from the registry) and warm (every block cached, page cache dropped). Baseline: GNU tar
    listing the same tar from a local file."""
    from conftest import push_artifact
    blob = many_member_tar(members)
    local = bench.work / "many.tar"
    local.write_bytes(blob)
    ref = push_artifact(bench.registry.address, "bench/many", [(blob, WEIGHT_TAR, {})])
    bench.empty_cache()
    cold_s, target = timed_mount(bench, ref)
    bench.umount(target)
    drop_page_cache()
    warm_s, target = timed_mount(bench, ref)
    listed = sum(len(files) for _, _, files in os.walk(target))
    bench.umount(target)
    drop_page_cache()
    tar_s = timed(lambda: subprocess.run(["tar", "-tf", str(local)], check=True, stdout=subprocess.DEVNULL))
    local.unlink()
    if listed != members:
        raise AssertionError(f"the mount lists {listed} files, the tar has {members}")
    case = f"mount a tar of {members:,} small files"
    bench.record(f"{case}, cold", cold_s, tar_s, "tar -tf, local file", "<= 10 s", blob_bytes=len(blob))
    bench.record(f"{case}, warm", warm_s, tar_s, "tar -tf, local file", "<= 10 s", blob_bytes=len(blob))


def timed_mount(bench: Bench, ref: str) -> tuple[float, Path]:
    """Seconds until ``modelfs mount`` returned with the mount live, and its mount point."""
    start = time.perf_counter()
    target = bench.mount(ref, "--prefetch", "none")[0]
    return time.perf_counter() - start, target


def page_offsets(size: int, count: int, span: int, seed: int = 3) -> list[int]:
    """``count`` random page-aligned offsets within the first ``span`` bytes of the tensors
    (past the safetensors header): the same list for the mount and the local file."""
    rng = random.Random(seed)
    start = MiB  # past the safetensors header
    pages = max(1, (min(span, size - start) - PAGE) // PAGE)
    return [start + rng.randrange(pages) * PAGE for _ in range(count)]


def random_page_reads(path: Path, offsets: list[int]) -> float:
    """Seconds for a 4 KiB ``pread`` at each offset, the kernel told the reads are random
    (no read-ahead: each read is what the application asked for)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        start = time.perf_counter()
        for offset in offsets:
            if len(os.pread(fd, PAGE, offset)) != PAGE:
                raise AssertionError(f"short read at {offset} of {path}")
        return time.perf_counter() - start
    finally:
        os.close(fd)


def bytes_read(pid: int) -> int:
    """What a process read through read()/pread() (its cache read back; not sockets)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def random_4k_case(bench: Bench, ref: str, local: Path, count: int = 2000) -> None:
    """Warm random 4 KiB reads (every block cached, page caches dropped) through the mount
    against the same reads of the local file: over the whole file, and within one 32 MiB
    tensor (rows of an embedding table, read at random by a lazily loading runtime)."""
    size = local.stat().st_size
    for label, span in (("whole file", size), ("one 32 MiB tensor", 32 * MiB)):
        offsets = page_offsets(size, count, span)
        target, pid, _ = bench.mount(ref, "--prefetch", "none")
        drop_page_cache()
        read_before = bytes_read(pid)
        mounted_s = random_page_reads(target / local.name, offsets)
        read_back = bytes_read(pid) - read_before
        rss = peak_rss(pid)
        bench.umount(target)
        drop_page_cache()
        local_s = random_page_reads(local, offsets)
        bench.record(f"warm random 4 KiB reads, {label} vs local file", mounted_s, local_s,
                     "local file, cold page cache", "report", reads=count,
                     modelfs_us_per_read=mounted_s / count * 1e6, baseline_us_per_read=local_s / count * 1e6,
                     daemon_peak_rss=rss, daemon_read_bytes_per_read=read_back / count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smallreads")
    parser.add_argument("--members", type=int, default=100_000, help="tar members (default 100000; 0: skip that case)")
    parser.add_argument("--size", type=int, default=256, help="weight file for the random reads, MiB (default 256)")
    parser.add_argument("--reads", type=int, default=2000, help="random 4 KiB reads per case (default 2000)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="modelfs-smallreads-"))
    bench = Bench(work)
    try:
        if args.members:
            tar_mount_case(bench, args.members)
        context = work / "model"
        context.mkdir()
        weights = context / "model.safetensors"
        write_safetensors(weights, args.size * MiB)
        (context / "Modelfile").write_text("NAME bench\nMODEL model.safetensors\n")
        ref = f"{bench.registry.address}/bench/model:v1"
        bench.cli.run("build", "-t", ref, str(context))
        bench.cli.run("push", "--plain-http", ref)
        bench.cli.run("pull", "--plain-http", ref)  # warm: every block cached and checked
        random_4k_case(bench, ref, weights, args.reads)
    except BaseException:
        bench.show_daemon_logs()
        raise
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    for case, row in bench.results.items():
        rss = (f"  daemon read {row['daemon_read_bytes_per_read'] / 1024:.0f} KiB per read, peak RSS "
               f"{row['daemon_peak_rss'] / 1e6:.0f} MB") if "daemon_peak_rss" in row else ""
        print(f"{case:<60} {row['modelfs_s']:>8.2f}s {row['baseline_s']:>8.2f}s {row['ratio']:>7.3f}x  {row['target']}{rss}")
    if args.json:
        args.json.write_text(json.dumps(bench.results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
