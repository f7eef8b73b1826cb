"""Explanations: Captum attributions of served models (exported, as they are registered), then the
/explain route over real HTTP on real Serve, `deepyard explain`, and a train job's `explain:`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepyard.explain.attributions import Explainer
from deepyard.explain.options import ExplainOptions
from deepyard.models.pipeline import Pipeline
from deepyard.models.registry import MODELS
from deepyard.serve.payloads import BadRequest
from deepyard.tasks.classification import Probabilities
from deepyard.tasks.regression import Rescale

VOCAB = ["<pad>", "<unk>", "good", "bad", "film", "plot", "great", "dull"]


def exported(module: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """The module as a registered version serves it: a torch.export program, unflattened."""
    program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return torch.export.unflatten(program)


def served(name: str, in_shape: tuple[int, ...], outputs: int, *, task: str, params: dict | None = None,
           stats: bool = True, **metadata) -> tuple[Explainer, torch.Tensor]:
    torch.manual_seed(0)
    net = MODELS.build(name, params or {}, in_shape=in_shape, num_outputs=outputs,
                       vocab_size=len(metadata.get("vocab", [])) or None)
    if metadata.get("vocab"):
        x = torch.randint(2, len(VOCAB), (4, *in_shape))
        x[0, 5:] = 0  # a short text, padded
    else:
        x = torch.rand(4, *in_shape) * 10
    stats_ = (np.full(in_shape, 5.0, np.float32), np.full(in_shape, 3.0, np.float32)) if stats else None
    pipeline = Pipeline(net, stats_)
    head = Probabilities(pipeline) if task == "classification" else Rescale(pipeline, 2.0, 4.0)
    metadata = {"task": task, "input_shape": list(in_shape), **metadata}
    return Explainer(exported(head, x), metadata, "m"), x


@pytest.mark.parametrize("kind", ["image", "table", "series", "text"])
def test_integrated_gradients_add_up_to_the_change_in_output(kind):
    explainer, x = {
        "image": lambda: served("cnn", (1, 8, 8), 10, task="classification", pixel_max=16.0,
                                class_names=[str(i) for i in range(10)]),
        "table": lambda: served("mlp", (5,), 3, task="classification", feature_names=list("abcde")),
        "series": lambda: served("lstm", (12, 1), 1, task="regression", params={"hidden_size": 8}),
        "text": lambda: served("transformer_encoder", (8,), 2, task="classification", stats=False, vocab=VOCAB,
                               params={"width": 16, "layers": 1, "heads": 2}),
    }[kind]()
    explanations = explainer.explain(x.numpy(), ExplainOptions(steps=200))
    assert len(explanations) == len(x)
    for one, raw in zip(explanations, x):
        change = one["output"] - one["baseline_output"]
        assert abs(one["convergence_delta"]) <= 0.01 * abs(change) + 1e-4, one  # (untrained: small changes)
        total = np.sum(one["step_attributions"] if kind == "series" else one["attributions"])
        assert total == pytest.approx(change, rel=0.01, abs=1e-4)
        assert len(one["top"]) == min(5, np.asarray(one["attributions"]).size)
    if kind == "image":
        assert np.asarray(explanations[0]["attributions"]).shape == (1, 8, 8)
        assert explanations[0]["baseline"] == "zeros"
    if kind == "table":
        assert explanations[0]["features"] == list("abcde") and explanations[0]["baseline"] == "mean"
        same_start = explainer.explain(x.numpy(), ExplainOptions(target=0))  # (one baseline: the training mean)
        assert same_start[0]["baseline_output"] == pytest.approx(same_start[1]["baseline_output"])
    if kind == "series":
        assert explanations[0]["steps"][-1] == "t-1" and len(explanations[0]["step_attributions"]) == 12
    if kind == "text":  # padding is not part of the text
        assert len(explanations[0]["tokens"]) == 5 and len(explanations[1]["tokens"]) == 8
        assert explanations[0]["tokens"] == [VOCAB[i] for i in x[0, :5]]


def test_methods_targets_and_heatmaps():
    explainer, x = served("cnn", (1, 8, 8), 3, task="classification", pixel_max=16.0, class_names=["a", "b", "c"])
    asked = explainer.explain(x[:2].numpy(), ExplainOptions(target="c", method="gradient_shap", steps=20,
                                                            heatmap=True))
    assert [one["target"] for one in asked] == ["c", "c"]
    assert asked[0]["heatmap_png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature
    again = explainer.explain(x[:2].numpy(), ExplainOptions(target="c", method="gradient_shap", steps=20))
    assert again[0]["attributions"] == asked[0]["attributions"]  # seeded: the same request, the same answer
    saliency = explainer.explain(x[:1].numpy(), ExplainOptions(method="saliency", target=1))
    assert saliency[0]["target"] == "b" and "convergence_delta" not in saliency[0]


@pytest.mark.parametrize("options, message", [
    ({"target": "zebra"}, "not a class"),
    ({"target": 7}, "not a class"),
    ({"baseline": "unk"}, "for text models"),
])
def test_options_a_model_cannot_take_are_bad_requests(options, message):
    explainer, x = served("mlp", (5,), 3, task="classification", stats=False)
    with pytest.raises(BadRequest, match=message):
        explainer.explain(x.numpy(), ExplainOptions(**options))
    if "baseline" not in options:
        return
    with pytest.raises(BadRequest, match="no training statistics"):
        explainer.explain(x.numpy(), ExplainOptions(baseline="mean"))


def test_text_models_refuse_saliency_and_models_without_one_output_per_input_are_refused():
    explainer, x = served("transformer_encoder", (8,), 2, task="classification", stats=False, vocab=VOCAB,
                          params={"width": 16, "layers": 1, "heads": 2})
    with pytest.raises(BadRequest, match="token ids have none"):
        explainer.explain(x.numpy(), ExplainOptions(method="saliency"))
    with pytest.raises(BadRequest, match="generation model"):
        Explainer(torch.nn.Identity(), {"task": "generation", "input_shape": [4]}, "gan")
