"""Helpers for the tasks' payload codecs (``tasks/*.py``): bodies to arrays, PNGs, limits.

Requests follow the TF Serving / KServe v1 convention, ``{"instances": [...]}``. An instance is a
raw input in the data set's own units (the logged model standardizes it), given in the model's
input shape or flat; for image models it may also be a base64-encoded PNG; for text models a
string. Every problem raises ``BadRequest`` with a message that names it and what is expected: the
endpoint answers 4xx. ``ArrayCodec`` is the codec of tasks whose served model maps such a batch
to one output per instance; each task says how its outputs read (``encode``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import numpy as np


class BadRequest(ValueError):
    """The request is wrong, not the server: answered with a 4xx and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


MAX_SEED = 2**63 - 1


def parse_json(raw: bytes, expected: str) -> Any:
    """A request body -> JSON, or BadRequest for every way the parser fails: bad syntax or UTF-8
    (ValueError), an integer of more than 4,300 digits (ValueError), nesting deeper than Python's
    recursion limit (RecursionError). The last two were HTTP 500s."""
    import json

    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest(f"body is nested too deeply to be a request; {expected}") from None
    except ValueError as error:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise BadRequest(f"body is not valid JSON ({str(error)[:200]}); {expected}") from None


def instances_of(body: Any, expected: str, max_batch: int) -> list:
    """The body's ``instances``: a non-empty list within the endpoint's limit, whatever the task."""
    if not isinstance(body, dict) or "instances" not in body:
        raise BadRequest('expected a JSON object {"instances": [...]}; ' + expected)
    instances = body["instances"]
    if not isinstance(instances, list):
        raise BadRequest(f'"instances" must be a list, got {type(instances).__name__}; ' + expected)
    if not instances:
        raise BadRequest('"instances" is empty: send at least one; ' + expected)
    if len(instances) > max_batch:
        raise BadRequest(f"{len(instances)} instances is over this endpoint's limit of {max_batch} per "
                         "request; split the batch", status=413)
    return instances


def instance_options(item: Any, where: str, text_key: str, keys: set[str], expected: str) -> dict[str, Any]:
    """One instance of a text codec: a string (the ``text_key`` alone) or an object of options with a
    non-empty string under ``text_key`` and no key outside ``keys``; anything else is a 400 saying which."""
    options = {text_key: item} if isinstance(item, str) else item
    if not isinstance(options, dict) or not isinstance(options.get(text_key), str) or not options[text_key].strip():
        raise BadRequest(f"{where}: needs a non-empty {text_key} string; " + expected)
    if unknown := sorted(set(options) - keys):
        raise BadRequest(f"{where}: unknown key {unknown[0]!r}; " + expected)
    return options


def integer_option(options: dict[str, Any], key: str, where: str, low: int, high: int | None = None,
                   default: int | None = None) -> int | None:
    """``options[key]`` (or ``default``), an integer from ``low`` to ``high``; else a 400."""
    value = options.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low
                              or (high is not None and value > high)):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{where}.{key}: {value!r}; must be an integer {bounds}")
    return value


def seed_of(value: Any, where: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED):
        raise BadRequest(f"{where}: {value!r}; must be an integer from 0 to 2**63 - 1")
    return value


class JsonOutputs:
    """For codecs whose outputs are JSON objects (generated images, texts): in the v2 protocol, one
    BYTES tensor ``prediction`` holding each instance's answer as JSON text."""

    def named_outputs(self, outputs: list, metadata: dict[str, Any]) -> dict[str, np.ndarray]:
        import json

        return {"prediction": np.array([json.dumps(output) for output in outputs], dtype=object)}

    def output_tensors(self, metadata: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
        return {"prediction": ("BYTES", [-1])}


class ArrayCodec:
    """Instances as numbers (nested in the input shape, or flat), base64 PNGs for image models, or
    strings for text models -> one float32 (or token id) batch; one output row per instance."""

    batchable = True

    def expected(self, metadata: dict[str, Any]) -> str:
        if metadata.get("vocab"):
            return "each instance: a text string"
        if metadata.get("table"):
            columns = table_schema(metadata).inputs
            shown = ", ".join(columns[:12]) + (", ..." if len(columns) > 12 else "")
            return (f"each instance: an object of the columns {shown} (null for a missing value), or a list of "
                    f"their {len(columns)} values in that order")
        shape = metadata["input_shape"]
        text = f"each instance: {'x'.join(map(str, shape))} numbers (nested in that shape, or flat)"
        return text + (", or a base64 PNG string" if len(shape) == 3 else "")

    def decode(self, body: Any, metadata: dict[str, Any], max_batch: int) -> np.ndarray:
        expected = self.expected(metadata)
        instances = instances_of(body, expected, max_batch)
        shape = tuple(metadata["input_shape"])
        if metadata.get("table"):
            return _table_rows(instances, table_schema(metadata), expected)
        if metadata.get("vocab"):
            return np.stack([_text(item, index, shape[0], metadata, expected) for index, item in enumerate(instances)])
        return np.stack([_instance(item, index, shape, metadata, expected) for index, item in enumerate(instances)])

    def run(self, module, batch: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    def named_outputs(self, outputs: np.ndarray, metadata: dict[str, Any]) -> dict[str, np.ndarray]:
        """The outputs as the v2 protocol's named tensors (``output_tensors`` describes them)."""
        return {"output": np.asarray(outputs)}

    def output_tensors(self, metadata: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
        return {"output": ("FP32", [-1, -1])}

    def example(self, logged_input: np.ndarray, metadata: dict[str, Any]) -> Any:
        if metadata.get("vocab"):
            return decode_text(logged_input, metadata)
        if metadata.get("table"):
            return table_schema(metadata).decode(np.asarray(logged_input, dtype=np.float32).reshape(-1))
        return logged_input.reshape(-1).round(4).tolist()


def decode_text(ids: np.ndarray, metadata: dict[str, Any]) -> str:
    """Token ids -> text with the served model's vocabulary."""
    from deepyard.data.text import decode

    return decode(ids.tolist(), metadata["vocab"], "" if metadata.get("token_level") == "char" else " ")


def token_ids(text: str, metadata: dict[str, Any], length: int | None) -> list[int]:
    from deepyard.data.text import encode

    # The token -> id table is built once per loaded model and kept with its metadata.
    index = metadata.get("_vocab_index") or metadata.setdefault(
        "_vocab_index", {token: i for i, token in enumerate(metadata["vocab"])})
    return encode(text, index, metadata.get("token_level", "word"), length)


def table_schema(metadata: dict[str, Any]):
    """The version's fitted table schema, built once per loaded model and kept with its metadata."""
    from deepyard.data.tables import TableSchema

    schema = metadata.get("_table_schema")
    if schema is None:
        schema = metadata["_table_schema"] = TableSchema.from_dict(metadata["table"])
    return schema


def table_columns(metadata: dict[str, Any]) -> dict[str, Any]:
    """A table model's columns as its GET page shows them: type, categories, what null becomes."""
    if not metadata.get("table"):
        return {}
    schema = metadata["table"]
    shown = {"columns": [{key: value for key, value in column.items() if value not in (None, [], False)}
                         for column in schema["columns"]]}
    if schema.get("groups"):
        shown["sensitive"] = schema["groups"]
    return shown


def _table_rows(instances: list, schema, expected: str) -> np.ndarray:
    """Objects keyed by column name, or lists in the schema's order -> encoded features; a missing or
    unknown column, or a value of the wrong type, is a 400 that names it."""
    from deepyard.data.tables import CellError
    from deepyard.registry import did_you_mean

    columns = schema.inputs
    cells = np.empty((len(instances), len(columns)), dtype=object)
    for index, item in enumerate(instances):
        if isinstance(item, dict):
            if missing := [c for c in columns if c not in item]:
                raise BadRequest(f"instances[{index}]: no column {missing[0]!r}"
                                 f"{' (nor ' + ', '.join(map(repr, missing[1:4])) + ')' if len(missing) > 1 else ''}"
                                 f"; send null for a missing value; " + expected)
            if unknown := [key for key in item if key not in columns and key not in schema.ignored]:
                raise BadRequest(f"instances[{index}]: unknown column {unknown[0]!r}"
                                 f"{did_you_mean(str(unknown[0]), columns)}; " + expected)
            values = [item[c] for c in columns]
        elif isinstance(item, list) and len(item) == len(columns):
            values = item
        else:
            what = f"a list of {len(item)} values" if isinstance(item, list) else f"a {type(item).__name__}"
            raise BadRequest(f"instances[{index}]: {what}; " + expected)
        for position, value in enumerate(values):  # (cell by cell: numpy would broadcast a list value)
            if isinstance(value, (list, dict)):
                raise BadRequest(f"instances[{index}]: column {columns[position]!r}: a {type(value).__name__}; "
                                 "each column takes one value (a row per instance)")
            cells[index, position] = value
    try:
        return schema.encode(cells)
    except CellError as error:
        raise BadRequest(f"instances[{error.row}]: column {error.column!r}: {error.reason}") from None


def _text(item: Any, index: int, length: int, metadata: dict[str, Any], expected: str) -> np.ndarray:
    if not isinstance(item, str) or not item.strip():
        raise BadRequest(f"instances[{index}]: {'an empty string' if isinstance(item, str) else type(item).__name__}; "
                         + expected)
    return np.asarray(token_ids(item, metadata, length), dtype=np.int64)


def png_base64(image: np.ndarray, pixel_max: float) -> str:
    """(channels, height, width) in the data set's pixel units -> a base64-encoded PNG."""
    from PIL import Image

    levels = np.clip(image / pixel_max * 255.0, 0, 255).round().astype(np.uint8)
    picture = Image.fromarray(levels[0] if levels.shape[0] == 1 else levels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _instance(item: Any, index: int, shape: tuple[int, ...], metadata: dict[str, Any], expected: str) -> np.ndarray:
    if isinstance(item, str):
        if len(shape) != 3:
            raise BadRequest(f"instances[{index}]: a string, but this model takes numbers; " + expected)
        return _png(item, index, shape, float(metadata.get("pixel_max", 255.0)))
    if _holds_bool(item):  # numpy reads true as 1.0: a client's bug would pass as data
        raise BadRequest(f"instances[{index}]: true/false where numbers are expected; " + expected)
    try:
        array = np.asarray(item, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):  # (an integer past float64's range: OverflowError)
        raise BadRequest(f"instances[{index}]: not an array of numbers (ragged, or holding non-numbers); "
                         + expected) from None
    if array.dtype == object or array.size != math.prod(shape):
        raise BadRequest(f"instances[{index}]: shape {list(array.shape)} ({array.size} numbers); "
                         + expected)
    if array.shape != shape and array.ndim != 1:
        raise BadRequest(f"instances[{index}]: shape {list(array.shape)}; " + expected)
    if not np.isfinite(array).all():
        raise BadRequest(f"instances[{index}]: NaN or infinity; every value must be a finite number")
    return array.reshape(shape)


def _holds_bool(item: Any) -> bool:
    pending = [item]
    while pending:
        value = pending.pop()
        if isinstance(value, bool):
            return True
        if isinstance(value, list):
            pending.extend(v for v in value if isinstance(v, (list, bool)))
    return False


def _png(text: str, index: int, shape: tuple[int, ...], pixel_max: float) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    try:
        data = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG":
            raise UnidentifiedImageError
        image = image.convert("L" if channels == 1 else "RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise BadRequest(f"instances[{index}]: a string that is not a base64-encoded PNG image") from None
    if image.size != (width, height):
        raise BadRequest(f"instances[{index}]: PNG is {image.size[0]}x{image.size[1]} pixels; "
                         f"this model takes {width}x{height}")
    pixels = np.asarray(image, dtype=np.float32).reshape(height, width, -1).transpose(2, 0, 1)
    return pixels * (pixel_max / 255.0)  # PNG levels -> the data set's own pixel units


