"""What a deployed model takes and answers, per task: the one place that maps HTTP bodies to tensors.

Requests follow the TF Serving / KServe v1 convention, ``{"instances": [...]}``. An instance is a
raw input in the data set's own units (the logged model standardizes it), given in the model's
input shape or flat; for image models it may also be a base64-encoded PNG. Every problem raises
``BadRequest`` with a message that names it and the expected shape: the endpoint answers 4xx.
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


def expected(metadata: dict[str, Any]) -> str:
    shape = metadata["input_shape"]
    text = f"each instance: {'x'.join(map(str, shape))} numbers (nested in that shape, or flat)"
    return text + (", or a base64 PNG string" if len(shape) == 3 else "")


def decode_instances(body: Any, metadata: dict[str, Any], max_batch: int) -> np.ndarray:
    """``{"instances": [...]}`` -> a float32 batch in the model's input shape."""
    if not isinstance(body, dict) or "instances" not in body:
        raise BadRequest('expected a JSON object {"instances": [...]}; ' + expected(metadata))
    instances = body["instances"]
    if not isinstance(instances, list):
        raise BadRequest(f'"instances" must be a list, got {type(instances).__name__}; ' + expected(metadata))
    if not instances:
        raise BadRequest('"instances" is empty: send at least one; ' + expected(metadata))
    if len(instances) > max_batch:
        raise BadRequest(f"{len(instances)} instances is over this endpoint's limit of {max_batch} per "
                         "request; split the batch", status=413)
    shape = tuple(metadata["input_shape"])
    return np.stack([_instance(item, index, shape, metadata) for index, item in enumerate(instances)])


def _instance(item: Any, index: int, shape: tuple[int, ...], metadata: dict[str, Any]) -> np.ndarray:
    if isinstance(item, str):
        if len(shape) != 3:
            raise BadRequest(f"instances[{index}]: a string, but this model takes numbers; " + expected(metadata))
        return _png(item, index, shape, float(metadata.get("pixel_max", 255.0)))
    try:
        array = np.asarray(item, dtype=np.float32)
    except (ValueError, TypeError):
        raise BadRequest(f"instances[{index}]: not an array of numbers (ragged, or holding non-numbers); "
                         + expected(metadata)) from None
    if array.dtype == object or array.size != math.prod(shape):
        raise BadRequest(f"instances[{index}]: shape {list(array.shape)} ({array.size} numbers); "
                         + expected(metadata))
    if array.shape != shape and array.ndim != 1:
        raise BadRequest(f"instances[{index}]: shape {list(array.shape)}; " + expected(metadata))
    if not np.isfinite(array).all():
        raise BadRequest(f"instances[{index}]: NaN or infinity; every value must be a finite number")
    return array.reshape(shape)


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


def encode_predictions(outputs: np.ndarray, metadata: dict[str, Any], top_k: int) -> list[Any]:
    """The model's outputs -> one JSON-ready prediction per instance, as the task needs."""
    if metadata["task"] == "classification":
        names = metadata.get("class_names") or [str(i) for i in range(outputs.shape[-1])]
        k = min(top_k, len(names))
        order = np.argsort(-outputs, axis=-1)[:, :k]
        return [{"label": names[row[0]], "probabilities": dict(zip(names, map(float, probs))),
                 "top_k": [{"label": names[i], "probability": float(probs[i])} for i in row]}
                for probs, row in zip(outputs, order)]
    return [float(value) for value in np.asarray(outputs).reshape(len(outputs), -1)[:, 0]]


def example_instance(metadata: dict[str, Any]) -> list:
    """A valid instance (zeros) for the curl example and the OpenAPI docs."""
    return np.zeros(metadata["input_shape"], dtype=np.float32).tolist()
