"""Why a served model answered what it did: Captum attributions of one output to the raw inputs.

The registered model takes raw inputs (its preprocessing is inside), so attributions come in the
data's own units: per pixel, per named feature, per past time step, or per token (through the token
embedding, as token ids have no gradient). Every method runs on the version as it is served (its
``torch.export`` program); for text, unflattened, so that the embedding layer can be found.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from deepyard.explain.options import MAX_STEPS, ExplainOptions
from deepyard.serve.payloads import BadRequest

INTERNAL_BATCH = 64  # points of an integrated-gradients path evaluated at once: bounds the memory
# Integrated gradients add up to the change in output (completeness); more steps close the gap
COMPLETENESS = 0.01


class ExplainTimeout(Exception):
    """The request's explanations did not finish within the endpoint's time limit."""


def input_kind(metadata: dict[str, Any]) -> str:
    """image | text | series (a forecast's window: time steps x features) | table."""
    if metadata.get("vocab"):
        return "text"
    shape = metadata["input_shape"]
    if len(shape) == 3:
        return "image"
    return "series" if metadata.get("series") or len(shape) == 2 else "table"


def explained_output(metadata: dict[str, Any], name: str) -> str:
    """What the task's explanations attribute ("class" or "value"); BadRequest if it has none."""
    from deepyard.tasks import TASKS

    task = metadata.get("task")
    if fair := metadata.get("fair_decisions"):
        raise BadRequest(f"{name} decides by per-group thresholds ({fair['mitigation']}), which have no gradient "
                         "to attribute; explain the version it thresholds (its tag fairness.mitigates_version)")
    explains = getattr(TASKS.get(task), "explains", None)
    if explains is None:
        able = [task_name for task_name, kind in TASKS.items() if getattr(kind, "explains", None)]
        raise BadRequest(f"{name} is a {task} model; explanations are for {' and '.join(able)} models (an output "
                         "per input to attribute)")
    return explains


def explainable_module(name: str, version: str, metadata: dict[str, Any], served: nn.Module | None = None,
                       uri: str | None = None) -> nn.Module:
    """What a version's explanations run on: the module it is served with (``served``, else loaded),
    or, for text, its exported program unflattened (the token embedding is found by its layer)."""
    from deepyard import tracking

    if metadata.get("vocab") or served is None:
        module = (tracking.load_exported(name, version, uri) if metadata.get("vocab")
                  else tracking.load_model(name, version, uri)[0])
    else:
        module = served
    if module is None or isinstance(module, torch.jit.ScriptModule):
        raise BadRequest(f"{name} version {version} was logged as TorchScript (an int8 model): it has no "
                         "gradients to explain with; explain the float model it was made from")
    return module


class Explainer:
    """Attributions for one served version. ``module``: raw inputs -> served outputs (probabilities,
    or values in the target's units)."""

    def __init__(self, module: nn.Module, metadata: dict[str, Any], name: str = "the model"):
        self.explains = explained_output(metadata, name)
        self.module, self.metadata, self.name = module, metadata, name
        self.kind = input_kind(metadata)
        self.token_layer = token_embedding(module, len(metadata["vocab"])) if self.kind == "text" else None
        self.mean, self.std = training_stats(module)

    def explain(self, inputs: np.ndarray, options: ExplainOptions, deadline: float | None = None,
                refine: bool = True) -> list[dict]:
        """One explanation per instance of ``inputs`` (decoded as for predict). Raises BadRequest for
        an option this model cannot take, ExplainTimeout past ``deadline`` (time.monotonic).
        ``refine=False``: integrated gradients keep the steps asked for, however incomplete."""
        if self.kind == "text" and options.method == "saliency":
            raise BadRequest("saliency is the gradient with respect to the input, and token ids have none; "
                             "text models take method integrated_gradients or gradient_shap")
        x = torch.as_tensor(inputs)
        with torch.no_grad():
            outputs = self.module(x)
        targets = self._targets(outputs, options.target)
        baseline_name, baselines = self._baselines(x, options.baseline)
        explained = []
        for index in range(len(x)):
            if deadline is not None and time.monotonic() > deadline:
                raise ExplainTimeout(f"explained {index} of {len(x)} instances before the time limit")
            one, start = x[index:index + 1], baselines[index:index + 1]
            with torch.no_grad():
                scores = self._score(self.module(torch.cat([one, start])), targets[index])
            # (a change too small to measure completeness against is not refined for)
            tolerance = max(COMPLETENESS * abs(scores[0] - scores[1]), 1e-4 * max(1.0, abs(scores[0])))
            attributions, delta, steps = self._attribute(one, start, targets[index], options,
                                                         tolerance if refine else None, deadline)
            explanation = {"target": self._target_name(targets[index]), "method": options.method,
                           "baseline": baseline_name, "output": scores[0], "baseline_output": scores[1],
                           **self._describe(one[0].numpy(), attributions, options)}
            if delta is not None:  # completeness: the attributions add up to output - baseline_output
                explanation.update(convergence_delta=delta, n_steps=steps)
            explained.append(explanation)
        return explained

    # -- targets and baselines ------------------------------------------------------------------

    def _targets(self, outputs: torch.Tensor, asked: str | int | None) -> list[int | None]:
        if self.explains == "class":
            names = self.metadata.get("class_names") or [str(i) for i in range(outputs.shape[-1])]
            if asked is None:
                return outputs.argmax(-1).tolist()
            if isinstance(asked, str) and asked not in names and asked.isdigit():  # (a name first, then an index)
                asked = int(asked)
            if isinstance(asked, str) and asked in names:
                return [names.index(asked)] * len(outputs)
            if isinstance(asked, int) and 0 <= asked < len(names):
                return [asked] * len(outputs)
            raise BadRequest(f"target {asked!r} is not a class of {self.name}: one of {names} "
                             f"(or an index 0..{len(names) - 1})")
        if outputs.ndim == 1:  # one value per instance
            if asked not in (None, 0):
                raise BadRequest(f"target {asked!r}: {self.name} predicts one value; leave target out")
            return [None] * len(outputs)
        steps = outputs.shape[-1]
        step = 0 if asked is None else int(asked) if isinstance(asked, str) and asked.isdigit() else asked
        if not isinstance(step, int) or not 0 <= step < steps:
            raise BadRequest(f"target {asked!r}: {self.name} forecasts {steps} steps; give a step 0..{steps - 1}")
        return [step] * len(outputs)

    def _target_name(self, target: int | None) -> str | int | None:
        names = self.metadata.get("class_names")
        return names[target] if names and target is not None else target

    @staticmethod
    def _score(outputs: torch.Tensor, target: int | None) -> list[float]:
        return (outputs if target is None else outputs[:, target]).tolist()

    def _baselines(self, x: torch.Tensor, asked: str) -> tuple[str, torch.Tensor]:
        # auto: the training mean (a black image's attributions mostly repeat the image, whatever the
        # model: they fail Adebayo et al.'s randomization check; bench/explain_quality.py)
        automatic = "unk" if self.kind == "text" else "mean" if self.mean is not None else "zeros"
        name = asked if asked != "auto" else automatic
        if self.kind == "text":  # every word unknown; padding stays padding, so the attention mask is the same
            if name != "unk":
                raise BadRequest(f"baseline {name}: a text model's baseline is unk (every word <unk>)")
            return name, torch.where(x == 0, 0, 1)  # ids 0 and 1: <pad> and <unk>
        if name == "unk":
            raise BadRequest("baseline unk is for text models; this one takes zeros or mean")
        if name == "mean":
            if self.mean is None:
                raise BadRequest(f"baseline mean: {self.name} keeps no training statistics; use baseline zeros")
            return name, self.mean.expand_as(x).clone()
        return name, torch.zeros_like(x)

    def _shap_baselines(self, start: torch.Tensor) -> torch.Tensor:
        """Gradient SHAP's distribution of baselines: the chosen one and noisy copies of it (text: the
        <unk> sequence alone; interpolation happens at the embedding)."""
        if self.kind == "text":
            return start
        spread = self.std if self.std is not None else torch.ones_like(start[0])
        noise = torch.randn((8, *start.shape[1:]), generator=torch.Generator().manual_seed(0)) * spread
        return torch.cat([start, start + noise])

    # -- attributions -----------------------------------------------------------------------------

    def _attribute(self, one: torch.Tensor, start: torch.Tensor, target: int | None, options: ExplainOptions,
                   tolerance: float | None, deadline: float | None) -> tuple[np.ndarray, float | None, int]:
        """(attributions, convergence delta, steps taken). Integrated gradients take more steps (x4,
        up to MAX_STEPS) while their convergence delta is over ``tolerance`` (None: never)."""
        from captum import attr

        layer = self.token_layer
        steps = options.steps
        # Token ids through a layer method: Captum may add (zero) noise to the inputs, making them
        # floats, which an embedding refuses
        forward = self.module if layer is None else (lambda ids: self.module(ids.round().long()))
        if options.method == "saliency":
            method = attr.Saliency(self.module)
            return method.attribute(one.float(), target=target, abs=False)[0].detach().numpy(), None, 1
        if options.method == "integrated_gradients":
            method = (attr.LayerIntegratedGradients(forward, layer) if layer is not None
                      else attr.IntegratedGradients(forward))
            while True:
                result, delta = method.attribute(one, baselines=start, target=target, n_steps=steps,
                                                 internal_batch_size=INTERNAL_BATCH, return_convergence_delta=True)
                if tolerance is None or abs(float(delta)) <= tolerance or steps >= MAX_STEPS:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise ExplainTimeout(f"integrated gradients had taken {steps} steps at the time limit")
                steps = min(4 * steps, MAX_STEPS)
        else:  # gradient_shap: seeded, so the same request gets the same answer
            method = (attr.LayerGradientShap(forward, layer) if layer is not None
                      else attr.GradientShap(forward))
            with _seeded(0):
                result, delta = method.attribute(one, baselines=self._shap_baselines(start), target=target,
                                                 n_samples=options.steps, return_convergence_delta=True)
                delta = delta.abs().mean()  # (one per sample: their errors must not cancel out)
        result = result[0].detach()
        if layer is not None:  # (tokens, embedding width) -> one attribution per token
            result = result.sum(-1)
        return result.numpy(), float(delta), steps

    # -- what each explanation says ---------------------------------------------------------------

    def _describe(self, raw: np.ndarray, attributions: np.ndarray, options: ExplainOptions) -> dict[str, Any]:
        top_k = options.top_attributions
        if self.kind == "text":
            vocab = self.metadata["vocab"]
            kept = np.flatnonzero(raw != 0)  # (padding is not part of the text)
            tokens, values = [vocab[int(i)] for i in raw[kept]], attributions[kept]
            top = [{"token": tokens[i], "position": int(i), "attribution": float(values[i])}
                   for i in _largest(values, top_k)]
            return {"tokens": tokens, "attributions": values.tolist(), "top": top}
        if self.kind == "table":
            names = self.metadata.get("feature_names") or [f"x{i}" for i in range(raw.size)]
            flat, values = raw.reshape(-1), attributions.reshape(-1)
            top = [{"feature": names[i], "value": float(flat[i]), "attribution": float(values[i])}
                   for i in _largest(values, top_k)]
            return {"features": names, "attributions": values.tolist(), "top": top}
        if self.kind == "series":  # one attribution per past step (summed over the window's features)
            steps = attributions.reshape(len(attributions), -1).sum(-1)
            labels = [f"t-{len(steps) - i}" for i in range(len(steps))]
            top = [{"step": labels[i], "value": raw[i].tolist(), "attribution": float(steps[i])}
                   for i in _largest(steps, top_k)]
            return {"steps": labels, "step_attributions": steps.tolist(), "attributions": attributions.tolist(),
                    "top": top}
        top = [{"pixel": [int(v) for v in np.unravel_index(i, raw.shape)], "value": float(raw.flat[i]),
                "attribution": float(attributions.flat[i])} for i in _largest(attributions.reshape(-1), top_k)]
        described = {"attributions": attributions.tolist(), "top": top}
        if options.heatmap:
            from deepyard.explain import pictures

            described["heatmap_png"] = pictures.heatmap_base64(raw, attributions, self.metadata.get("pixel_max", 1.0))
        return described


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Captum samples with torch's and numpy's global generators: seed both, then put them back."""
    state = np.random.get_state()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield
    finally:
        np.random.set_state(state)


def _largest(values: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest |values|, largest first."""
    return [int(i) for i in np.argsort(-np.abs(values), kind="stable")[:k]]


def token_embedding(module: nn.Module, vocab_size: int) -> nn.Module:
    """The layer that turns token ids into vectors: a leaf embedding with a row per vocabulary entry
    (an exported program's embedding is a graph calling aten.embedding; positions have fewer rows)."""
    found = []
    for name, layer in module.named_modules():
        if next(layer.children(), None) is not None:
            continue
        graph = getattr(layer, "graph", None)
        embeds = isinstance(layer, nn.Embedding) or (graph is not None and any(
            node.target is torch.ops.aten.embedding.default for node in graph.nodes))
        weight = getattr(layer, "weight", None)
        if embeds and weight is not None and weight.shape[0] == vocab_size:
            found.append(name)
    if len(found) > 1:  # (as many positions as vocabulary entries: the zoo names its layer "tokens")
        found = [name for name in found if "token" in name.rsplit(".", 1)[-1]] or found
    if len(found) != 1:
        seen = ", ".join(found) or "no embedding with a row per vocabulary entry"
        raise BadRequest(f"cannot tell which layer embeds the tokens ({seen}); per-token attributions need one")
    return module.get_submodule(found[0])


def training_stats(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The training split's mean and std the served pipeline standardizes with (None: it has none)."""
    buffers = {name.rsplit(".", 1)[-1]: value for name, value in module.named_buffers()
               if name.endswith(("standardize.mean", "standardize.std"))}
    return buffers.get("mean"), buffers.get("std")
