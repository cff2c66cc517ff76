"""Signatures checked before the first byte is served: real model-signing (OMS) signatures,
modelfs's own cosign-compatible bundles, the legacy .sig tag, keyless Sigstore bundles from
public test vectors, against the real registry fixture and real FUSE mounts."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import Cli, daemon_pid
from proxy import CountingProxy

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
model_signing = pytest.importorskip("model_signing")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: E402

from modelfs.logfile import daemon_log_path  # noqa: E402

VECTORS = Path(__file__).parent / "data" / "sigstore"
MODELFILE = "NAME signed\nCONFIG config.json\nMODEL *.safetensors\nDOC tokenizer.json\nDOC model.sig\n"
BUNDLE_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"


def _write_key(directory: Path, name: str, key) -> tuple[Path, Path]:
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _model_dir(root: Path, name: str, weight: bytes) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model": name}))
    (directory / "tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    (directory / "model.safetensors").write_bytes(weight)
    (directory / "Modelfile").write_text(MODELFILE)
    return directory


def _oms_sign(directory: Path, private: Path) -> None:
    """model_signing's own API, as `model_signing sign key` does (Modelfile excluded: it is the build's)."""
    model_signing.signing.Config().use_elliptic_key_signer(private_key=str(private)).set_hashing_config(
        model_signing.hashing.Config().set_ignored_paths(paths=["Modelfile"], ignore_git_paths=True)
    ).sign(directory, directory / "model.sig")


def _push(cli: Cli, registry, directory: Path, repository: str) -> str:
    ref = f"{registry.address}/{repository}:v1"
    cli.run("build", "-t", ref, "-f", str(directory / "Modelfile"), str(directory))
    cli.run("push", "--plain-http", ref)
    return ref


class World:
    """Keys, and models signed (or not) in every way the tests need, built and pushed once."""

    def __init__(self, root: Path, registry) -> None:
        self.root, self.registry = root, registry
        self.cli = Cli(root / "home")
        self.release, self.release_pub = _write_key(root, "release", ec.generate_private_key(ec.SECP256R1()))
        self.other, self.other_pub = _write_key(root, "other", ec.generate_private_key(ec.SECP256R1()))
        self.edkey, self.edkey_pub = _write_key(root, "ed", ed25519.Ed25519PrivateKey.generate())
        a = _model_dir(root, "a", os.urandom(300_000))
        _oms_sign(a, self.release)
        self.a_dir = a
        self.a = _push(self.cli, registry, a, "sign/a")
        swapped = _model_dir(root, "swapped", os.urandom(300_000))  # same names, a new weight, A's signature
        shutil.copy(a / "model.sig", swapped / "model.sig")
        for name in ("config.json", "tokenizer.json"):
            shutil.copy(a / name, swapped / name)
        self.swapped = _push(self.cli, registry, swapped, "sign/swapped")
        b = _model_dir(root, "b", os.urandom(200_000))  # another model carrying A's signature
        shutil.copy(a / "model.sig", b / "model.sig")
        self.b = _push(self.cli, registry, b, "sign/b")
        c = _model_dir(root, "c", os.urandom(100_000))  # unsigned: no model.sig
        (c / "Modelfile").write_text(MODELFILE.replace("DOC model.sig\n", ""))
        self.c_dir = c
        self.c = _push(self.cli, registry, c, "sign/c")

    def digest(self, ref: str) -> str:
        repository, tag = ref.split("/", 1)[1].rsplit(":", 1)
        response = httpx.head(f"http://{self.registry.address}/v2/{repository}/manifests/{tag}",
                              headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        return response.headers["docker-content-digest"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, registry) -> World:
    return World(tmp_path_factory.mktemp("signing"), registry)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("modelfs: error:")]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    return lines[0]


def test_oms_signed_model_mounts_pulls_and_extracts_under_enforce(world, mounts, tmp_path):
    """Signed with the real model-signing package, built by modelfs with model.sig in the
    Modelfile: verify names the signer, and mount, pull and extract serve it with the key."""
    key = ("--key", str(world.release_pub))
    out = world.cli.run("verify", "--plain-http", *key, world.a).stdout
    assert "ok   model.sig in the artifact: OMS model signature by key" in out and "all 3 files" in out, out
    target = mounts.mount(world.a, *key, cli=world.cli)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (target / name).read_bytes() == (world.a_dir / name).read_bytes()
    world.cli.run("pull", "--plain-http", *key, world.a)
    world.cli.run("extract", "--plain-http", *key, world.a, "-o", str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (world.a_dir / "model.safetensors").read_bytes()


@pytest.mark.parametrize("case", ["other key", "swapped weight", "A's signature on B", "unsigned"])
def test_refused_under_enforce_with_one_line_naming_the_signature(world, mounts, tmp_path, case):
    """Nothing is served or kept: mount, pull and extract all refuse, in one line saying which
    signature failed and why, and no blob reaches the cache."""
    ref, key, expected = {
        "other key": (world.a, world.other_pub, "model.sig in the artifact (Sigstore bundle): signed by a key"),
        "swapped weight": (world.swapped, world.release_pub, "model.safetensors: signed sha256:"),
        "A's signature on B": (world.b, world.release_pub, "model.safetensors: signed sha256:"),
        "unsigned": (world.c, world.release_pub, "no signature found"),
    }[case]
    cli = Cli(tmp_path / "home")
    line = _one_line_error(mounts.refused(ref, "--key", str(key), cli=cli))
    assert expected in line and "is not signed as the policy requires" in line, line
    for command in (["pull"], ["extract", "-o", str(tmp_path / "out")]):
        assert expected in _one_line_error(cli.run(*command, "--plain-http", "--key", str(key), ref, check=False))
    assert not [p for p in (cli.cache_dir / "blobs").rglob("*") if p.is_file()], "a refused model leaves no blob"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_sign_then_verify_round_trip_and_the_bundle_is_cosigns(world):
    """`modelfs sign` attaches a v0.3 bundle as a referrer (the fallback tag on Distribution
    2.8); `modelfs verify` accepts it with the public key and refuses another key. The bundle
    is parsed by sigstore's own models and its DSSE signature checked independently."""
    from sigstore_models.bundle.v1 import Bundle
    ref = world.c.replace("sign/c", "sign/c2")
    world.cli.run("tag", world.c, ref)
    world.cli.run("push", "--plain-http", ref)
    out = world.cli.run("sign", "--plain-http", ref, "--key", str(world.edkey)).stdout
    assert "Signed" in out and "Ed25519" in out
    verified = world.cli.run("verify", "--plain-http", "--key", str(world.edkey_pub), ref).stdout
    assert "ok   referrer sha256:" in verified and "cosign signature by key" in verified, verified
    line = _one_line_error(world.cli.run("verify", "--plain-http", "--key", str(world.other_pub), ref, check=False))
    assert "signed by a key" in line and "not a signer the policy names" in line
    digest = world.digest(ref)
    index = httpx.get(f"http://{world.registry.address}/v2/sign/c2/manifests/{digest.replace(':', '-')}",
                      headers={"Accept": "application/vnd.oci.image.index.v1+json"}).json()
    entry = next(m for m in index["manifests"] if m["artifactType"] == BUNDLE_TYPE)
    referrer = httpx.get(f"http://{world.registry.address}/v2/sign/c2/manifests/{entry['digest']}",
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    assert referrer["subject"]["digest"] == digest and referrer["layers"][0]["mediaType"] == BUNDLE_TYPE
    raw = httpx.get(f"http://{world.registry.address}/v2/sign/c2/blobs/{referrer['layers'][0]['digest']}").content
    bundle = Bundle.from_json(raw)
    envelope = bundle.dsse_envelope
    statement = json.loads(envelope.payload)
    assert statement["predicateType"] == "https://sigstore.dev/cosign/sign/v1"
    assert "sha256:" + statement["subject"][0]["digest"]["sha256"] == digest
    pae = b"DSSEv1 %d %s %d %s" % (len(envelope.payload_type), envelope.payload_type.encode(), len(envelope.payload),
                                   envelope.payload)
    public = serialization.load_pem_public_key(world.edkey_pub.read_bytes())
    public.verify(envelope.signatures[0].sig, pae)  # raises if it does not match


def test_keyless_vectors_verify_offline_against_their_trusted_root():
    """Real keyless bundles (Fulcio certificates, Rekor proofs) from PyPI packages' test data,
    checked offline against the trusted roots that came with sigstore: the right identity
    passes, a wrong identity or issuer fails, a changed payload fails."""
    from modelfs.signing.bundle import Identity, parse, verify_keyless
    prod = VECTORS / "pypi_attestation_models-0.0.4a2.tar.gz.sigstore"
    identity = "https://github.com/trailofbits/pypi-attestation-models/.github/workflows/release.yml@refs/tags/v0.0.4a2"
    issuer = "https://token.actions.githubusercontent.com"
    root = str(VECTORS / "trusted_root.prod.json")
    bundle = parse(prod.read_bytes())
    signed = verify_keyless(bundle, (Identity("someone@example.com", issuer), Identity(identity, issuer)), root, b"")
    assert signed.signer == f"certificate of {identity} (issuer {issuer})"
    assert b"pypi_attestation_models-0.0.4a2.tar.gz" in signed.payload
    for wrong in (Identity(identity.replace("trailofbits", "evil"), issuer), Identity(identity, "https://evil.example")):
        with pytest.raises(ValueError):
            verify_keyless(bundle, (wrong,), root, b"")
    with pytest.raises(ValueError):  # the staging one is not trusted by the production root
        staging = parse((VECTORS / "rfc8785-0.1.2-py3-none-any.whl.sigstore").read_bytes())
        verify_keyless(staging, (Identity("william@yossarian.net", "https://github.com/login/oauth"),), root, b"")
    doc = json.loads(prod.read_bytes())
    doc["dsseEnvelope"]["payload"] = base64.b64encode(signed.payload.replace(b"0.0.4a2", b"0.0.4a3")).decode()
    with pytest.raises(ValueError):
        verify_keyless(parse(json.dumps(doc).encode()), (Identity(identity, issuer),), root, b"")


def _put_blob(registry, repository: str, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    upload = httpx.post(f"http://{registry.address}/v2/{repository}/blobs/uploads/")
    location = httpx.URL(f"http://{registry.address}").join(upload.headers["location"])
    httpx.put(f"{location}&digest={digest}", content=data).raise_for_status()
    return {"digest": digest, "size": len(data)}


def _put_manifest(registry, repository: str, tag: str, doc: dict, media_type: str) -> dict:
    data = json.dumps(doc).encode()
    httpx.put(f"http://{registry.address}/v2/{repository}/manifests/{tag}", content=data,
              headers={"Content-Type": media_type}).raise_for_status()
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}


def _attach(registry, repository: str, subject: str, blobs: list[tuple[bytes, str]]) -> None:
    """Referrers of ``subject``, each (blob, artifact type), listed in the fallback tag (Distribution 2.8)."""
    empty = {"mediaType": "application/vnd.oci.empty.v1+json", **_put_blob(registry, repository, b"{}")}
    entries = []
    for number, (data, kind) in enumerate(blobs):
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "artifactType": kind,
               "config": empty, "layers": [{"mediaType": kind, **_put_blob(registry, repository, data)}],
               "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": 1},
               "annotations": {"n": str(number)}}
        entries.append({**_put_manifest(registry, repository, f"r{number}", doc, doc["mediaType"]), "artifactType": kind})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    _put_manifest(registry, repository, subject.replace(":", "-"), index, index["mediaType"])


def _legacy_sig(world, repository: str, signed_digest: str) -> None:
    """cosign's legacy `sha256-<hex>.sig` tag on ``repository``'s model, its payload naming ``signed_digest``."""
    from modelfs.signing.keys import load_private
    subject = world.digest(f"{world.registry.address}/{repository}:v1")
    payload = json.dumps({"critical": {"identity": {"docker-reference": repository},
                                       "image": {"docker-manifest-digest": signed_digest},
                                       "type": "cosign container image signature"}, "optional": None}).encode()
    signature = base64.b64encode(load_private(str(world.release)).sign(payload)).decode()
    layer = {"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
             **_put_blob(world.registry, repository, payload),
             "annotations": {"dev.cosignproject.cosign/signature": signature}}
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", **_put_blob(world.registry, repository, b"{}")}
    _put_manifest(world.registry, repository, subject.replace(":", "-") + ".sig",
                  {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config,
                   "layers": [layer]}, "application/vnd.oci.image.manifest.v1+json")


def test_legacy_sig_tag_is_read_and_one_pointing_elsewhere_refused(world, tmp_path):
    """Both repositories hold model C's manifest; each its own .sig tag. (A fresh cache for the
    second check: the first's recorded verdict is about the same digest, rightly reused.)"""
    for name, target in (("sign/legacy-ok", None), ("sign/legacy-replay", world.digest(world.a))):
        ref = f"{world.registry.address}/{name}:v1"
        world.cli.run("tag", world.c, ref)
        world.cli.run("push", "--plain-http", ref)
        _legacy_sig(world, name, target or world.digest(ref))
    out = world.cli.run("verify", "--plain-http", "--key", str(world.release_pub),
                        f"{world.registry.address}/sign/legacy-ok:v1").stdout
    assert "ok   .sig tag, signature 1: cosign legacy signature by key" in out, out
    line = _one_line_error(Cli(tmp_path / "home").run("verify", "--plain-http", "--key", str(world.release_pub),
                                                      f"{world.registry.address}/sign/legacy-replay:v1", check=False))
    assert f".sig tag, signature 1 (cosign legacy signature): signs {world.digest(world.a)[:19]}…, not this" in line


def test_hostile_signatures_each_refused_naming_which_and_why(world):
    """A referrer that is not a signature, a bundle nested too deep, one too big, a notation
    signature (not read), a real keyless bundle of something else (a replay): each is one
    FAIL line with its reason, and the model is refused."""
    ref = f"{world.registry.address}/sign/hostile:v1"
    world.cli.run("tag", world.c, ref)
    world.cli.run("push", "--plain-http", ref)
    deep = b'{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","x":' + b"[" * 100 + b"]" * 100 + b"}"
    _attach(world.registry, "sign/hostile", world.digest(ref), [
        (b'{"hello": "not a bundle"}', BUNDLE_TYPE), (deep, BUNDLE_TYPE), (b" " * (17 << 20), BUNDLE_TYPE),
        (b"{}", "application/vnd.cncf.notary.signature"),
        ((VECTORS / "pypi_attestation_models-0.0.4a2.tar.gz.sigstore").read_bytes(), BUNDLE_TYPE),
        (b"{}", "application/vnd.example.sbom")])
    identity = "https://github.com/trailofbits/pypi-attestation-models/.github/workflows/release.yml@refs/tags/v0.0.4a2"
    result = world.cli.run("verify", "--plain-http", "--key", str(world.release_pub), "--certificate-identity", identity,
                           "--certificate-oidc-issuer", "https://token.actions.githubusercontent.com",
                           "--trusted-root", str(VECTORS / "trusted_root.prod.json"), ref, check=False)
    _one_line_error(result)
    fails = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("FAIL")]
    assert len(fails) == 5, result.stdout  # the SBOM referrer is no signature and is not listed
    expected = ["is not a Sigstore bundle", "nests deeper than 32 levels", "larger than 16777216 bytes",
                "Notary Project (notation) signature: modelfs does not read these",
                "an attestation of type 'https://docs.pypi.org/attestations/publish/v1', not a signature"]
    for reason in expected:
        assert any(reason in line for line in fails), (reason, fails)
    assert any("by certificate of " + identity in line for line in fails), "the keyless signer was verified first"


def test_warn_serves_and_says_so_everywhere(world, mounts, tmp_path):
    """Under warn an unsigned model mounts, and the terminal, the daemon's log, `status` and
    the host metrics say it is unsigned."""
    cli = Cli(tmp_path / "home")  # model C's digest is signed in other tests' repositories, recorded in theirs
    target = mounts.base / "warn"
    target.mkdir(parents=True)
    mounted = cli.run("mount", "--plain-http", "--signatures", "warn", "--key", str(world.release_pub), world.c,
                            str(target))
    mounts.active.append(target)
    assert "warning: signatures = warn: NOT signed as the policy requires: no signature found" in mounted.stderr
    assert daemon_pid(mounted.stdout) > 0
    assert (target / "config.json").read_bytes() == (world.c_dir / "config.json").read_bytes()
    status = cli.run("status").stdout
    assert f"{target}:" in status and "UNSIGNED: NOT signed as the policy requires: no signature found" in status
    metrics = cli.run("metrics").stdout
    assert any(line.startswith("modelfs_mount_signatures_met{") and str(target) in line and line.endswith(" 0")
               for line in metrics.splitlines()), metrics
    log = Path(daemon_log_path(str(cli.cache_dir), str(target))).read_text()
    assert "signatures = warn: serving" in log


def test_lazy_under_enforce_reads_no_weight_to_verify_and_one_mib_to_read_one(world, mounts, tmp_path):
    """A 96 MiB weight signed by model-signing (OMS files, sha256) and its manifest by
    `modelfs sign`: verify plus mount plus reading its first MiB fetch under 32 MiB, counted at
    the registry (a whole fetch is three times that). Verifying the OMS statement alone reads
    no weight byte at all. (96 MiB of zeros: sparse, fast to make, and as costly to fetch as
    any other bytes; 256 MiB cost 2-3 s more of hashing and pushing for no other check.)"""
    directory = tmp_path / "big"
    directory.mkdir()
    (directory / "config.json").write_text('{"big": true}')
    with open(directory / "model.safetensors", "wb") as handle:
        handle.truncate(96 << 20)
    (directory / "Modelfile").write_text("NAME big\nCONFIG config.json\nMODEL model.safetensors\nDOC model.sig\n")
    _oms_sign(directory, world.release)
    ref = _push(world.cli, world.registry, directory, "sign/big")
    proxy = CountingProxy(world.registry.port)
    try:
        via_proxy = ref.replace(world.registry.address, proxy.address)
        key = ("--key", str(world.release_pub))
        verified = world.cli.run("verify", "--plain-http", *key, via_proxy).stdout
        assert "OMS model signature by key" in verified
        assert proxy.downstream_bytes < 1 << 20, proxy.downstream_bytes  # no weight byte: only manifest and model.sig
        world.cli.run("sign", "--plain-http", ref, "--key", str(world.release))
        proxy.reset()
        cli = Cli(tmp_path / "home")
        cli.run("verify", "--plain-http", *key, via_proxy)
        target = mounts.mount(via_proxy, *key, "--prefetch", "none", cli=cli)
        with open(target / "model.safetensors", "rb") as handle:
            assert handle.read(1 << 20) == bytes(1 << 20)
        assert proxy.downstream_bytes < 32 << 20, proxy.downstream_bytes
    finally:
        proxy.close()


def test_file_only_signature_never_vouches_for_the_block_index():
    """Under enforce, a verdict resting on an OMS statement (each layer's digest, not the
    manifest) drops the manifest's block index: a re-pushed manifest could name a forged
    index for the same signed layers. A signature of the manifest keeps it; an index
    attached as a referrer is covered by no signature and is dropped."""
    from modelfs.formats.blockindex import BlockIndex, TrustedIndex
    from modelfs.signing import Policy, gate_index
    from modelfs.signing.statement import Coverage
    from modelfs.signing.verdict import Finding, Verdict
    named, attached = TrustedIndex(BlockIndex(1 << 20, {}), vouched=True), TrustedIndex(BlockIndex(1 << 20, {}), False)
    files = Finding("model.sig", "OMS model signature", "key k", Coverage(files_signed=3))
    manifest = Finding("referrer", "cosign signature", "key k", Coverage(covers_manifest=True))
    for mode, finding, index, kept in (("enforce", files, named, False), ("enforce", manifest, named, True),
                                       ("enforce", manifest, attached, False), ("warn", files, named, True)):
        verdict = Verdict("ref", Policy(mode), [finding])
        assert verdict.met
        assert (gate_index(verdict, index) is index) is kept, (mode, finding.what, index.vouched)


def test_offline_remount_needs_no_network_and_a_changed_policy_checks_again(world, mounts, tmp_path):
    """The verdict is recorded with the model: a remount while the registry cannot be reached
    checks the recorded signature again (no network); another policy (one more key) has no
    verdict to reuse and is refused offline."""
    proxy = CountingProxy(world.registry.port)
    cli = Cli(tmp_path / "home")
    via_proxy = world.a.replace(world.registry.address, proxy.address)
    key = ("--key", str(world.release_pub))
    try:
        mounts.umount(mounts.mount(via_proxy, *key, cli=cli))
    finally:
        proxy._server.shutdown(socket.SHUT_RDWR)  # wakes its accept(): the port refuses from now on
        proxy.close()
    target = mounts.base / "offline"
    target.mkdir()
    result = cli.run("mount", "--plain-http", *key, via_proxy, str(target))
    mounts.active.append(target)
    assert "warning: offline" in result.stderr
    assert (target / "config.json").read_bytes() == (world.a_dir / "config.json").read_bytes()
    refused = mounts.refused(via_proxy, *key, "--key", str(world.other_pub), cli=cli)
    assert "cannot check its signatures: the registry cannot be reached and no verdict was recorded for this policy" \
        in _one_line_error(refused)


def test_csi_publish_under_the_node_policy(world, tmp_path):
    """The node's config names the policy for a registry scope: a signed model is published,
    an unsigned one refused with PERMISSION_DENIED naming why, and a pod cannot turn it off."""
    import grpc
    from csi_plugin import Plugin
    config = tmp_path / "config.toml"
    config.write_text(f'[trust."{world.registry.address}/sign"]\nsignatures = "enforce"\n'
                      f'key = ["{world.release_pub}"]\n')
    plugin = Plugin(tmp_path / "node", dict(world.cli.env, MODELFS_CONFIG=str(config)))
    plugin.start()
    try:
        target = plugin.target()
        plugin.client.publish("vol-signed", target, {"reference": world.a, "plain_http": "true"})
        assert (target / "config.json").read_bytes() == (world.a_dir / "config.json").read_bytes()
        for attributes, code, message in (
                ({"reference": world.c, "plain_http": "true"}, grpc.StatusCode.PERMISSION_DENIED,
                 "is not signed as the policy requires"),
                ({"reference": world.c, "plain_http": "true", "signatures": "off"}, grpc.StatusCode.INVALID_ARGUMENT,
                 "unknown key 'signatures'")):
            with pytest.raises(grpc.RpcError) as refused:
                plugin.client.publish("vol-unsigned", plugin.target("other"), attributes)
            assert refused.value.code() == code and message in refused.value.details(), refused.value.details()
        plugin.client.unpublish("vol-signed", target)
    finally:
        plugin.cleanup()


def test_policy_per_repository_scope_flags_first_and_clear_mistakes(tmp_path):
    """[trust."registry/repository"]: the longest scope containing the reference wins, cut at a
    '/'; a flag wins over it; giving a key means enforce; mistakes are one line each."""
    from modelfs.config import load
    from modelfs.reference import parse
    from modelfs.settings import ConfigError
    from modelfs.signing import build
    _, release = _write_key(tmp_path, "release", ec.generate_private_key(ec.SECP384R1()))
    _, team = _write_key(tmp_path, "team", ed25519.Ed25519PrivateKey.generate())
    path = tmp_path / "config.toml"
    path.write_text(f'signatures = "warn"\nkey = ["{team}"]\n'
                    f'[trust."reg.example"]\nsignatures = "enforce"\nkey = "{release}"\n'
                    f'[trust."reg.example/org/llama"]\nsignatures = "off"\n')
    config = load([str(path)])
    policy = build({}, config, parse("reg.example/org/llama-2:v1"))  # not org/llama: the cut is at '/'
    assert (policy.mode, policy.scope, [k.algorithm for k in policy.keys]) == ("enforce", "reg.example", ["ECDSA P-384"])
    assert build({}, config, parse("reg.example/org/llama/8b:v1")).mode == "off"
    assert build({}, config, parse("other.example/x:v1")).mode == "warn"
    flagged = build({"signatures": "enforce", "key": [str(team), str(release)]}, config, parse("reg.example/org/llama:v1"))
    assert (flagged.mode, len(flagged.keys)) == ("enforce", 2)
    assert build({"key": [str(team)]}, load([]), parse("r.example/m:v1")).mode == "enforce"
    assert flagged.fingerprint() != policy.fingerprint()
    for given, message in (({"signatures": "enforce"}, "needs a key or a certificate identity"),
                           ({"certificate_identity": ["ci@example.com"]}, "needs --certificate-oidc-issuer"),
                           ({"certificate_identity": ["ci@example.com"], "certificate_oidc_issuer": "https://i.example"},
                            "give --trusted-root FILE"),
                           ({"key": [str(tmp_path / "missing.pub")]}, "cannot read key"),
                           ({"key": [str(tmp_path / "release.pem")]}, "not a PEM public key")):
        with pytest.raises(ConfigError, match=message):
            build(given, load([]), parse("r.example/m:v1"))
    path.write_text('[trust."reg.example"]\nkeys = []\n')
    with pytest.raises(ConfigError, match="unknown key 'keys'"):
        load([str(path)])


def test_bounded_reading_of_hostile_documents():
    from modelfs.signing.bounded import Malformed, load
    from modelfs.signing.bundle import parse
    with pytest.raises(Malformed, match="nests deeper than 32"):
        load(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", "bundle")
    with pytest.raises(Malformed, match="over the 16,777,216-byte limit"):
        load(b" " * ((16 << 20) + 1), "bundle")
    bundle = {"mediaType": BUNDLE_TYPE, "verificationMaterial": {"publicKey": {"hint": "x"}},
              "dsseEnvelope": {"payload": "e30=", "payloadType": "application/vnd.in-toto+json",
                               "signatures": [{"sig": "AA=="}, {"sig": "AA=="}]}}
    with pytest.raises(Malformed, match="exactly one signature"):
        parse(json.dumps(bundle).encode())
