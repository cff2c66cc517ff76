import pytest

from modelfs.artifact.modelfile import parse, resolve
from modelfs.errors import ModelfileError
from modelfs.formats.spec import Kind


def test_parse_commands_comments_and_case():
    mf = parse("# a model\nname demo\nARCH transformer\n  # indented comment\nMODEL *.safetensors\nconfig config.json tok*.json\n")
    assert mf.metadata == {"NAME": "demo", "ARCH": "transformer"}
    assert [(r.kind, r.pattern, r.line) for r in mf.rules] == [
        (Kind.WEIGHT, "*.safetensors", 5), (Kind.WEIGHT_CONFIG, "config.json", 6), (Kind.WEIGHT_CONFIG, "tok*.json", 6)]


@pytest.mark.parametrize("text, message", [
    ("NAME a\nFOO bar\n", "Modelfile:2: unknown command 'FOO'"),
    ("NAME a\nNAME b\n", "Modelfile:2: NAME already set on line 1"),
    ("\n\nMODEL\n", "Modelfile:3: MODEL needs an argument"),
    ("PRECISION fp16 bf16\n", "Modelfile:1: PRECISION takes exactly one value"),
])
def test_errors_name_the_line(text, message):
    with pytest.raises(ModelfileError) as info:
        parse(text)
    assert str(info.value).startswith(message)


def test_resolve_globs_dirs_and_reports_unmatched(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"w")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.py").write_text("")
    (tmp_path / "notes.txt").write_text("")
    mf = parse("MODEL *.safetensors\nCONFIG *.json\nCODE sub\n")
    files, unmatched = resolve(mf, str(tmp_path))
    assert [(f.path, f.kind) for f in files] == [
        ("model.safetensors", Kind.WEIGHT), ("config.json", Kind.WEIGHT_CONFIG), ("sub/a.py", Kind.CODE)]
    assert unmatched == ["notes.txt"]


def test_rule_matching_nothing_or_escaping_is_an_error(tmp_path):
    with pytest.raises(ModelfileError, match=r"Modelfile:1: '\*.gguf' matches no file"):
        resolve(parse("MODEL *.gguf\n"), str(tmp_path))
    with pytest.raises(ModelfileError, match="Modelfile:1: .* must stay inside"):
        resolve(parse("MODEL ../secret\n"), str(tmp_path))
