"""The docs say what the code does: the parts made from the code are equal to what it makes
now, the examples are read by the real parsers, and every module and every doc a comment cites
exists. Milliseconds each: nothing here starts a registry or a mount."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO_ROOT

from modelfs import settings
from modelfs.config import load

DOC = REPO_ROOT / "doc"


def test_the_configuration_tables_are_the_ones_the_declarations_make():
    text = (DOC / "CONFIGURATION.md").read_text()
    for name in settings.SECTIONS:
        assert f"<!-- generated: {name} " in text and f"<!-- end: {name} -->" in text
    assert settings.fill(text) == text, "run `python -m modelfs.settings doc/CONFIGURATION.md`"


def test_the_configuration_example_is_a_valid_config(tmp_path):
    text = (DOC / "CONFIGURATION.md").read_text()
    example = text.split("## Where settings come from", 1)[1].split("\n\n    ", 1)[1].split("\n\n(", 1)[0]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(line.removeprefix("    ") for line in ("    " + example).splitlines()) + "\n")
    config = load([str(path)])
    assert config.values["cache_max_size"] == 200 << 30
    assert [m.host for m in config.registry("registry.example.com").mirrors] == ["mirror.local:5000", "127.0.0.1:65001"]


def _layout() -> set[str]:
    """The module paths doc/ARCHITECTURE.md's layout names (a folder line, then its files)."""
    text = (DOC / "ARCHITECTURE.md").read_text()
    block = text.split("<!-- layout -->", 1)[1].split("<!-- end: layout -->", 1)[0]
    named: set[str] = set()
    folder = ""
    for line in block.splitlines():
        entry = line.strip().split("  ", 1)[0]
        if not entry:
            continue
        if entry.startswith("modelfs/"):
            folder = entry if entry.endswith("/") else ""
            if not folder:
                named.add(entry)
        elif folder:
            named.update(folder + name.strip() for name in entry.split(","))
    return named


def test_the_architecture_layout_names_every_module():
    modules = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "modelfs").rglob("*")
               if p.suffix in (".py", ".proto") and p.name not in ("__init__.py", "__main__.py")}
    named = _layout()
    assert sorted(modules - named) == [], "modules missing from doc/ARCHITECTURE.md's layout"
    assert sorted(named - modules) == [], "doc/ARCHITECTURE.md's layout names modules that do not exist"


def test_the_readme_keeps_the_command_ci_runs_and_links_only_docs_that_exist():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n    {ci}\n" in readme
    for linked in re.findall(r"\]\((doc/[\w.]+)\)", readme):
        assert (REPO_ROOT / linked).exists(), linked


def test_code_cites_only_docs_of_the_project():
    """Comments and docstrings cite the project's own docs, which exist (not a design file kept
    elsewhere)."""
    cited: dict[str, list[str]] = {}
    for path in [*(REPO_ROOT / "modelfs").rglob("*.py"), *(REPO_ROOT / "tests").glob("*.py"),
                 *(REPO_ROOT / "benchmarks").glob("*.py")]:
        if path == Path(__file__):
            continue
        text = path.read_text()
        assert "DESIGN.md" not in text, f"{path} cites DESIGN.md, which is not part of the project"
        for doc in re.findall(r"doc/[A-Z]+\.md", text):
            cited.setdefault(doc, []).append(path.name)
    missing = {doc: files for doc, files in cited.items() if not (REPO_ROOT / doc).exists()}
    assert cited and not missing
