"""YAML -> a validated job spec: the only place that reads YAML. ``load_spec`` reports every problem in
a file at once, each naming the dotted path, the bad value and the fix, and starts nothing (no Ray,
no MLflow). A kind's own checks run through its spec class's hooks (``sections.JobBase``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pydantic
import yaml

from deepyard.errors import BadInput, SpecError
from deepyard.registry import unknown_name_message
from deepyard.spec.kinds import KINDS
from deepyard.spec.problems import describe_errors
from deepyard.spec.sections import JobBase


def apply_overrides(document: dict, overrides: list[str], problems: list[str]) -> None:
    """``train.epochs=3`` sets a dotted path; the value is parsed as YAML (3 -> int, [8, 8] -> list)."""
    for override in overrides:
        path, sep, text = override.partition("=")
        if not sep or not path.strip():
            problems.append(f"--set {override!r}: expected dotted.path=value, e.g. --set train.epochs=3")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        keys = path.strip().split(".")
        node = document
        for key in keys[:-1]:
            if node.get(key) is None:  # absent, or left empty in the YAML
                node[key] = {}
            if not isinstance(node[key], dict):
                problems.append(f"--set {override!r}: {key} is not a section")
                break
            node = node[key]
        else:
            node[keys[-1]] = value
def parse_spec(document: Any, source: str = "<spec>", overrides: list[str] | None = None) -> JobBase:
    problems: list[str] = []
    if not isinstance(document, dict):
        raise SpecError(source, ["(top level): expected a mapping with kind, name, data, model..., "
                                 f"got {type(document).__name__}"])
    document = copy.deepcopy(document)  # overrides and resolved params are written into it
    name = document.get("kind", "train")
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise SpecError(source, [f"kind: {unknown_name_message('job kind', str(name), list(KINDS))}"])
    kind.spec.prepare(document, source, problems)
    apply_overrides(document, overrides or [], problems)
    kind.spec.resolve(document, problems)
    spec = None
    try:
        spec = kind.spec.model_validate(document)
    except pydantic.ValidationError as error:
        problems += describe_errors(error.errors(), kind.spec, document)
    kind.spec.check_document(document, problems)
    if problems:
        raise SpecError(source, problems)
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobBase:
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"{file}: no such spec file")
    try:
        document = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError(str(file), [f"not valid YAML{line}: {problem}"]) from None
    return parse_spec(document, str(file), overrides)


def to_yaml(spec: JobBase) -> str:
    """The resolved spec (defaults filled in): enough to reproduce the run."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def flatten(spec: JobBase) -> dict[str, str]:
    """``{"train.epochs": "10", ...}``: the resolved spec as MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = str(value)

    walk("", spec.model_dump(mode="json"))
    return flat
