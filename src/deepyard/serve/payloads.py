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
from dataclasses import dataclass
from typing import Any

import numpy as np


class BadRequest(ValueError):
    """The request is wrong, not the server: answered with a 4xx and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# Per request: a language model runs one forward pass per new token, a GAN one per batch of images;
# these caps keep one request from holding a replica for minutes.
MAX_NEW_TOKENS = 2048
MAX_TOTAL_NEW_TOKENS = 4096
MAX_TOTAL_IMAGES = 256
MAX_SEED = 2**63 - 1
_GENERATION_KEYS = {"prompt", "max_new_tokens", "temperature", "top_k", "seed"}


MAX_IMAGES = 64


def expected(metadata: dict[str, Any]) -> str:
    if metadata.get("task") == "generation":
        return f'each instance: {{"n": images to generate (1 to {MAX_IMAGES}, default 1), "seed": int (optional)}}'
    if metadata.get("task") == "language_model":
        return ('each instance: a prompt string, or {"prompt": str, "max_new_tokens": int (default 100, at most '
                f'{MAX_NEW_TOKENS}), "temperature": number >= 0 (default 1; 0 is greedy), "top_k": int, "seed": int}}')
    if metadata.get("vocab"):
        return "each instance: a text string"
    if metadata.get("task") == "rl_policy":
        return (f"each instance: one observation of {metadata['env_id']}, {metadata['input_shape'][0]} numbers; "
                f"the answer is the greedy action in {metadata['action_space']}")
    shape = metadata["input_shape"]
    text = f"each instance: {'x'.join(map(str, shape))} numbers (nested in that shape, or flat)"
    return text + (", or a base64 PNG string" if len(shape) == 3 else "")


def instances_of(body: Any, metadata: dict[str, Any], max_batch: int) -> list:
    """The body's ``instances``: a non-empty list within the endpoint's limit, whatever the task."""
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
    return instances


def decode_instances(body: Any, metadata: dict[str, Any], max_batch: int) -> np.ndarray:
    """``{"instances": [...]}`` -> a float32 batch in the model's input shape."""
    instances = instances_of(body, metadata, max_batch)
    shape = tuple(metadata["input_shape"])
    if metadata.get("vocab"):
        return np.stack([_text(item, index, shape[0], metadata) for index, item in enumerate(instances)])
    return np.stack([_instance(item, index, shape, metadata) for index, item in enumerate(instances)])


def _token_ids(text: str, metadata: dict[str, Any], length: int | None) -> list[int]:
    from deepyard.data.text import encode

    # The token -> id table is built once per loaded model and kept with its metadata.
    index = metadata.get("_vocab_index") or metadata.setdefault(
        "_vocab_index", {token: i for i, token in enumerate(metadata["vocab"])})
    return encode(text, index, metadata.get("token_level", "word"), length)


def _text(item: Any, index: int, length: int, metadata: dict[str, Any]) -> np.ndarray:
    if not isinstance(item, str) or not item.strip():
        raise BadRequest(f"instances[{index}]: {'an empty string' if isinstance(item, str) else type(item).__name__}; "
                         + expected(metadata))
    return np.asarray(_token_ids(item, metadata, length), dtype=np.int64)


@dataclass
class Generation:
    prompt: str
    ids: list[int]
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None


def decode_prompts(body: Any, metadata: dict[str, Any], max_batch: int) -> list[Generation]:
    """A language model's ``{"instances": [prompt or {"prompt": ..., ...}]}`` -> what to generate."""
    instances = instances_of(body, metadata, max_batch)
    requests = [_generation(item, index, metadata) for index, item in enumerate(instances)]
    if (total := sum(request.max_new_tokens for request in requests)) > MAX_TOTAL_NEW_TOKENS:
        raise BadRequest(f"{total} new tokens in one request is over the limit of {MAX_TOTAL_NEW_TOKENS}; "
                         "split the request or lower max_new_tokens", status=413)
    return requests


def _generation(item: Any, index: int, metadata: dict[str, Any]) -> Generation:
    where = f"instances[{index}]"
    options = {"prompt": item} if isinstance(item, str) else item
    if not isinstance(options, dict) or not isinstance(options.get("prompt"), str) or not options["prompt"]:
        raise BadRequest(f"{where}: needs a non-empty prompt string; " + expected(metadata))
    if unknown := sorted(set(options) - _GENERATION_KEYS):
        raise BadRequest(f"{where}: unknown key {unknown[0]!r}; " + expected(metadata))

    def integer(key: str, low: int, high: int | None = None) -> int | None:
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low
                                  or (high is not None and value > high)):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise BadRequest(f"{where}.{key}: {value!r}; must be an integer {bounds}")
        return value

    temperature = options.get("temperature", 1.0)
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not (temperature == 0 or 0.01 <= temperature <= 10)):
        raise BadRequest(f"{where}.temperature: {temperature!r}; must be 0 (greedy) or a number from 0.01 to 10")
    new_tokens = integer("max_new_tokens", 1, MAX_NEW_TOKENS)
    ids = _token_ids(options["prompt"], metadata, None)
    if not ids:
        raise BadRequest(f"{where}.prompt: holds no tokens; " + expected(metadata))
    return Generation(options["prompt"], ids,
                      100 if new_tokens is None else new_tokens, float(temperature), integer("top_k", 1),
                      integer("seed", 0, MAX_SEED))


def generate_texts(module, requests: list[Generation], metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """Sample each request's continuation from the served language model."""
    from deepyard.data.text import decode
    from deepyard.tasks.language_model import generate

    join_with = "" if metadata.get("token_level") == "char" else " "
    window = int(metadata["input_shape"][0])
    results = []
    for request in requests:
        ids = generate(module, request.ids, window=window, max_new_tokens=request.max_new_tokens,
                       temperature=request.temperature, top_k=request.top_k, seed=request.seed)
        results.append({"prompt": request.prompt, "text": decode(ids, metadata["vocab"], join_with)})
    return results


def decode_image_requests(body: Any, metadata: dict[str, Any], max_batch: int) -> list[tuple[int, int | None]]:
    """A GAN's ``{"instances": [{"n": 8, "seed": 1}, ...]}`` -> (count, seed) per instance."""
    requests = []
    for index, item in enumerate(instances_of(body, metadata, max_batch)):
        if not isinstance(item, dict) or set(item) - {"n", "seed"}:
            problem = (f"unknown keys {sorted(set(item) - {'n', 'seed'})}" if isinstance(item, dict)
                       else type(item).__name__)
            raise BadRequest(f"instances[{index}]: {problem}; " + expected(metadata))
        count, seed = item.get("n", 1), item.get("seed")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_IMAGES:
            raise BadRequest(f"instances[{index}].n: {count!r}; must be an integer from 1 to {MAX_IMAGES}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
            raise BadRequest(f"instances[{index}].seed: {seed!r}; must be an integer from 0 to 2**63 - 1")
        requests.append((count, seed))
    if (total := sum(count for count, _ in requests)) > MAX_TOTAL_IMAGES:
        raise BadRequest(f"{total} images in one request is over the limit of {MAX_TOTAL_IMAGES}; split the request",
                         status=413)
    return requests


def generate_images(module, requests: list[tuple[int, int | None]], metadata: dict[str, Any]) -> list[dict]:
    """Sample each request's images from the served generator, as base64 PNGs."""
    import torch

    latent_dim = int(metadata["input_shape"][0])
    results = []
    for count, seed in requests:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.inference_mode():
            images = module(torch.randn(count, latent_dim, generator=generator)).numpy()
        results.append({"images": [png_base64(image, float(metadata.get("pixel_max", 255.0))) for image in images],
                        "seed": seed})
    return results


def png_base64(image: np.ndarray, pixel_max: float) -> str:
    """(channels, height, width) in the data set's pixel units -> a base64-encoded PNG."""
    from PIL import Image

    levels = np.clip(image / pixel_max * 255.0, 0, 255).round().astype(np.uint8)
    picture = Image.fromarray(levels[0] if levels.shape[0] == 1 else levels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


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
    if metadata["task"] == "rl_policy":  # an action index, or a vector in the action space's units
        return [action.item() if action.ndim == 0 else action.tolist() for action in np.asarray(outputs)]
    values = np.asarray(outputs).reshape(len(outputs), -1)
    if values.shape[1] > 1:  # a forecast of several steps: one list per instance
        return [[float(v) for v in row] for row in values]
    return [float(value) for value in values[:, 0]]


def request_instance(example: np.ndarray, metadata: dict[str, Any]) -> Any:
    """One logged input example (a real test input) as a request instance: numbers, a text or a prompt."""
    if metadata.get("task") == "generation":
        return {"n": 4, "seed": 0}
    if not metadata.get("vocab"):
        return example.reshape(-1).round(4).tolist()
    from deepyard.data.text import decode

    char_level = metadata.get("token_level") == "char"
    text = decode(example.tolist(), metadata["vocab"], "" if char_level else " ")
    if metadata.get("task") == "language_model":
        return {"prompt": text[: len(text) // 4] or text, "max_new_tokens": 100, "temperature": 0.8, "top_k": 20}
    return text


def example_instance(metadata: dict[str, Any]) -> Any:
    """A valid instance for the curl example and the OpenAPI docs (zeros, for numbers)."""
    if metadata.get("task") == "generation":
        return {"n": 4, "seed": 0}
    if metadata.get("task") == "language_model":
        return {"prompt": "ROMEO:" if metadata.get("token_level") == "char" else "the", "max_new_tokens": 100,
                "temperature": 0.8, "top_k": 20}
    if metadata.get("vocab"):
        return "a quietly moving film, beautifully acted"
    return np.zeros(metadata["input_shape"], dtype=np.float32).tolist()
