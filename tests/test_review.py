"""Hostile review of issue 21's fixes, one step beside each (a failing test is a finding)."""

import os
import tarfile

from conftest import make_tar, push_artifact

WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"


def test_review_extract_second_model_symlink_through_first_models_link_escapes(cli, registry, tmp_path):
    """Item 5, one step beside: the tree check sees one model, but --output is merged into.
    Model A holds `a/b/d -> ..` (inside: it is `a`). Model B holds `c -> a/b/d/../../secret`,
    lexically `a/secret` in B's own tree (B has no link a/b/d); extracted into the same --output
    it resolves through A's link to the directory above --output."""
    first = push_artifact(registry.address, "review/merge-a", [(make_tar([
        ("a/b", None, {"type": tarfile.DIRTYPE}),
        ("a/b/d", None, {"type": tarfile.SYMTYPE, "linkname": ".."})]), WEIGHT_TAR, {})])
    second = push_artifact(registry.address, "review/merge-b", [(make_tar([
        ("c", None, {"type": tarfile.SYMTYPE, "linkname": "a/b/d/../../secret"})]), WEIGHT_TAR, {})])
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "secret").write_bytes(b"TOPSECRET")
    out = sandbox / "out"
    cli.run("extract", "--plain-http", first, "--output", str(out))
    result = cli.run("extract", "--plain-http", second, "--output", str(out), check=False)
    resolved = os.path.realpath(out / "c")
    assert result.returncode == 1 or resolved.startswith(str(out) + os.sep), \
        f"extract left {out}/c resolving to {resolved} (outside --output); stderr: {result.stderr}"
