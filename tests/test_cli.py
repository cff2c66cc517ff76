"""The foundation end to end, through the real CLI, against a real Distribution registry."""

import filecmp
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import SAMPLE_MODELFILE
from trees import assert_same_tree


def test_build_push_inspect_extract_round_trip(cli, registry, minilm_dir, tmp_path):
    ref = f"{registry.address}/roundtrip/minilm:v1"
    built = cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(minilm_dir))
    assert "13 layers" in built.stdout
    pushed = cli.run("push", "--plain-http", ref)
    assert "15 blobs uploaded" in pushed.stdout  # 13 layers, the config and the block index

    inspected = json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)
    assert inspected["manifest"]["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert inspected["manifest"]["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    assert inspected["config"]["descriptor"]["name"] == "all-minilm-l6-v2"
    assert inspected["config"]["config"]["format"] == "safetensors"
    weights = [layer for layer in inspected["manifest"]["layers"] if layer["annotations"]["org.cncf.model.filepath"] == "model.safetensors"]
    assert weights[0]["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert json.loads(weights[0]["annotations"]["org.cncf.model.file.metadata+json"])["size"] == 90868376
    assert inspected["config"]["modelfs"]["diffIds"] == [layer["digest"] for layer in inspected["manifest"]["layers"]]
    assert inspected["manifest"]["annotations"]["dev.modelfs.block-index"].startswith("sha256:")  # the index, vouched for

    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    assert_same_tree(out, minilm_dir)


def test_build_writes_an_oci_layout_skopeo_can_copy(cli, registry, minilm_dir, tmp_path):
    ref = f"{registry.address}/layout/minilm:v1"
    built = cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(minilm_dir)).stdout
    digest = built.strip().rsplit(" ", 1)[1]
    store = cli.home / "store"
    assert json.loads((store / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    # an independent OCI tool reads the layout and pushes it; modelfs then reads what skopeo pushed
    copied = f"{registry.address}/skopeo/minilm:v1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{store}:{ref}", f"docker://{copied}"],
                   check=True, capture_output=True)
    inspected = json.loads(cli.run("inspect", "--plain-http", "--json", copied).stdout)
    assert inspected["digest"] == digest
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", copied, "--output", str(out))
    assert_same_tree(out, minilm_dir)


def test_repush_after_config_edit_uploads_only_what_changed(cli, registry, minilm_dir, tmp_path):
    context = tmp_path / "ctx"
    shutil.copytree(minilm_dir, context)
    ref = f"{registry.address}/repush/minilm:v1"
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(context))
    cli.run("push", "--plain-http", ref)
    config = json.loads((context / "config.json").read_text())
    config["modelfs_edit"] = True
    (context / "config.json").write_text(json.dumps(config))
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(context))
    again = cli.run("push", "--plain-http", ref).stdout
    new_config_size = (context / "config.json").stat().st_size
    # config.json's layer and the model config blob, nothing else; the 90 MB weights are skipped
    # config.json's layer, the config and the block index (one of its blocks' hashes changed)
    assert "3 blobs uploaded" in again and "12 already present" in again, again
    uploaded_mb = float(again.split("(")[1].split(" MB")[0])
    assert uploaded_mb < 0.01 + new_config_size / 1e6


def test_chunked_push_round_trips(cli, registry, minilm_dir, tmp_path):
    ref = f"{registry.address}/chunked/minilm:v1"
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(minilm_dir))
    pushed = cli.run("push", "--plain-http", "--chunk-size", "8", ref).stdout
    assert "1 in chunks" in pushed, pushed  # only the 90 MB weights exceed 8 MiB
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    assert filecmp.cmp(out / "model.safetensors", minilm_dir / "model.safetensors", shallow=False)


def test_push_to_second_repository_mounts_blobs(cli, registry, minilm_dir):
    first = f"{registry.address}/mountsrc/minilm:v1"
    second = f"{registry.address}/mountdst/minilm:v1"
    cli.run("build", "-t", first, "-f", str(SAMPLE_MODELFILE), str(minilm_dir))
    cli.run("push", "--plain-http", first)
    cli.run("build", "-t", second, "-f", str(SAMPLE_MODELFILE), str(minilm_dir))
    result = cli.run("push", "--plain-http", second).stdout
    # the 13 file layers are linked from the first repository; only the new config blob goes up
    assert "1 blobs uploaded" in result and "14 mounted" in result, result  # 13 layers and the block index


def test_oras_pulls_identical_files(cli, minilm_ref, minilm_dir, tmp_path, registry):
    import oras.client
    client = oras.client.OrasClient(hostname=registry.address, insecure=True)
    out = tmp_path / "oras"
    (out / "1_Pooling").mkdir(parents=True)
    client.pull(target=minilm_ref, outdir=str(out))
    assert_same_tree(out, minilm_dir)


def test_basic_auth_login_and_wrong_password(cli, basic_registry, small_minilm):
    ref = f"{basic_registry.address}/private/minilm:v1"
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
    denied = cli.run("push", "--plain-http", ref, check=False)
    assert denied.returncode == 1
    assert denied.stderr.strip().splitlines() == [f"modelfs: error: {basic_registry.address} requires authentication: run `modelfs login {basic_registry.address}`"]

    wrong = cli.run("login", "--plain-http", basic_registry.address, "-u", "alice", "--password-stdin", input="nope\n", check=False)
    assert wrong.returncode == 1 and "rejected" in wrong.stderr and "nope" not in wrong.stderr
    assert "Traceback" not in wrong.stderr

    cli.run("login", "--plain-http", basic_registry.address, "-u", "alice", "--password-stdin", input="s3cret-pass\n")
    auth_file = cli.home / "config" / "modelfs" / "auth.json"
    assert oct(auth_file.stat().st_mode & 0o777) == "0o600"
    cli.run("push", "--plain-http", ref)
    assert "all-minilm" in cli.run("inspect", "--plain-http", ref).stdout
    cli.run("logout", basic_registry.address)
    assert cli.run("inspect", "--plain-http", ref, check=False).returncode == 1


def test_token_auth_login_push_and_anonymous_pull(cli, token_registry, small_minilm, tmp_path):
    ref = f"{token_registry.address}/public/minilm:v1"
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
    anonymous_push = cli.run("push", "--plain-http", ref, check=False)
    assert anonymous_push.returncode == 1 and "modelfs: error:" in anonymous_push.stderr
    wrong = cli.run("login", "--plain-http", token_registry.address, "-u", "alice", "-p", "wrong", check=False)
    assert wrong.returncode == 1 and "rejected the credentials of 'alice'" in wrong.stderr
    cli.run("login", "--plain-http", token_registry.address, "-u", "alice", "--password-stdin", input="s3cret-pass\n")
    cli.run("push", "--plain-http", ref)
    cli.run("logout", token_registry.address)
    # anonymous tokens may pull public/*: extract works without credentials
    out = tmp_path / "anon"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    assert (out / "model.safetensors").read_bytes() == (small_minilm / "model.safetensors").read_bytes()
    logs = (token_registry.root / "registry.log").read_text()
    assert all(token not in logs for token in token_registry.issuer.issued)


def test_docker_config_credentials_are_used(cli, basic_registry, small_minilm):
    import base64
    ref = f"{basic_registry.address}/dockercfg/minilm:v1"
    docker = cli.home / "docker"
    docker.mkdir(parents=True)
    token = base64.b64encode(b"alice:s3cret-pass").decode()
    (docker / "config.json").write_text(json.dumps({"auths": {basic_registry.address: {"auth": token}}}))
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
    cli.run("push", "--plain-http", ref)


def test_docker_credential_helpers_and_store_are_used(cli, basic_registry, small_minilm, tmp_path):
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-modelfstest"
    helper.write_text(f"#!/bin/sh\nread host\n[ \"$1\" = get ] && [ \"$host\" = \"{basic_registry.address}\" ] || exit 1\n"
                      "echo '{\"ServerURL\":\"'$host'\",\"Username\":\"alice\",\"Secret\":\"s3cret-pass\"}'\n")
    helper.chmod(0o755)
    docker = cli.home / "docker"
    docker.mkdir(parents=True)
    (docker / "config.json").write_text(json.dumps({"credHelpers": {basic_registry.address: "modelfstest"}}))
    cli.env["PATH"] = f"{helper_dir}:{cli.env['PATH']}"
    ref = f"{basic_registry.address}/helper/minilm:v1"
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
    cli.run("push", "--plain-http", ref)
    # the default store (credsStore) answers for registries without a helper of their own
    (docker / "config.json").write_text(json.dumps({"credsStore": "modelfstest"}))
    assert json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)["manifest"]["layers"]
    (docker / "config.json").write_text(json.dumps({"credsStore": "modelfstest", "credHelpers": {basic_registry.address: "absent"}}))
    missing = cli.run("inspect", "--plain-http", ref, check=False)
    assert missing.returncode == 1 and "docker-credential-absent" in missing.stderr and "is not installed" in missing.stderr


@pytest.mark.parametrize("args, message", [
    (["inspect", "--plain-http", "Bad/Ref:1"], "repository component"),
    (["inspect", "--plain-http", "{registry}/demo/minilm:missing"], "not found"),
    (["inspect", "--plain-http", "{registry}/nosuch/repo:v1"], "not found"),
    (["push", "--plain-http", "{registry}/never/built:v1"], "is not in the local store"),
    (["inspect", "127.0.0.1:1/x:y", "--plain-http"], "cannot reach 127.0.0.1:1: connection refused"),
    (["inspect", "--plain-http", "registry.invalid/x:y"], "cannot reach registry.invalid: unknown host"),
    (["inspect", "{registry}/demo/minilm:v1"], "speaks plain HTTP, not HTTPS: add --plain-http"),
    (["mount", "--cache-max-size", "10Q", "{registry}/demo/minilm:v1", "/tmp"], "--cache-max-size: '10Q' is not a size"),
    (["cache", "prune", "--keep-size", "10Q"], "--keep-size: '10Q' is not a size"),
    (["mount", "--workers", "-3", "{registry}/demo/minilm:v1", "/tmp"], "--workers must be a whole number"),
    (["extract", "--plain-http", "{registry}/demo/minilm:v1", "--output", "{file}"], "is a file; name a directory"),
    (["login", "{registry}", "-u", "alice"], "no terminal to ask for the password on: pipe it in with --password-stdin"),
    (["pull", "--plain-http", "--cache-dir", "{file}", "{registry}/demo/minilm:v1"], "is not a directory"),
    (["mount", "--uid", "4294967296", "{registry}/demo/minilm:v1", "/tmp"], "--uid: '4294967296' is not a user id"),
    (["{registry}/demo/minilm:v1", "/tmp", "-o", "ro,uid=\u00b2"], "-o uid: '\u00b2' is not a user id"),
    (["push", "--chunk-size", "-1", "{registry}/never/built:v1"], "--chunk-size must be a whole number from 1"),
    (["ls", "--store", "{file}"], "local store {file} is not a directory (choose another with --store)"),
])
def test_bad_input_gives_one_line_errors(cli, registry, minilm_ref, tmp_path, args, message):
    """A mistake is one line that names the cause and the fix, at once: no traceback, and no
    minute of retries for a refused connection, an unknown host or a missing --plain-http."""
    (tmp_path / "a-file").write_text("x")
    started = time.monotonic()
    result = cli.run(*[a.format(registry=registry.address, file=tmp_path / "a-file") for a in args], check=False,
                     input="")
    assert result.returncode in (1, 2)
    lines = result.stderr.strip().splitlines()
    message = message.format(file=tmp_path / "a-file")
    assert len(lines) == 1 and lines[0].startswith("modelfs: error: ") and message in lines[0], result.stderr
    assert time.monotonic() - started < 3


def test_plain_http_against_a_tls_registry_says_it_speaks_tls(cli, tmp_path):
    from test_security import make_tls_registry
    registry = make_tls_registry(tmp_path / "tls")
    try:
        result = cli.run("inspect", "--plain-http", f"{registry.address}/x/y:z", check=False)
    finally:
        registry.stop()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "speaks HTTPS (TLS), not plain HTTP: drop --plain-http" in lines[0]


def test_cache_stats_into_a_closed_pipe_is_quiet(cli, minilm_ref):
    cli.run("pull", "--plain-http", minilm_ref)
    command = [sys.executable, "-m", "modelfs", "cache", "stats"]
    shell = subprocess.run(f"{' '.join(command)} | head -1", shell=True, env=cli.env, capture_output=True, text=True,
                           timeout=60)
    assert shell.stdout.startswith("Cache ") and shell.stderr == ""


def test_ctrl_c_during_pull_is_one_line(cli, minilm_ref, faulty, registry):
    faulty.stall_seconds = 30
    faulty.persistent = "stall"
    process = subprocess.Popen([sys.executable, "-m", "modelfs", "pull", "--plain-http",
                                minilm_ref.replace(registry.address, faulty.address)],
                               env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not faulty.injected["stall"]:  # the pull is waiting on a stalled blob: mid-pull
        assert time.monotonic() < deadline and process.poll() is None, "the pull never reached a blob"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("modelfs: error: pull of ") and "stopped (SIGINT, Ctrl-C); nothing is recorded" in line
    assert "Traceback" not in stderr


def test_container_image_is_refused_clearly(cli, registry):
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    import hashlib
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    base = f"http://{registry.address}/v2/images/busybox"
    upload = httpx.post(f"{base}/blobs/uploads/")
    location = httpx.URL(f"http://{registry.address}").join(upload.headers["location"])
    httpx.put(f"{location}&digest={digest}", content=config).raise_for_status()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest, "size": len(config)},
                "layers": []}
    httpx.put(f"{base}/manifests/latest", json=manifest,
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()
    for command in (["inspect"], ["extract", "--output", str(cli.home / "x")], ["pull"]):
        result = cli.run(command[0], "--plain-http", f"{registry.address}/images/busybox:latest", *command[1:], check=False)
        assert result.returncode == 1
        assert result.stderr.strip() == (f"modelfs: error: {registry.address}/images/busybox:latest is a container image "
                                         "(application/vnd.oci.image.config.v1+json), not a ModelPack model")


def test_pull_fills_the_cache(cli, minilm_ref):
    result = cli.run("pull", "--plain-http", minilm_ref)
    assert "Pulled" in result.stdout
    data_files = list((cli.cache_dir / "blobs" / "sha256").glob("*.map"))
    assert len(data_files) == 13


def test_pull_gives_up_within_the_configs_timeout_as_a_mount_does(cli, registry, faulty):
    """`pull` builds its fetcher from the resolved settings, as a mount does: with `timeout = 1`
    in the config, a registry that stalls for 6 s on the blob makes the pull fail after about a
    second, in one line (pull used the default policy: it waited out the stall, up to 120 s)."""
    import hashlib

    from conftest import push_artifact
    data = os.urandom(4 << 20)
    digest = hashlib.sha256(data).hexdigest()
    ref = push_artifact(registry.address, "pull/stalled", [
        (data, "application/vnd.cncf.model.weight.v1.raw", {"org.cncf.model.filepath": "w.bin"})])
    (cli.home / "config" / "modelfs").mkdir(parents=True)
    (cli.home / "config" / "modelfs" / "config.toml").write_text("timeout = 1\n")
    faulty.only, faulty.stall_seconds, faulty.persistent = digest, 6, "stall"
    started = time.monotonic()
    result = cli.run("pull", "--plain-http", ref.replace(registry.address, faulty.address), check=False, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and faulty.injected["stall"] >= 1
    assert result.stderr.strip().startswith("modelfs: error: timed out after 1s") and "\n" not in result.stderr.strip()
    assert elapsed < faulty.stall_seconds - 1, f"pull took {elapsed:.1f}s: it waited for the stall, not the config's 1 s"


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_load_neither_the_mount_nor_the_csi_plugin(flag):
    """`modelfs --help` starts at once: the parser imports no command's machinery (the mount's
    data path, pyfuse3, the CSI plugin's gRPC, the registry client's httpx and trio). Before,
    every command imported everything: 0.26-0.42 s for --version here, now 0.05-0.10 s."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "modelfs", flag], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(name for name in loaded if name.split(".")[0] in ("pyfuse3", "grpc", "httpx", "trio")
                   or name.startswith(("modelfs.mount", "modelfs.csi", "modelfs.registry", "modelfs.compose")))
    assert heavy == []


def test_mount_point_mistakes_are_named(cli, minilm_ref, tmp_path, mounts):
    missing = cli.run("mount", "--plain-http", minilm_ref, str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 1 and missing.stderr.strip() == (
        f"modelfs: error: mount point {tmp_path / 'nowhere'} does not exist (create it: mkdir -p {tmp_path / 'nowhere'})")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    refused = cli.run("mount", "--plain-http", minilm_ref, str(occupied), check=False)
    assert refused.returncode == 1 and "is not empty: the mount would hide its files" in refused.stderr
    cli.run("mount", "--plain-http", "--prefetch", "none", "--allow-nonempty", minilm_ref, str(occupied))
    mounts.active.append(occupied)
    assert "config.json" in os.listdir(occupied) and "notes.txt" not in os.listdir(occupied)
    mounts.umount(occupied)
    assert (occupied / "notes.txt").read_text() == "mine"


def test_progress_lines_report_what_moved_not_what_was_already_there(cli, registry, small_minilm, tmp_path):
    ref = f"{registry.address}/progress/minilm:v1"
    cli.run("build", "-t", ref, "-f", str(SAMPLE_MODELFILE), str(small_minilm))
    pushed = cli.run("push", "--plain-http", ref)
    assert re.search(rf"push {re.escape(ref)}: [0-9.,]+ MB in [0-9.]+s \([0-9,]+ MB/s\)", pushed.stderr), pushed.stderr
    again = cli.run("push", "--plain-http", ref)
    assert f"push {ref}: all " in again.stderr and "already there" in again.stderr
    cli.run("pull", "--plain-http", ref)
    warm = cli.run("pull", "--plain-http", ref)
    assert f"pull {ref}: all " in warm.stderr and "MB/s" not in warm.stderr  # no "198,390 MB/s" for a warm pull


def test_the_local_store_has_a_lifecycle_ls_tag_rm(cli, registry, minilm_dir, tmp_path):
    first = f"{registry.address}/store/minilm:v1"
    cli.run("build", "-t", first, "-f", str(SAMPLE_MODELFILE), str(minilm_dir))
    second_context = tmp_path / "second"
    shutil.copytree(minilm_dir, second_context)
    (second_context / "config.json").write_text('{"edited": true}')
    second = f"{registry.address}/store/minilm:v2"
    cli.run("build", "-t", second, "-f", str(SAMPLE_MODELFILE), str(second_context))
    listed = {m["reference"]: m for m in json.loads(cli.run("ls", "--json").stdout)}
    assert set(listed) == {first, second} and listed[first]["size"] > 80e6
    assert first in cli.run("ls").stdout

    renamed = f"{registry.address}/store/minilm:stable"
    cli.run("tag", first, renamed)
    cli.run("push", "--plain-http", renamed)  # a tag is a model like any other
    assert json.loads(cli.run("inspect", "--plain-http", "--json", renamed).stdout)["digest"] == listed[first]["digest"]

    def store_bytes() -> int:
        return sum(p.stat().st_size for p in (cli.home / "store" / "blobs").rglob("*") if p.is_file())

    before = store_bytes()
    removed = cli.run("rm", first, renamed)
    assert "Untagged" in removed.stdout and "Deleted" in removed.stdout
    assert [m["reference"] for m in json.loads(cli.run("ls", "--json").stdout)] == [second]
    # only what v1 alone needed went: the weights v2 shares stay, and v2 still pushes whole
    assert 0 < before - store_bytes() < 10e6
    cli.run("push", "--plain-http", second)
    missing = cli.run("rm", first, check=False)
    assert missing.returncode == 1 and "is not in the local store" in missing.stderr


def test_cache_prune_all_forgets_the_model_records_too(cli, minilm_ref):
    cli.run("pull", "--plain-http", minilm_ref)
    assert json.loads(cli.run("cache", "stats", "--json").stdout)["models"]
    pruned = cli.run("cache", "prune", "--all")
    assert "forgot 1 model records" in pruned.stdout
    assert json.loads(cli.run("cache", "stats", "--json").stdout)["models"] == []


def test_inspect_labels_never_touch_their_values(cli, minilm_ref):
    out = cli.run("inspect", "--plain-http", minilm_ref).stdout
    header = out.split("\nLayers")[0].splitlines()
    assert "Architecture" in out and len(header) >= 6
    for line in header:
        assert re.fullmatch(r"[A-Z][a-z]+(?: [a-z]+)?:  +\S.*", line), line  # two spaces at least after the label
    assert len({len(re.match(r"[^:]+: +", line).group()) for line in header}) == 1, header  # one column
    assert next(line for line in header if line.startswith("Architecture:")).split() == ["Architecture:", "transformer"]


def test_label_column_fits_any_label():
    from modelfs.commands.output import label_column
    lines = label_column([("Reference", "r"), ("A label wider than any column was", "v"), ("X", "")])
    assert lines == ["Reference:" + " " * 26 + "r", "A label wider than any column was:  v", "X:" + " " * 34]


def _with_cache_dir(args: list[str], cache_dir) -> list[str]:
    """``args`` with --cache-dir after the command's own words (it is each command's flag)."""
    words = 2 if args[0] == "cache" else 1
    return [*args[:words], "--cache-dir", str(cache_dir), *args[words:]]


def test_a_cache_dir_that_is_a_file_or_read_only_is_one_line(cli, minilm_ref, tmp_path, tiny_tmpfs):
    """The mount created its log directory before anything looked at the cache directory: a
    traceback. Each command that uses it checks it first, one way, and says what is wrong
    (the commands run at once: 2 s, not 6)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)  # as root, mode bits would not stop us
    (tmp_path / "mnt").mkdir()
    writers = [["mount", "--plain-http", minilm_ref, str(tmp_path / "mnt")], ["pull", "--plain-http", minilm_ref],
               ["cache", "prune", "--all"], ["csi", "--endpoint", f"unix://{tmp_path}/csi.sock", "--state-dir",
                                            str(tmp_path / "state")]]
    readers = [["inspect", "--plain-http", minilm_ref]]  # extract and cache stats declare it the same way
    cases = [(_with_cache_dir(args, a_file), f"cache directory {a_file} is not a directory") for args in writers + readers]
    cases += [(_with_cache_dir(args, tiny_tmpfs), f"cache directory {tiny_tmpfs} is not writable: Read-only file system")
              for args in writers]
    running = [(subprocess.Popen([sys.executable, "-m", "modelfs", *args], env=cli.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True), args, message) for args, message in cases]
    for process, args, message in running:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1 and stderr.strip() == f"modelfs: error: {message} (choose another with --cache-dir)", (
            args, stderr)
    assert not os.path.ismount(tmp_path / "mnt") and not (tmp_path / "state").exists()
    # a cache only read may be read-only (here: empty), and is no reason to refuse
    assert "transformer" in cli.run(*_with_cache_dir(["inspect", "--plain-http", minilm_ref], tiny_tmpfs)).stdout
