"""The Modelfile: modctl's description of what goes into a model artifact.

Syntax (modctl-compatible): one ``COMMAND args`` per line, commands case-insensitive,
``#`` comments and blank lines ignored. Metadata commands (NAME, ARCH, FAMILY, FORMAT,
PARAMSIZE, PRECISION, QUANTIZATION) take one value and may appear once; file commands
(CONFIG, MODEL, CODE, DATASET, DOC) take globs relative to the build context and may repeat.
Errors name the line so the user can fix it at once.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from ..errors import ModelfileError
from ..formats.spec import Kind

METADATA_COMMANDS = ("NAME", "ARCH", "FAMILY", "FORMAT", "PARAMSIZE", "PRECISION", "QUANTIZATION")
FILE_COMMANDS: dict[str, Kind] = {
    "CONFIG": Kind.WEIGHT_CONFIG,
    "MODEL": Kind.WEIGHT,
    "CODE": Kind.CODE,
    "DATASET": Kind.DATASET,
    "DOC": Kind.DOC,
}


@dataclass
class FileRule:
    kind: Kind
    pattern: str
    line: int


@dataclass
class Modelfile:
    metadata: dict[str, str] = field(default_factory=dict)
    rules: list[FileRule] = field(default_factory=list)


@dataclass(frozen=True)
class ContextFile:
    """One file of the build context chosen by a rule."""

    path: str  # relative, '/'-separated
    kind: Kind


def parse(text: str, name: str = "Modelfile") -> Modelfile:
    result = Modelfile()
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        command, _, args = line.partition(" ")
        command = command.upper()
        args = args.strip()
        if command not in METADATA_COMMANDS and command not in FILE_COMMANDS:
            raise ModelfileError(f"{name}:{number}: unknown command {command!r}")
        if not args:
            raise ModelfileError(f"{name}:{number}: {command} needs an argument")
        if command in METADATA_COMMANDS:
            if len(args.split()) != 1:
                raise ModelfileError(f"{name}:{number}: {command} takes exactly one value, got {args!r}")
            if command in seen:
                raise ModelfileError(f"{name}:{number}: {command} already set on line {seen[command]}")
            seen[command] = number
            result.metadata[command] = args
        else:
            for pattern in args.split():
                result.rules.append(FileRule(FILE_COMMANDS[command], pattern, number))
    return result


def _walk_files(context: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(context):
        dirnames.sort()
        for fname in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fname), context)
            out.append(rel.replace(os.sep, "/"))
    return out


def resolve(modelfile: Modelfile, context: str, name: str = "Modelfile") -> tuple[list[ContextFile], list[str]]:
    """Match rules against the context directory.

    Returns the chosen files in a stable order (rule order, then path) and the context files
    no rule matched, so ``build`` can report them instead of silently dropping them. A file
    matched by several rules belongs to the first. A rule that matches nothing is an error:
    it is almost always a typo.
    """
    chosen: dict[str, ContextFile] = {}
    for rule in modelfile.rules:
        if rule.pattern.startswith("/") or ".." in rule.pattern.split("/"):
            raise ModelfileError(f"{name}:{rule.line}: pattern {rule.pattern!r} must stay inside the context")
        matches = sorted(glob.glob(rule.pattern, root_dir=context, recursive=True))
        files: list[str] = []
        for match in matches:
            full = os.path.join(context, match)
            if os.path.isdir(full):
                files.extend(f"{match.rstrip('/')}/{sub}" for sub in _walk_files(full))
            elif os.path.isfile(full):
                files.append(match)
        if not files:
            raise ModelfileError(f"{name}:{rule.line}: {rule.pattern!r} matches no file in {context}")
        for path in files:
            path = os.path.normpath(path).replace(os.sep, "/")
            chosen.setdefault(path, ContextFile(path, rule.kind))
    unmatched = [p for p in _walk_files(context) if p not in chosen and os.path.basename(p) != name]
    return list(chosen.values()), unmatched
