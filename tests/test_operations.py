"""Running modelfs on GPU hosts: unit files, mount(8) and fstab, mirrors, cache limits,
metrics, status — all with real processes against real registries."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO_ROOT, SAMPLE_MODELFILE, Registry

REPO = Path(__file__).resolve().parent.parent
MODELFS_BIN = Path(sys.executable).parent / "modelfs"


def _du(path: Path) -> int:
    """Bytes on disk, as du counts them (allocated blocks, so sparse holes are free)."""
    return int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_unit_files_verify(tmp_path):
    for unit in (REPO / "systemd").iterdir():
        text = unit.read_text().replace("/usr/local/bin/modelfs", str(MODELFS_BIN))
        (tmp_path / unit.name).write_text(text)
    (tmp_path / "modelfs@models-llama.service").symlink_to(tmp_path / "modelfs@.service")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "modelfs@models-llama.service"),
                             str(tmp_path / "models-minilm.mount")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_mount_t_fuse_modelfs_and_fstab(cli, minilm_ref, minilm_dir, tmp_path):
    # mount(8) gives helpers a fixed PATH; scripts/setup.sh links /usr/local/bin/modelfs
    assert Path("/usr/local/bin/modelfs").exists(), "run scripts/setup.sh: mount.fuse3 needs /usr/local/bin/modelfs"
    env = cli.env
    target = tmp_path / "models" / "minilm"
    target.mkdir(parents=True)
    options = f"ro,_netdev,plain_http,prefetch=none,cache_dir={cli.cache_dir}"
    subprocess.run(["mount", "-t", "fuse.modelfs", minilm_ref, str(target), "-o", options], env=env, check=True,
                   capture_output=True, timeout=120)
    try:
        assert (target / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()
    finally:
        subprocess.run(["umount", str(target)], check=True)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# modelfs\n{minilm_ref}  {target}  fuse.modelfs  {options}  0  0\n")
    subprocess.run(["mount", "--fstab", str(fstab), str(target)], env=env, check=True, capture_output=True, timeout=120)
    try:
        assert (target / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
        status = cli.run("status").stdout
        assert str(target) in status and minilm_ref in status
    finally:
        subprocess.run(["umount", str(target)], check=True)
    bad = subprocess.run(["mount", "-t", "fuse.modelfs", minilm_ref, str(target), "-o", "ro,colour=blue"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown mount option 'colour=blue'" in bad.stderr


def test_pull_through_mirror_serves_while_upstream_is_down(cli, tmp_path, small_minilm, mounts):
    upstream = Registry(tmp_path / "upstream")
    mirror = Registry(tmp_path / "mirror", f"proxy:\n  remoteurl: http://{upstream.address}\n")
    try:
        ref = f"{upstream.address}/library/minilm:v1"
        cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
        cli.run("push", "--plain-http", ref)
        config = tmp_path / "config.toml"
        config.write_text(f'[registries."{upstream.address}"]\nplain_http = true\nmirrors = ["http://{mirror.address}"]\n')
        cli.env["MODELFS_CONFIG"] = str(config)
        cli.run("pull", ref)  # through the mirror, which now holds every blob
        shutil.rmtree(cli.cache_dir)
        upstream.kill()
        target = mounts.mount(ref, "--prefetch", "none")
        assert (target / "model.safetensors").read_bytes() == (small_minilm / "model.safetensors").read_bytes()
        # the block index the manifest names came from the mirror too: checked by its digest,
        # it needs no word from the upstream, and the mirror kept serving throughout
        log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
        assert "using the next source" not in log, log
        assert "block index: named by the manifest" in log, log
        # with the mirror gone too: what the cache recorded is still inspected (and says so),
        # and a reference it never saw is one line naming the registry it cannot reach
        mirror.kill()
        offline = cli.run("inspect", ref)
        assert "warning: offline" in offline.stderr and "all-minilm" in offline.stdout
        failed = cli.run("inspect", ref.replace(":v1", ":v2"), check=False)
        last = failed.stderr.strip().splitlines()[-1]
        assert failed.returncode == 1 and last.startswith(f"modelfs: error: cannot reach {upstream.address}")
        assert "Traceback" not in failed.stderr
    finally:
        for registry in (upstream, mirror):
            if registry.process.poll() is None:
                registry.stop()


def test_cache_limit_evicts_and_refetches_correct_bytes(cli, minilm_ref, minilm_dir, mounts):
    limit = 40 << 20
    target = mounts.mount(minilm_ref, "--prefetch", "none", "--cache-max-size", "40M")
    original = (minilm_dir / "model.safetensors").read_bytes()
    assert (target / "model.safetensors").read_bytes() == original  # 90 MB through a 40 MB cache
    (target / "tokenizer.json").read_bytes()
    deadline = time.monotonic() + 20
    while _du(cli.cache_dir / "blobs") > limit:
        assert time.monotonic() < deadline, f"cache still {_du(cli.cache_dir / 'blobs')} bytes on disk"
        time.sleep(0.2)
    # evicted weights come back right once the kernel's page cache forgets them
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], capture_output=True)
    with open(target / "model.safetensors", "rb") as handle:
        handle.seek(50 << 20)
        assert handle.read(4 << 20) == original[50 << 20:54 << 20]


def test_prefetch_takes_only_what_fits_under_the_cache_limit(cli, minilm_ref, minilm_dir, mounts):
    """A model bigger than the cache limit is not prefetched whole: that would evict its own
    blocks (and those just read) and fetch them again, forever."""
    target = mounts.mount(minilm_ref, "--prefetch", "all", "--cache-max-size", "40M")
    deadline = time.monotonic() + 60
    while "prefetch complete" not in (log := "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())):
        assert time.monotonic() < deadline, log
        time.sleep(0.2)
    assert "prefetching 12 of 13 blobs" in log and "under the cache limit of 41943040 bytes" in log, log
    cached = lambda name: float(os.getxattr(target / name, "user.modelfs.cached"))  # noqa: E731
    # of the blob that does not fit, only the block holding its header (the metadata read ahead)
    size = (minilm_dir / "model.safetensors").stat().st_size
    assert cached("tokenizer.json") == 1.0 and cached("model.safetensors") == round((1 << 20) / size, 4)
    assert _du(cli.cache_dir / "blobs") < 40 << 20
    assert (target / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()


def test_the_background_daemon_log_is_rotated(cli, mounts, minilm_ref, minilm_dir):
    # a debug-level prefetch of the model logs a few KiB: several times the limit
    target = mounts.mount(minilm_ref, "--prefetch", "all", "--log-level", "debug", "--log-max-size", "1K")
    assert (target / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()
    mounts.umount(target)
    logs = sorted((cli.cache_dir / "logs").iterdir())
    assert [p.name.rsplit(".log", 1)[1] for p in logs] in (["", ".1"], ["", ".1", ".2"])  # rotated, 2 kept at most
    assert all(p.stat().st_size <= 1024 for p in logs)
    assert "unmounted " in logs[0].read_text()  # the current file has the latest lines


def test_cache_stats_and_prune(cli, minilm_ref):
    cli.run("pull", "--plain-http", minilm_ref)
    stats = cli.run("cache", "stats").stdout
    assert minilm_ref in stats and "100%" in stats
    before = _du(cli.cache_dir / "blobs")
    assert before > 90_000_000
    pruned = cli.run("cache", "prune", "--keep-size", "10M").stdout
    assert "Freed" in pruned
    assert _du(cli.cache_dir / "blobs") <= 10 << 20
    cli.run("cache", "prune", "--all")
    assert not list((cli.cache_dir / "blobs" / "sha256").iterdir())
    assert cli.run("cache", "prune", check=False).returncode == 1


def test_metrics_count_the_bytes_read(cli, minilm_ref, minilm_dir, mounts):
    from conftest import free_port
    port = free_port()
    target = mounts.mount(minilm_ref, "--prefetch", "none", "--metrics", f"127.0.0.1:{port}")
    data = (target / "model.safetensors").read_bytes()
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    values = dict(re.findall(r"^(modelfs_\w+)(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M))
    assert float(values["modelfs_served_bytes_total"]) == len(data)
    fetched = float(values["modelfs_registry_bytes_total"])
    assert len(data) <= fetched <= len(data) * 1.05
    assert float(values["modelfs_read_errors_total"]) == 0
    assert 'modelfs_read_latency_seconds_count' in text
    again = (target / "model.safetensors").read_bytes()  # page cache or block cache: no new fetch
    assert again == data
    values = dict(re.findall(r"^(modelfs_\w+)(?:\{[^}]*\})? ([0-9.e+-]+)$", httpx.get(f"http://127.0.0.1:{port}/").text, re.M))
    assert float(values["modelfs_registry_bytes_total"]) == fetched
    # every sample names its mount: mount point, reference and digest
    labelled = re.search(r'^modelfs_reads_total\{mountpoint="([^"]*)",reference="([^"]*)",digest="(sha256:[0-9a-f]{64})"\} ',
                         text, re.M)
    assert labelled and labelled.group(1) == str(target) and labelled.group(2) == minilm_ref


def test_one_endpoint_serves_the_metrics_of_every_mount_of_the_host(cli, minilm_ref, mounts):
    from conftest import free_port
    first, second = mounts.mount(minilm_ref, "--prefetch", "none"), mounts.mount(minilm_ref, "--prefetch", "none")
    (first / "config.json").read_bytes()
    deadline = time.monotonic() + 10
    while True:  # the daemons rewrite their status every second: until the first one counted its read
        once = cli.run("metrics").stdout
        if re.search(rf'^modelfs_reads_total\{{mountpoint="{re.escape(str(first))}".*\}} [1-9]', once, re.M) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for target in (first, second):
        assert re.search(rf'^modelfs_mount_bytes_total{{mountpoint="{re.escape(str(target))}",reference="'
                         rf'{re.escape(minilm_ref)}",digest="sha256:[0-9a-f]{{64}}"}} [1-9][0-9]*$', once, re.M), once
    reads = {m.group(1): int(m.group(2)) for m in re.finditer(r'^modelfs_reads_total\{mountpoint="([^"]*)".*\} (\d+)$',
                                                               once, re.M)}
    assert reads[str(first)] >= 1 and reads[str(second)] == 0
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "modelfs", "metrics", "--listen", f"127.0.0.1:{port}"],
                              env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Serving the metrics" in server.stdout.readline()
        served = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert str(first) in served and str(second) in served and "modelfs_mount_answering" in served
    finally:
        server.terminate()
        server.wait(10)


def test_systemd_notify_ready_only_when_mount_answers_and_stopping(cli, minilm_ref, tmp_path):
    import socket
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(60)
    target = tmp_path / "mnt"
    target.mkdir()
    env = dict(cli.env, NOTIFY_SOCKET=str(notify))
    daemon = subprocess.Popen([sys.executable, "-m", "modelfs", "mount", "--foreground", "--plain-http",
                               "--prefetch", "none", minilm_ref, str(target)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    def until(wanted: bytes) -> list[bytes]:
        seen = [sock.recv(200)]
        while seen[-1] != wanted:
            seen.append(sock.recv(200))
        return seen

    try:
        before_ready = until(b"READY=1")
        assert os.path.ismount(target) and "model.safetensors" in os.listdir(target)
        statuses = [m for m in before_ready if m.startswith(b"STATUS=")]
        assert statuses and b"% local (" in statuses[0]  # progress for `systemctl status`
        daemon.terminate()
        until(b"STOPPING=1")
        assert daemon.wait(30) == 0
        assert not os.path.ismount(target)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        sock.close()


def test_pull_prestages_so_a_mount_fetches_no_blob(cli, minilm_ref, minilm_dir, mounts, proxy, registry):
    proxied = minilm_ref.replace(registry.address, proxy.address)
    cli.run("pull", "--plain-http", proxied)
    # pull returns only once every block is on disk and every blob matches its digest
    blobs = json.loads(cli.run("cache", "stats", "--json").stdout)["blobs"]
    assert len(blobs) == 13 and all(b["verified"] and b["cached_bytes"] == b["size"] for b in blobs), blobs
    proxy.reset()
    target = mounts.mount(proxied, "--prefetch", "none")
    assert (target / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()
    # the manifest and config are asked again (a tag may move); no weight bytes are
    assert proxy.downstream_bytes < 64 * 1024, proxy.downstream_bytes


def test_http_proxy_environment_is_honoured(cli, minilm_ref, proxy, tmp_path):
    cli.env.update(HTTP_PROXY=f"http://{proxy.address}", http_proxy=f"http://{proxy.address}", NO_PROXY="", no_proxy="")
    proxy.reset()
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", minilm_ref, "--output", str(out))
    assert proxy.downstream_bytes > 90_000_000  # every byte came through the proxy


def test_status_reports_numbers_from_the_daemon_without_touching_the_mount(cli, mounts, minilm_ref, minilm_dir):
    target, pid = mounts.mount_daemon(minilm_ref)  # prefetch all
    size = sum(p.stat().st_size for p in minilm_dir.rglob("*") if p.is_file() and p.name != "Modelfile")
    deadline = time.monotonic() + 60
    while True:
        found = next(m for m in json.loads(cli.run("status", "--json").stdout) if m["mountpoint"] == str(target))
        if found["bytes_local"] == found["bytes_total"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert found["pid"] == pid and found["reference"] == minilm_ref and found["digest"].startswith("sha256:")
    assert found["answering"] is True and found["offline"] is None
    assert found["bytes_local"] == found["bytes_total"] > 0.9 * size  # prefetch progress, as numbers
    for key in ("integrity_errors", "read_errors", "reads", "workers", "bytes_fetched"):
        assert isinstance(found[key], int), key
    assert found["integrity_errors"] == 0 and found["workers"] >= 2
    text = cli.run("status").stdout
    assert f"{target}: {minilm_ref}" in text and f"pid {pid}: 100% local" in text
    # a frozen daemon cannot hang status: it reads the file the daemon writes, marked stale
    # (its last write dated STALE_SECONDS + 1 back, as if it froze that long ago: no 6 s sleep)
    from modelfs.mount.status import STALE_SECONDS, status_path
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.2)  # a write under way when it stopped has landed or never will
        path = Path(status_path(str(target)))
        doc = json.loads(path.read_text())
        path.write_text(json.dumps({**doc, "updated": doc["updated"] - STALE_SECONDS - 1}))
        started = time.monotonic()
        frozen = next(m for m in json.loads(cli.run("status", "--json", timeout=10).stdout) if m["mountpoint"] == str(target))
        assert frozen["answering"] is False and time.monotonic() - started < 5
    finally:
        os.kill(pid, signal.SIGCONT)


def test_status_reads_a_status_file_of_another_version(cli, mounts, minilm_ref):
    """During an upgrade, daemons of the old version keep running while `status` is the new
    one (and the other way round): a field it does not know, or one missing, still gives one
    line per mount, never a traceback."""
    from modelfs.mount.status import status_path
    target, pid = mounts.mount_daemon(minilm_ref, "--prefetch", "none")
    path = Path(status_path(str(target)))
    os.kill(pid, signal.SIGSTOP)  # it stops rewriting its status file
    try:
        doc = json.loads(path.read_text())
        path.write_text(json.dumps({**doc, "signatures": "from a later version"}))
        newer = cli.run("status")
        assert f"{target}: {minilm_ref} (" in newer.stdout and f"pid {pid}: " in newer.stdout
        path.write_text(json.dumps({k: v for k, v in doc.items() if k != "handler_errors"}))
        older = cli.run("status")
        assert f"pid {pid}: status written by another version of modelfs" in older.stdout
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_mount_daemon_that_cannot_succeed_exits_with_the_status_systemd_does_not_restart(cli, registry, tmp_path):
    target = tmp_path / "never"
    target.mkdir()
    missing = cli.run("mount", "--foreground", "--plain-http", f"{registry.address}/no/such:model", str(target),
                      check=False, timeout=60)
    assert missing.returncode == 78 and "not found" in missing.stderr.strip().splitlines()[-1]
    unit = (REPO_ROOT / "systemd" / "modelfs@.service").read_text()
    assert "RestartPreventExitStatus=78" in unit


def _status_of(cli, point: Path) -> dict | None:
    return next((m for m in json.loads(cli.run("status", "--json").stdout) if m["mountpoint"] == str(point)), None)


def test_a_mount_point_reached_through_a_symlink_is_one_mount_everywhere(cli, minilm_ref, minilm_dir, mounts, tmp_path):
    """/models -> /data/models: mounting, `status`, `metrics` and `umount` through the link all
    mean the mount the kernel's table shows at the resolved path; the fstab form too."""
    real = tmp_path / "data" / "models"
    (real / "m").mkdir(parents=True)
    (real / "f").mkdir()
    link = tmp_path / "models"
    link.symlink_to(real)
    out = cli.run("mount", "--plain-http", "--prefetch", "none", minilm_ref, str(link / "m")).stdout
    mounts.active.append(link / "m")
    assert (link / "m" / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
    deadline = time.monotonic() + 10
    while (found := _status_of(cli, real / "m")) is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the daemon writes its status every second
    assert found is not None and found.get("pid") == int(out.split("(pid ")[1].split(",")[0]) and found["answering"], found
    assert f'mountpoint="{real / "m"}"' in cli.run("metrics").stdout
    # the mount.fuse3 form that fstab lines run, through the link as well
    cli.run(minilm_ref, str(link / "f"), "-o", "ro,plain_http,prefetch=none")
    mounts.active.append(link / "f")
    assert (link / "f" / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
    for name in ("m", "f"):
        assert cli.run("umount", str(link / name)).stdout.startswith("Unmounted")
        mounts.active.remove(link / name)
        assert not os.path.ismount(real / name) and not os.listdir(real / name)
    refused = cli.run("umount", str(link / "m"), check=False)
    assert refused.returncode == 1 and refused.stderr.strip() == f"modelfs: error: {link / 'm'} is not a modelfs mount"


def test_a_reply_to_a_reader_gone_is_not_an_error_in_the_daemons_log(caplog):
    """The kernel forgets a request whose reader went away (a loader killed, the mount
    detached with read-ahead on its way); pyfuse3 logs the failed reply as an ERROR. Nothing
    was lost: it must not read as an error to an operator. Any other failed reply still does."""
    import logging

    from modelfs.mount.daemon import _reply_to_a_reader_gone
    pyfuse3_log = logging.getLogger("pyfuse3")
    pyfuse3_log.addFilter(_reply_to_a_reader_gone)
    try:
        with caplog.at_level(logging.INFO):
            pyfuse3_log.error("fuse_read(): fuse_reply_* failed with %s", "No such file or directory")
            pyfuse3_log.error("fuse_read(): fuse_reply_* failed with %s", "Invalid argument")
    finally:
        pyfuse3_log.removeFilter(_reply_to_a_reader_gone)
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR] == [
        ("ERROR", "fuse_read(): fuse_reply_* failed with Invalid argument")]
