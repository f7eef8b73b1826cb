"""The Open Inference Protocol (KServe v2, Triton's HTTP API) for a deepyard model: typed tensors in,
typed tensors out, in JSON or with Triton's binary tensor extension (what ``tritonclient`` sends and
asks for by default). No Ray here: ``serve/app.py`` answers with these, ``serve/gateway.py`` routes.

A deepyard model takes one input tensor, ``input``: FP32 ``[-1, *input_shape]`` (any numeric type is
taken), or BYTES ``[-1]`` for models that take text, PNGs or JSON objects per instance. Its outputs
are the task codec's (``named_outputs``): classifiers answer ``probabilities`` and ``label``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from deepyard.serve.payloads import BadRequest, parse_json

INPUT = "input"
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension: JSON first, then the tensors

NUMERIC = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
           "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
DATATYPE = {np.dtype(dtype): name for name, dtype in NUMERIC.items()}
MAX_ELEMENTS = 2**28  # in one input tensor (a body is at most max_body_bytes anyway)
EXPECTED = 'send {"inputs": [{"name": "input", "datatype": "FP32", "shape": [batch, ...], "data": [...]}]}'


class Tensor(BaseModel):
    name: str
    shape: list[int] = Field(description="the batch first")
    datatype: str = Field(description="BOOL, UINT8-64, INT8-64, FP16/32/64 or BYTES")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: the tensor follows the JSON")
    data: list[Any] | None = Field(None, description="flat, or nested as the shape")


class InferBody(BaseModel):
    """The infer request, as the OpenAPI docs show it (the routes parse their own bodies: limits
    first, then messages that help)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[Tensor]
    outputs: list[dict[str, Any]] | None = Field(None, description='[{"name": ...}]: only these (default: all)')


OPENAPI_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": InferBody.model_json_schema()}}}}


@dataclass
class InferRequest:
    id: str | None
    instances: list  # what the task's codec decodes, as if sent to /predict
    parameters: dict[str, Any]
    outputs: list[str] | None  # the outputs asked for (None: all)
    binary: set[str] = field(default_factory=set)  # outputs asked for as binary data
    binary_default: bool = False


def input_tensor(metadata: dict[str, Any], numeric: bool) -> dict[str, Any]:
    if numeric:
        return {"name": INPUT, "datatype": "FP32", "shape": [-1, *metadata["input_shape"]]}
    return {"name": INPUT, "datatype": "BYTES", "shape": [-1]}


def model_metadata(name: str, version: str, metadata: dict[str, Any], numeric: bool,
                   outputs: dict[str, tuple[str, list[int]]]) -> dict[str, Any]:
    return {"name": name, "versions": [version], "platform": "pytorch_torchscript",
            "inputs": [input_tensor(metadata, numeric)],
            "outputs": [{"name": key, "datatype": datatype, "shape": shape}
                        for key, (datatype, shape) in outputs.items()]}


def parse(raw: bytes, header_length: str | None, metadata: dict[str, Any], numeric: bool) -> InferRequest:
    """An infer request's body -> the instances the task's codec takes; BadRequest names what is wrong."""
    binary = b""
    if header_length is not None:
        if not re.fullmatch(r"[0-9]{1,12}", header_length) or int(header_length) > len(raw):
            raise BadRequest(f"{HEADER_LENGTH}: {header_length[:40]!r}; must be the length of the JSON part "
                             f"(at most the body's {len(raw)} bytes)")
        raw, binary = raw[:int(header_length)], raw[int(header_length):]
    body = parse_json(raw, EXPECTED)
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise BadRequest('expected a JSON object with an "inputs" list; ' + EXPECTED)
    if len(body["inputs"]) != 1 or not isinstance(body["inputs"][0], dict):
        raise BadRequest(f"{len(body['inputs'])} inputs; this model takes one, "
                         f"{_describe(input_tensor(metadata, numeric))}")
    parameters = _object(body.get("parameters"), "parameters")
    tensor = body["inputs"][0]
    instances, used = _instances(tensor, binary, metadata, numeric)
    if used != len(binary):
        raise BadRequest(f"{len(binary) - used} bytes of binary data follow the tensors that claim theirs")
    outputs = body.get("outputs")
    if outputs is not None and (not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)):
        raise BadRequest('"outputs" must be a list of {"name": ...} objects')
    request_id = body.get("id")
    return InferRequest(id=request_id if isinstance(request_id, str) else None, instances=instances,
                        parameters=parameters, outputs=None if outputs is None else [o["name"] for o in outputs],
                        binary={o["name"] for o in outputs or [] if _object(o.get("parameters"), "outputs' "
                                "parameters").get("binary_data")},
                        binary_default=bool(parameters.get("binary_data_output")))


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f'"{where}" must be an object, got {type(value).__name__}')
    return value


def _describe(tensor: dict[str, Any]) -> str:
    return f"{tensor['name']!r}: {tensor['datatype']} {tensor['shape']}"


def _instances(tensor: dict[str, Any], binary: bytes, metadata: dict[str, Any], numeric: bool) -> tuple[list, int]:
    expected = _describe(input_tensor(metadata, numeric))
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not 0 < len(shape) <= 8 or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_ELEMENTS for n in shape):
        raise BadRequest(f"input shape {str(shape)[:100]}: up to 8 sizes from 0 to {MAX_ELEMENTS}, the batch "
                         f"first; this model takes {expected}")
    size = math.prod(shape)
    if size > MAX_ELEMENTS:
        raise BadRequest(f"input shape {shape} holds more than {MAX_ELEMENTS} elements", status=413)
    parameters = _object(tensor.get("parameters"), "input parameters")
    nbytes = parameters.get("binary_data_size")
    if nbytes is not None and (not isinstance(nbytes, int) or isinstance(nbytes, bool)
                               or not 0 <= nbytes <= len(binary)):
        raise BadRequest(f"binary_data_size {nbytes!r}: more than the {len(binary)} bytes that follow the JSON")
    if datatype == "BYTES":
        items = _bytes_elements(binary[:nbytes]) if nbytes is not None else _flat(tensor.get("data"))
        if len(items) != size:
            raise BadRequest(f"input shape {shape} holds {size} elements, the data has {len(items)}")
        return [_text_instance(item) for item in items], nbytes or 0
    if datatype not in NUMERIC:
        raise BadRequest(f"input datatype {datatype!r}; one of {', '.join([*NUMERIC, 'BYTES'])}; "
                         f"this model takes {expected}")
    if not numeric:
        raise BadRequest(f"input datatype {datatype}: this model takes {expected}")
    if nbytes is not None:
        dtype = np.dtype(NUMERIC[datatype]).newbyteorder("<")  # the extension's byte order
        if nbytes != size * dtype.itemsize:
            raise BadRequest(f"binary_data_size {nbytes}: shape {shape} of {datatype} is {size * dtype.itemsize} bytes")
        array = np.frombuffer(binary[:nbytes], dtype=dtype)
    else:
        data = _flat(tensor.get("data"))
        if any(isinstance(value, bool) for value in data) != (datatype == "BOOL"):
            raise BadRequest(f"input data: true/false values and datatype {datatype} do not match")
        if len(data) != size:
            raise BadRequest(f"input shape {shape} holds {size} elements, the data has {len(data)}")
        try:
            array = np.asarray(data, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            raise BadRequest(f"input data: not all numbers; this model takes {expected}") from None
    features = math.prod(metadata["input_shape"])
    if len(shape) < 2 or math.prod(shape[1:]) != features:
        raise BadRequest(f"input shape {shape}: this model takes {expected} (each instance {features} numbers)")
    return list(array.astype(np.float32).reshape(shape[0], features)), nbytes or 0


def _flat(data: Any) -> list:
    """``data``, flat or nested as the shape (both are allowed)."""
    if not isinstance(data, list):
        raise BadRequest(f'input "data" must be a list, got {type(data).__name__}; ' + EXPECTED)
    flat, pending = [], [iter(data)]
    while pending:  # (no recursion: a hostile nesting depth is only a long loop)
        for value in pending[-1]:
            if isinstance(value, list):
                pending.append(iter(value))
                break
            flat.append(value)
        else:
            pending.pop()
    return flat


def _bytes_elements(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest("binary BYTES data: a length prefix is cut short")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest("binary BYTES data: an element runs past the data")
        items.append(raw[offset:offset + length])
        offset += length
    return items


def _text_instance(item: Any) -> Any:
    """A BYTES element: text (a prompt, a PNG in base64), or a JSON object (a task's instance options)."""
    if isinstance(item, bytes):
        try:
            item = item.decode()
        except UnicodeDecodeError:
            raise BadRequest("a BYTES element is not UTF-8 text") from None
    if not isinstance(item, str):
        raise BadRequest(f"a BYTES element must be a string, got {type(item).__name__}")
    if item.startswith("{"):
        return parse_json(item.encode(), "a BYTES element that starts with { must be a JSON object")
    return item


def response(model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray]
             ) -> tuple[bytes, dict[str, str]]:
    """The infer answer: JSON, or JSON then binary tensors where the request asked for them."""
    if request.outputs is not None:
        if unknown := [name for name in request.outputs if name not in outputs]:
            raise BadRequest(f"no output {unknown[0]!r}; this model's outputs: {', '.join(outputs)}")
        outputs = {name: outputs[name] for name in request.outputs}
    tensors, blobs = [], []
    for name, array in outputs.items():
        datatype = "BYTES" if array.dtype.kind in "OUS" else DATATYPE[array.dtype]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in request.binary or (request.outputs is None and request.binary_default):
            blob = _bytes_blob(array) if datatype == "BYTES" else array.astype(array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = [str(v) for v in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist()
        tensors.append(tensor)
    answer = {"model_name": model, "model_version": version, "outputs": tensors}
    if request.id is not None:
        answer["id"] = request.id
    header = json.dumps(answer, allow_nan=False).encode()  # (NaN is not JSON: a model that diverged fails)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _bytes_blob(array: np.ndarray) -> bytes:
    parts = []
    for value in array.reshape(-1):
        data = value if isinstance(value, bytes) else str(value).encode()
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)
