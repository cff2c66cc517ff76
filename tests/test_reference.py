import pytest

from modelfs.errors import InvalidReferenceError
from modelfs.reference import parse


@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("localhost:5000/demo/minilm:v1", "localhost:5000", "demo/minilm", "v1", None),
    ("127.0.0.1:5000/demo/minilm", "127.0.0.1:5000", "demo/minilm", "latest", None),
    ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
    ("org/llama:8b", "docker.io", "org/llama", "8b", None),
    ("registry.example.com/org/llama:8b", "registry.example.com", "org/llama", "8b", None),
    ("localhost/a@sha256:" + "a" * 64, "localhost", "a", None, "sha256:" + "a" * 64),
    ("r.io/a/b:t@sha256:" + "b" * 64, "r.io", "a/b", "t", "sha256:" + "b" * 64),
])
def test_parse_normalises(text, registry, repository, tag, digest):
    ref = parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_digest_wins_over_tag_and_docker_hub_api_host():
    ref = parse("r.io/a/b:t@sha256:" + "b" * 64)
    assert ref.target == "sha256:" + "b" * 64
    assert parse("ubuntu").api_host == "registry-1.docker.io"
    assert str(parse("localhost:5000/x:y")) == "localhost:5000/x:y"


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("Localhost:5000/Demo/Model:v1", "lowercase"),
    ("localhost:5000/demo:bad tag", "whitespace"),
    ("https://localhost:5000/demo:v1", "scheme"),
    ("localhost:5000/demo@sha256:abc", "64 lowercase hex"),
    ("localhost:5000/demo:-bad", "bad tag"),
    ("localhost:5000/", "missing repository"),
    ("localhost:5000/a//b", "component"),
])
def test_malformed_references_say_why(text, fragment):
    with pytest.raises(InvalidReferenceError) as info:
        parse(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
