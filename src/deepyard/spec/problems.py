"""Pydantic's validation errors as the lines a user reads: the dotted path, the bad value, the fix."""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel

from deepyard.registry import did_you_mean
from deepyard.spec.kinds import KINDS


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if found := _unwrap_model(arg):
                return found
    return None


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    annotation: Any = model
    for part in loc:
        if typing.get_origin(annotation) is list:  # models.0 -> the list's item type
            annotation = typing.get_args(annotation)[0]
            continue
        model = _unwrap_model(annotation)
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
    model = _unwrap_model(annotation)
    return list(model.model_fields) if model else []


def _data_path(loc: tuple, data: Any) -> tuple:
    """``loc`` without the names pydantic gives union members ("constrained-int", "literal['full']"):
    a part is kept only where it is a key (or index) of the user's data."""
    kept = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        elif isinstance(data, dict) or isinstance(part, int):
            data = None  # a missing key, or a list index: still a real path part
        else:
            continue  # a union member's tag
        kept.append(part)
    return tuple(kept)


def describe_errors(errors: list[dict], root: type[BaseModel], data: Any) -> list[str]:
    """As ``describe_all``; a sweep's base is described as its own job kind. Pydantic names the
    union member in the path (``base.train...``, ``base.rl...``): that tag is dropped, and the
    member's fields are the ones listed."""
    tagged = {kind: [] for kind in KINDS}
    rest = []
    for error in errors:
        loc = tuple(error["loc"])
        if "base" in root.model_fields and len(loc) > 1 and loc[0] == "base" and loc[1] in tagged:
            tagged[loc[1]].append({**error, "loc": loc[2:]})
        else:
            rest.append(error)
    problems = describe_all(rest, root, data)
    for kind, base_errors in tagged.items():
        if base_errors:
            problems += describe_all(base_errors, KINDS[kind].spec, data.get("base"), ("base",))
    return problems


def describe_all(errors: list[dict], root: type[BaseModel] | None, data: Any,
                  prefix: tuple = ()) -> list[str]:
    """One line per path: the failures of a union's members are merged into one line."""
    merged: dict[tuple, dict] = {}
    for error in errors:
        loc = _data_path(tuple(error["loc"]), data)
        if loc in merged and error["type"] not in ("extra_forbidden", "missing"):
            merged[loc]["msg"] += " or " + error["msg"].removeprefix("Input should be ")
        else:
            merged[loc] = {**error, "loc": loc}
    return [_describe(error, root, prefix) for error in merged.values()]


def _describe(error: dict, root: type[BaseModel] | None, prefix: tuple = ()) -> str:
    loc = tuple(error["loc"])
    path = _dotted(prefix + loc)
    if error["type"] == "extra_forbidden" and loc:
        valid = _fields_at(root, loc[:-1])
        return f"{path}: unknown field{did_you_mean(str(loc[-1]), valid)} (valid: {', '.join(valid)})"
    if error["type"] == "missing":
        return f"{path}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message} (got {error['input']!r})"
