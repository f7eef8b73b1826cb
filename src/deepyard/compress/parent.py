"""The registered model a compress job starts from: rebuilt from the train spec and the weights that
every supervised version carries (``transfer.SPEC_ARTIFACT``, ``transfer.WEIGHTS_ARTIFACT``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deepyard import tracking, transfer
from deepyard.errors import BadInput


@dataclass
class Parent:
    name: str
    version: str
    run_id: str
    spec: Any  # the TrainJob that trained it
    state: dict[str, torch.Tensor]  # the whole pipeline's: preprocessing and network
    metrics: dict[str, float]  # its registered test metrics

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def load_parent(ref: str, uri: str | None = None, where: str = "model") -> Parent:
    """``NAME@alias`` or ``NAME:version`` -> the parent; a BadInput if it is missing or was not made
    by a supervised train job."""
    from deepyard.serve.options import parse_model_ref
    from deepyard.spec import TrainJob, load_spec

    name, alias, version = parse_model_ref(ref)
    found = tracking.model_version(name, alias=alias, version=version, uri=uri)
    pinned = f"{name}:{found['version']}"
    spec_file = tracking.download(found["run_id"], transfer.SPEC_ARTIFACT, uri)
    weights_file = tracking.download(found["run_id"], transfer.WEIGHTS_ARTIFACT, uri)
    if spec_file is None or weights_file is None:
        raise BadInput(f"{where}: {pinned} carries no {transfer.SPEC_ARTIFACT} and weights: only supervised models "
                       "registered by a train (or compress) job can be compressed; an int8 version is final")
    spec = load_spec(spec_file)
    if not isinstance(spec, TrainJob):
        raise BadInput(f"{where}: {pinned} was made by a {spec.kind} job; compress takes supervised models")
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    return Parent(name, found["version"], found["run_id"], spec, state, found["metrics"])


def rebuild(parent: Parent, splits, where: str = "model"):
    """(the parent's pipeline with its weights loaded, in eval mode; its task)."""
    from deepyard.runners.setup import build

    pipeline, task = build(parent.spec, splits)
    try:
        pipeline.load_state_dict(parent.state)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)[:200]
        raise BadInput(f"{where}: {parent.ref}'s weights do not fit the network its train spec builds ({first}); "
                       "a structurally pruned version cannot be rebuilt from its spec: compress its parent") from None
    return pipeline.eval(), task
