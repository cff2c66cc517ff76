"""Where credentials go, how much a body may inflate, how long a control-plane request may take:
hostile or broken origins beside a real registry, through the real CLI and real mounts.

- Blob storage a registry redirects to (another origin) that answers 401 naming itself as
  token realm never gets the user's password or a bearer token: not from ``inspect``, a mount
  or ``pull``. It is a location refusing. A mirror asking the same way never gets the
  registry's credentials, and the read falls back to the registry.
- A gzip-encoded manifest is inflated within the 8 MiB cap; a gzip bomb (1 GiB from 1 MB) is
  refused in one line naming the host, without the process ever holding the inflated bytes.
- A location probe whose answer trickles a byte at a time cannot hold a mount's request slots:
  once the registry heals, reads through the mount work again within seconds.
"""

from __future__ import annotations

import base64
import errno
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Cli
from hostile import HostileMirror
from storage import PresigningFront

MiB = 1 << 20
PASSWORD = "s3cret-pass"
BASIC = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
STORAGE_REALM = 'Bearer realm="{storage}/token",service="storage"'


def read_direct(path: Path, offset: int, size: int = 4096) -> bytes:
    """Read with O_DIRECT: the kernel's page cache (and its own retry of a failed page) cannot
    answer for the mount."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, size)
        got = os.preadv(fd, [buffer], offset)
        return bytes(buffer[:got])
    finally:
        os.close(fd)


def _weights(cli: Cli, ref: str, filepath: str) -> str:
    manifest = json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)["manifest"]
    return next(layer["digest"] for layer in manifest["layers"]
                if layer["annotations"]["org.cncf.model.filepath"] == filepath)


@pytest.fixture(scope="module")
def stored(request, tmp_path_factory) -> tuple[str, bytes]:
    """A small model (3 MiB of weights, with its block index) in the session's basic-auth
    registry and in its token-auth one: (repository and tag, the weights)."""
    data = os.urandom(3 * MiB + 123)
    context = tmp_path_factory.mktemp("origin-model")
    (context / "w.bin").write_bytes(data)
    (context / "Modelfile").write_text("MODEL w.bin\n")
    home = Cli(tmp_path_factory.mktemp("origin-home"))
    for name in ("basic_registry", "token_registry"):
        address = request.getfixturevalue(name).address
        home.run("login", "--plain-http", address, "-u", "alice", "--password-stdin", input=PASSWORD + "\n")
        home.run("build", "-t", f"{address}/origin/model:v1", str(context))
        home.run("push", "--plain-http", f"{address}/origin/model:v1")
    return "origin/model:v1", data


def _front(request, kind: str, cli: Cli, repository: str, only: str | None = None) -> PresigningFront:
    """A presigning front for the ``kind`` registry whose storage asks for credentials (for the
    blob of file ``only``, or every blob), the user logged in to the front (their registry)."""
    registry = request.getfixturevalue(f"{kind}_registry")

    def token(repo: str) -> str:
        return "Bearer " + registry.issuer.sign("storage", [{"type": "repository", "name": repo, "actions": ["pull"]}])

    front = PresigningFront(registry.port, ttl=60, storage_auth=token if kind == "token" else ("alice", PASSWORD))
    cli.run("login", "--plain-http", front.address, "-u", "alice", "--password-stdin", input=PASSWORD + "\n")
    if only:
        front.refused = {_weights(cli, f"{front.address}/{repository}", only)}
    front.challenge = STORAGE_REALM
    return front


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_storage_asking_for_credentials_gets_none_from_inspect(kind, request, stored, cli):
    repository, _ = stored
    with _front(request, kind, cli, repository) as front:
        refused = cli.run("inspect", "--plain-http", f"{front.address}/{repository}", check=False, timeout=60)
        assert front.challenged >= 1 and front.storage_authorizations == []  # storage asked, and got nothing
        assert front.authorization_leaks == 0
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and len(lines) == 1, refused.stderr
        assert front.storage_url.removeprefix("http://") in lines[0] and "refused" in lines[0], lines[0]


def test_storage_asking_for_credentials_gets_none_from_a_mount(request, stored, cli, mounts):
    repository, data = stored
    with _front(request, "basic", cli, repository, only="w.bin") as front:  # the config and index come through
        ref = f"{front.address}/{repository}"
        target = mounts.mount(ref, "--prefetch", "none", "--timeout", "2")
        started = time.monotonic()
        with pytest.raises(OSError) as failed:
            read_direct(target / "w.bin", MiB)
        assert failed.value.errno == errno.EIO and time.monotonic() - started < 6
        mounts.umount(target)
        assert front.challenged >= 2  # the range, and the probe of the registry after it
        assert front.storage_authorizations == [] and front.authorization_leaks == 0
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert PASSWORD not in log and BASIC.split()[1] not in log


def test_storage_asking_for_credentials_gets_none_from_pull(request, stored, cli):
    repository, _ = stored
    with _front(request, "token", cli, repository, only="w.bin") as front:
        ref = f"{front.address}/{repository}"
        started = time.monotonic()
        pulled = cli.run("pull", "--plain-http", ref, check=False, timeout=60)
        assert front.challenged >= 2 and front.storage_authorizations == []
        last = pulled.stderr.strip().splitlines()[-1]  # after the warnings of its retries
        assert pulled.returncode == 1 and last.startswith("modelfs: error:"), pulled.stderr
        assert front.storage_url.removeprefix("http://") in last and "refused" in last, last
        assert time.monotonic() - started < 15


def test_a_mirror_asking_for_credentials_gets_not_the_registrys(basic_registry, stored, cli, tmp_path):
    """The mirror answers everything with 401 naming itself as realm: it gets no credentials
    (the user logged in to the registry only), and the pull reads from the registry."""
    repository, data = stored
    with HostileMirror(basic_registry.port, {}) as mirror:
        mirror.challenge = f'Bearer realm="http://{mirror.address}/token",service="mirror"'
        config = cli.home / "config" / "modelfs" / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f'[registries."{basic_registry.address}"]\nplain_http = true\n'
                          f'mirrors = ["http://{mirror.address}"]\n')
        cli.run("login", "--plain-http", basic_registry.address, "-u", "alice", "--password-stdin", input=PASSWORD + "\n")
        pulled = cli.run("pull", f"{basic_registry.address}/{repository}", timeout=60)
        assert "Pulled" in pulled.stdout
        assert mirror.challenged >= 1 and mirror.authorizations == []


def _run_measured(cli: Cli, *args: str, timeout: float = 60) -> tuple[int, str, float, int]:
    """Run the CLI; its exit status, stderr, wall seconds and peak RSS in bytes: its own
    VmHWM, sampled while it runs (wait4's ru_maxrss would include the RSS of the process it
    was forked from, which exec carries over: a test process grown to 1 GiB made every child
    look that large)."""
    started = time.monotonic()
    cli.home.mkdir(parents=True, exist_ok=True)
    peak = 0
    with open(cli.home / "stderr", "w+b") as err:
        process = subprocess.Popen([sys.executable, "-m", "modelfs", *args], env=cli.env, stdout=subprocess.DEVNULL,
                                   stderr=err)
        try:
            while process.poll() is None and time.monotonic() - started < timeout:
                peak = max(peak, _high_water(process.pid))
                time.sleep(0.01)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        err.seek(0)
        return process.returncode, err.read().decode(), time.monotonic() - started, peak


def _high_water(pid: int) -> int:
    """The peak resident size of ``pid`` since it last exec'd, in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def test_a_gzip_bomb_for_a_manifest_is_refused_in_bounded_memory(faulty, registry, minilm_ref, cli, mounts):
    ref = minilm_ref.replace(registry.address, faulty.address)
    faulty.manifests = "gzip"  # an honest server that compresses anyway: inflated within the cap
    assert "all-minilm" in cli.run("inspect", "--plain-http", ref).stdout
    faulty.manifests = "bomb"  # 1 MB inflating to 1 GiB
    status, stderr, seconds, peak = _run_measured(cli, "inspect", "--plain-http", ref)
    assert peak < 200 * MiB, f"inspect peaked at {peak / MiB:.0f} MiB"
    assert seconds < 10
    lines = stderr.strip().splitlines()
    assert status == 1 and len(lines) == 1, stderr
    assert f"{faulty.address} sent over 8388608 bytes (inflated from gzip)" in lines[0], lines[0]
    refused = mounts.refused(ref, "--prefetch", "none")  # the daemon's manifest, the same one way
    assert refused.returncode == 1 and "sent over 8388608 bytes (inflated from gzip)" in refused.stderr
    assert faulty.injected["manifest-bomb"] >= 2


def test_a_trickling_location_probe_lets_go_and_reads_recover_once_the_registry_heals(
        faulty, registry, minilm_ref, minilm_dir, cli, mounts):
    """The weights' ranges are refused (404: the control plane probes the registry for where
    to read them), and that probe's answer comes a byte at a time (for 30 s if nobody lets
    go). With --timeout 2, the probe is given up in 2 s; once the registry heals, the read
    works within seconds, through the same mount."""
    weights = _weights(cli, minilm_ref, "model.safetensors")
    target = mounts.mount(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "none",
                          "--timeout", "2")
    source = (minilm_dir / "model.safetensors").read_bytes()
    faulty.trickle_seconds = 30
    faulty.only = weights
    faulty.by_range = {"bytes=0-0": "trickle-head"}
    faulty.persistent = "404"
    with pytest.raises(OSError) as failed:
        read_direct(target / "model.safetensors", 8 * MiB)
    assert failed.value.errno == errno.EIO
    deadline = time.monotonic() + 10
    while not faulty.injected["trickle-head"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert faulty.injected["trickle-head"] >= 1  # a probe is trickling now
    faulty.persistent, faulty.by_range = None, {}  # healed
    healed = time.monotonic()
    while True:
        try:
            assert read_direct(target / "model.safetensors", 8 * MiB) == source[8 * MiB:8 * MiB + 4096]
            break
        except OSError as exc:
            assert exc.errno == errno.EIO
            assert time.monotonic() - healed < 12, "reads did not recover after the registry healed"
            time.sleep(0.3)
    assert time.monotonic() - healed < 12
