"""Security defaults: TLS verified, secrets never logged, no allow_other unless asked,
an unprivileged user can mount with a user cache."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE_MODELFILE, Registry
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    reg = make_tls_registry(tmp_path_factory.mktemp("tls-registry"))
    yield reg
    reg.stop()


def make_tls_registry(root: Path) -> Registry:
    """Distribution serving HTTPS with a self-signed certificate for 127.0.0.1 (``root/cert.pem``)."""
    root.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelfs test registry")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (root / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return Registry(root, tls=(root / "cert.pem", root / "key.pem"))


def test_self_signed_registry_is_refused_unless_ca_given(cli, tls_registry, small_minilm):
    ref = f"{tls_registry.address}/tls/minilm:v1"
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
    refused = cli.run("push", ref, check=False)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "TLS certificate of" in lines[0] and "--ca-file" in lines[0], refused.stderr
    ca = str(tls_registry.root / "cert.pem")
    cli.run("push", "--ca-file", ca, ref)
    assert "all-minilm" in cli.run("inspect", "--ca-file", ca, ref).stdout


def test_secrets_never_reach_logs_or_errors(cli, token_registry, small_minilm, mounts):
    ref = f"{token_registry.address}/public/secrets:v1"
    cli.run("login", "--plain-http", token_registry.address, "-u", "alice", "--password-stdin", input="s3cret-pass\n")
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
    pushed = cli.run("push", "--plain-http", "--log-level", "debug", ref)
    target = mounts.mount(ref, "--prefetch", "none", "--log-level", "debug")
    (target / "config.json").read_bytes()
    mounts.umount(target)
    logs = pushed.stderr + pushed.stdout + "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert "s3cret-pass" not in logs
    import base64
    assert base64.b64encode(b"alice:s3cret-pass").decode() not in logs
    assert token_registry.issuer.issued and all(token not in logs for token in token_registry.issuer.issued)
    assert "Bearer" not in logs


def test_mount_is_private_unless_allow_other(mounts, minilm_ref):
    target = mounts.mount(minilm_ref, "--prefetch", "none")
    options = next(line for line in open("/proc/self/mountinfo") if f" {target} " in line)
    assert "allow_other" not in options
    other = mounts.mount(minilm_ref, "--prefetch", "none", "--allow-other")
    options = next(line for line in open("/proc/self/mountinfo") if f" {other} " in line)
    assert "allow_other" in options


def _let_others_reach(path: Path) -> None:
    """Let other users traverse from /tmp down to ``path`` (pytest's tmp is 0700)."""
    for parent in [path, *path.parents]:
        if parent.stat().st_mode & 0o001 == 0:
            os.chmod(parent, parent.stat().st_mode | 0o001)
        if str(parent) == "/tmp":
            break


def _as_nobody(*argv: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unprivileged_user_mounts_with_a_user_cache(minilm_ref, minilm_dir, tmp_path):
    import site

    import modelfs
    user = pwd.getpwnam("nobody")
    home = tmp_path / "nobody-home"
    (home / "mnt").mkdir(parents=True)
    _let_others_reach(tmp_path)  # nobody's own home is under pytest's tmp
    os.chown(home, user.pw_uid, user.pw_gid)
    os.chown(home / "mnt", user.pw_uid, user.pw_gid)
    # the venv's interpreter may live under /root (pyenv); Debian's python3.11 runs the same code
    python = shutil.which("python3.11", path="/usr/bin") or sys.executable
    path = os.pathsep.join([str(os.path.dirname(os.path.dirname(modelfs.__file__))), *site.getsitepackages()])
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"),
           "XDG_CONFIG_HOME": str(home / "config"), "PYTHONPATH": path}
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        pytest.skip("/dev/fuse is not world read-writable here (Debian's default is 0666; scripts/setup.sh sets it)")
    probe = _as_nobody(python, "-c", "import modelfs.cli, pyfuse3", env=env)
    if probe.returncode != 0:
        pytest.skip(f"the code is not readable by nobody from here: {probe.stderr.strip().splitlines()[-1:]}")
    mounted = _as_nobody(python, "-m", "modelfs", "mount", "--plain-http", "--prefetch", "none", minilm_ref,
                         str(home / "mnt"), env=env)
    try:
        assert mounted.returncode == 0, mounted.stderr
        read = _as_nobody("cat", str(home / "mnt" / "config.json"), env=env)
        assert read.stdout.encode() == (minilm_dir / "config.json").read_bytes()
        assert os.stat(home / "cache" / "modelfs" / "blobs").st_uid == user.pw_uid
        mountinfo = next(line for line in open("/proc/self/mountinfo") if f" {home / 'mnt'} " in line)
        assert f"user_id={user.pw_uid}" in mountinfo
    finally:
        unmounted = _as_nobody(python, "-m", "modelfs", "umount", str(home / "mnt"), env=env)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(home / "mnt")], capture_output=True)
    assert unmounted.returncode == 0, unmounted.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_weights_saved_0600_are_readable_by_another_user_with_allow_other(cli, registry, mounts, tmp_path):
    """safetensors.save_file writes 0600; an inference server running as another user must
    still read the weights through an allow_other mount, and an executable keeps its exec bit."""
    context = tmp_path / "ctx"
    context.mkdir()
    weights = context / "model.safetensors"
    weights.write_bytes(os.urandom(3 << 20))
    weights.chmod(0o600)
    tool = context / "run.sh"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o700)
    (context / "Modelfile").write_text("MODEL model.safetensors\nCODE run.sh\n")
    ref = f"{registry.address}/perm/model:v1"
    cli.run("build", "-t", ref, str(context))
    cli.run("push", "--plain-http", ref)
    (tmp_path / "mounts").mkdir()
    _let_others_reach(tmp_path / "mounts")  # where the mounts go

    private = mounts.mount(ref, "--prefetch", "none")
    assert stat.S_IMODE((private / "model.safetensors").stat().st_mode) == 0o400  # as the artifact says, read-only

    shared = mounts.mount(ref, "--prefetch", "none", "--allow-other")
    assert stat.S_IMODE((shared / "model.safetensors").stat().st_mode) == 0o444
    assert stat.S_IMODE((shared / "run.sh").stat().st_mode) == 0o555
    assert stat.S_IMODE(shared.stat().st_mode) == 0o555
    env = dict(os.environ)
    read = _as_nobody("wc", "-c", str(shared / "model.safetensors"), env=env)
    assert read.returncode == 0 and read.stdout.split()[0] == str(3 << 20), read.stderr
    assert _as_nobody(str(shared / "run.sh"), env=env).stdout == "hi\n"

    owned = mounts.mount(ref, "--prefetch", "none", "--allow-other", "--uid", "nobody", "--gid", "0",
                         "--file-mode", "0440", "--dir-mode", "0550")
    info = (owned / "model.safetensors").stat()
    assert (info.st_uid, info.st_gid) == (pwd.getpwnam("nobody").pw_uid, 0)
    assert stat.S_IMODE(info.st_mode) == 0o440 and stat.S_IMODE((owned / "run.sh").stat().st_mode) == 0o550
    assert stat.S_IMODE(owned.stat().st_mode) == 0o550
    assert _as_nobody("wc", "-c", str(owned / "model.safetensors"), env=env).stdout.split()[0] == str(3 << 20)
    # the same through fstab-style options
    via_fstab = tmp_path / "fstab"
    via_fstab.mkdir()
    cli.run(ref, str(via_fstab), "-o", "ro,plain_http,prefetch=none,allow_other,uid=nobody,file_mode=0400")
    mounts.active.append(via_fstab)
    assert stat.S_IMODE((via_fstab / "model.safetensors").stat().st_mode) == 0o400
    assert (via_fstab / "model.safetensors").stat().st_uid == pwd.getpwnam("nobody").pw_uid
