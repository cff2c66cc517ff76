"""Layers to a file tree: conflicting and hostile paths are refused with the layer named.

What a valid tree serves is tested through real mounts (test_mount); these are the refusals,
which happen before any blob is read.
"""

import gzip
import hashlib
import tarfile

import pytest
import trio
from conftest import make_tar

from modelfs.errors import ManifestError, UnsafePathError
from modelfs.formats.spec import OCI_MANIFEST, Descriptor, Manifest, ModelConfig
from modelfs.formats.tarindex import DIRECTORY, REGULAR, index_tar
from modelfs.mount.tree import ROOT_INODE, Tree, build_tree
from modelfs.reference import parse
from modelfs.resolve import Model

DIGEST = "sha256:" + "ef" * 32
RAW = "application/vnd.cncf.model.weight.v1.raw"


def add_file(tree: Tree, path: str, where: str = "layer 0") -> None:
    tree.add(path, where, kind=REGULAR, mode=0o644, mtime_ns=0, size=1)


def test_paths_make_directories_once():
    tree = Tree(mtime_ns=0)
    add_file(tree, "a/b/c.bin")
    add_file(tree, "a/b/d.bin")
    a = tree.nodes[tree.nodes[ROOT_INODE].children["a"]]
    b = tree.nodes[a.children["b"]]
    assert a.kind == DIRECTORY and sorted(b.children) == ["c.bin", "d.bin"]
    assert {n.name for n in tree.files()} == {"c.bin", "d.bin"}
    assert all(tree.nodes[n.parent].children[n.name] == n.inode for n in tree.nodes.values() if n.inode != ROOT_INODE)


def test_a_duplicate_path_names_both_layers():
    tree = Tree(mtime_ns=0)
    add_file(tree, "config.json", "layer 0")
    with pytest.raises(UnsafePathError, match=r"layer 3: duplicate path 'config.json' \(also in layer 0\)"):
        add_file(tree, "config.json", "layer 3")


@pytest.mark.parametrize("first, second", [("a", "a/b"), ("a/b", "a/b/c"), ("a/b", "a"), ("a", "a/b/c")])
def test_a_path_cannot_be_both_file_and_directory(first, second):
    tree = Tree(mtime_ns=0)
    add_file(tree, first)
    with pytest.raises(UnsafePathError, match=f"layer 0: '{min(first, second, key=len)}' is both a file and a directory"):
        add_file(tree, second)


def test_a_tree_past_its_node_limit_is_refused():
    tree = Tree(mtime_ns=0, max_nodes=4)  # the root and three more
    add_file(tree, "a/b.bin")
    add_file(tree, "a/c.bin")
    with pytest.raises(ManifestError, match="layer 7: the model has over 4 files and directories; refusing it"):
        add_file(tree, "d.bin", "layer 7")


def model_with(*layers: Descriptor) -> Model:
    config = ModelConfig({"name": "t"}, {}, [])
    manifest = Manifest(OCI_MANIFEST, Descriptor("application/vnd.cncf.model.config.v1+json", DIGEST, 2), list(layers))
    return Model(parse("localhost:5000/t/m:v1").with_digest(DIGEST), manifest, manifest.to_bytes(), config,
                 config.to_bytes())


@pytest.mark.parametrize("layer, fragment", [
    (Descriptor("application/x-unknown", DIGEST, 1), "unknown media type 'application/x-unknown' and no file path"),
    (Descriptor(RAW, DIGEST, 1), "raw layer has no org.cncf.model.filepath annotation"),
    (Descriptor(RAW, DIGEST, 1, {"org.cncf.model.filepath": "../../etc/passwd"}), "contains '..'"),
    (Descriptor(RAW, DIGEST, 1, {"org.cncf.model.filepath": "/etc/passwd"}), "absolute path '/etc/passwd' refused"),
    (Descriptor(RAW, DIGEST, 1, {"org.cncf.model.filepath": "./"}), "names the root"),
])
def test_hostile_or_unusable_layers_are_refused_before_any_read(layer, fragment):
    with pytest.raises((ManifestError, UnsafePathError)) as info:
        trio.run(build_tree, model_with(layer), None)  # refused before the fetcher is asked for anything
    assert fragment in str(info.value)
    assert str(info.value).startswith("layer 0 (sha256:efefefefefef")


class InMemoryLayers:
    """The tree's view of the layers (``LayerReads``) over blobs held in memory, counting what
    building the tree reads: a plain tar by range, a compressed layer's member list whole."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs, self.ranges, self.unpacked = blobs, [], []

    def read_at(self, layer: Descriptor):
        async def read(offset: int, size: int) -> bytes:
            self.ranges.append(layer.digest)
            return self.blobs[layer.digest][offset:offset + size]
        return read

    async def unpack_members(self, layer):
        self.unpacked.append(layer.descriptor.digest)
        tar = gzip.decompress(self.blobs[layer.descriptor.digest])
        return await index_tar(lambda offset, size: _at(tar, offset, size), len(tar), layer.where)


async def _at(data: bytes, offset: int, size: int) -> bytes:
    return data[offset:offset + size]


def _layer(media_type: str, data: bytes, annotations: dict[str, str] | None = None) -> Descriptor:
    return Descriptor(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), annotations or {})


def test_the_tree_is_a_listing_each_file_says_what_bytes_it_is():
    """No reader is made while listing: a plain tar's headers are read through a read function,
    a compressed layer's members are asked for once, and each file names its blob and offset
    (or its member of a compressed layer), for the data path to bind a reader on first use."""
    raw = b"raw weights"
    tar = make_tar([("a/one.bin", b"first file", {}), ("two.bin", b"second", {}),
                    ("same.bin", None, {"type": tarfile.LNKTYPE, "linkname": "two.bin"})])
    packed = gzip.compress(make_tar([("z/three.bin", b"third", {}), ("z/again", None, {"type": tarfile.LNKTYPE,
                                                                                         "linkname": "z/three.bin"})]))
    single = gzip.compress(make_tar([("four.bin", b"fourth", {})]))
    layers = [_layer(RAW, raw, {"org.cncf.model.filepath": "raw.bin"}),
              _layer("application/vnd.cncf.model.weight.v1.tar", tar),
              _layer("application/vnd.cncf.model.weight.v1.tar+gzip", packed),
              _layer("application/vnd.cncf.model.weight.v1.tar+gzip", single, {
                  "org.cncf.model.filepath": "four.bin", "org.cncf.model.file.metadata+json": '{"size": 6}'})]
    source = InMemoryLayers({layer.digest: data for layer, data in zip(layers, [raw, tar, packed, single], strict=True)})
    tree = trio.run(build_tree, model_with(*layers), source)

    files = {"/".join(_path(tree, node)): node for node in tree.files()}
    assert set(source.ranges) == {layers[1].digest} and source.unpacked == [layers[2].digest]
    for path, content in (("a/one.bin", b"first file"), ("two.bin", b"second"), ("same.bin", b"second")):
        node = files[path]
        assert node.layer.descriptor == layers[1] and not node.member
        assert tar[node.offset:node.offset + node.size] == content
    assert (files["raw.bin"].layer.descriptor, files["raw.bin"].offset, files["raw.bin"].size) == (layers[0], 0, len(raw))
    assert [(files[p].member, files[p].offset, files[p].layer.descriptor) for p in ("z/three.bin", "z/again", "four.bin")] == [
        ("z/three.bin", 0, layers[2]), ("z/three.bin", 0, layers[2]), ("four.bin", 0, layers[3])]
    assert [(n.layer.descriptor.digest, n.member) for n in tree.distinct_files()] == [
        (layers[0].digest, ""), (layers[1].digest, ""), (layers[2].digest, "z/three.bin"), (layers[3].digest, "four.bin")]


def _path(tree: Tree, node) -> list[str]:
    parts = []
    while node.inode != ROOT_INODE:
        parts.insert(0, node.name)
        node = tree.nodes[node.parent]
    return parts
