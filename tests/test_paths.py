"""Path safety shared by the mount's tree and extract: what is cleaned, what is refused."""

import pytest

from modelfs.errors import UnsafePathError
from modelfs.formats.paths import clean_member_path, link_target_inside


@pytest.mark.parametrize("path, clean", [
    ("model.safetensors", "model.safetensors"),
    ("./a//b/", "a/b"),
    ("a/./b/c.json", "a/b/c.json"),
    ("tokenizer\\vocab.txt", "tokenizer/vocab.txt"),  # Windows-built tars
    ("..foo/bar..", "..foo/bar.."),  # dots inside names are names
])
def test_paths_are_normalised(path, clean):
    assert clean_member_path(path, "layer 0") == clean


@pytest.mark.parametrize("path, fragment", [
    ("", "empty or NUL-containing path"),
    ("a\x00b", "empty or NUL-containing path"),
    ("/etc/passwd", "absolute path '/etc/passwd' refused"),
    ("\\windows\\system32", "absolute path"),
    ("../x", "contains '..'"),
    ("a/../../x", "contains '..'"),
    ("a\\..\\..\\x", "contains '..'"),
    ("./", "names the root"),
    (".", "names the root"),
])
def test_hostile_paths_are_refused_with_the_place_named(path, fragment):
    with pytest.raises(UnsafePathError) as info:
        clean_member_path(path, "layer 3, member 'x'")
    assert str(info.value).startswith("layer 3, member 'x': ") and fragment in str(info.value)


@pytest.mark.parametrize("member, link, inside", [
    ("weights/current", "part-1.bin", True),
    ("weights/current", "../config.json", True),
    ("a/b/c", "../../d", True),
    ("weights/current", "../../etc/passwd", False),
    ("link", "/etc/passwd", False),
    ("link", "..", False),
    ("a/link", "../..", False),
])
def test_symlink_targets_must_stay_in_the_tree(member, link, inside):
    assert link_target_inside(member, link) is inside


@pytest.mark.parametrize("links, member, inside", [
    ({"sub/p": "..", "sub/q": "p/../../etc/passwd"}, "sub/q", False),  # each alone passes a lexical check
    ({"sub/p": "..", "sub/q": "p/../../etc/passwd"}, "sub/p", True),
    ({"a": "b/c", "b/c": "../d"}, "a", True),
    ({"x/a": "../y", "y": "../../out"}, "x/a", False),
    ({"a": "b", "b": "a"}, "a", False),  # a loop is refused, not followed for ever
    ({"a/l": "../../.."}, "a/l", False),
    ({"a/l": "/abs"}, "a/l", False),
])
def test_symlink_chains_are_resolved_as_the_kernel_would(links, member, inside):
    from modelfs.formats.paths import link_chain_inside
    assert link_chain_inside(member, links) is inside


@pytest.mark.parametrize("path, fragment", [
    ("a/" + "n" * 256, "of over 255 bytes"),
    ("d/" * 2100 + "f", "4201 bytes"),
    ("bad\ud800name", "not a valid file name"),
])
def test_names_linux_cannot_hold_are_refused(path, fragment):
    with pytest.raises(UnsafePathError) as info:
        clean_member_path(path, "layer 0")
    assert fragment in str(info.value)
