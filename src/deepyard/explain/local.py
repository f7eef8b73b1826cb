"""Explanations in this process, no endpoint needed: ``deepyard explain`` and a train job's
``explain:`` block. Each explanation's picture is written as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepyard.errors import BadInput
from deepyard.explain.options import ExplainOptions
from deepyard.serve.payloads import BadRequest

MAX_INSTANCES = 64


def explain_version(name: str, version: str, inputs_file: Path, options: ExplainOptions,
                    out: Path | None) -> dict[str, Any]:
    """``inputs_file`` (as ``deepyard predict`` takes it) explained by a registered version:
    {model, version, explanations, pictures}."""
    from deepyard import tracking
    from deepyard.explain.attributions import Explainer, explainable_module, explained_output
    from deepyard.serve.client import request_body
    from deepyard.tasks import codec

    metadata = tracking.model_metadata(name, version)
    try:
        explained_output(metadata, name)
        inputs = codec(metadata.get("task")).decode(request_body(inputs_file), metadata, MAX_INSTANCES)
        explanations = Explainer(explainable_module(name, version, metadata), metadata, name).explain(inputs, options)
    except BadRequest as error:
        raise BadInput(f"{name}:{version}: {error}") from None
    pictures = write_pictures(inputs, explanations, metadata, out, f"{name}-v{version}") if out else []
    return {"model": name, "version": version, "explanations": explanations, "pictures": pictures}


def write_pictures(inputs: np.ndarray, explanations: list[dict], metadata: dict[str, Any], out: Path,
                   stem: str) -> list[str]:
    from deepyard.explain import pictures

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (raw, explanation) in enumerate(zip(inputs, explanations)):
        path = out / f"{stem}-{index}.png"
        path.write_bytes(pictures.png_bytes(pictures.figure_of(raw, explanation, metadata.get("pixel_max", 1.0))))
        written.append(str(path))
    return written
