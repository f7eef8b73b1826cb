"""Explanations: Captum attributions of served models (exported, as they are registered), then the
/explain route over real HTTP on real Serve, `deepyard explain`, and a train job's `explain:`."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
import torch

from conftest import free_port, last_json
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


# (the image model's 3 s: make test-fast skips it)
@pytest.mark.parametrize("kind", [pytest.param("image", marks=pytest.mark.slow), "table", "series", "text"])
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
        assert explanations[0]["baseline"] == "mean"
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
    shap = explainer.explain(x[:1].numpy(), ExplainOptions(method="gradient_shap", steps=8, target="1"))
    assert len(shap[0]["attributions"]) == 5 and shap[0]["target"] == 1  # ("1" is no class name: an index)
    with pytest.raises(BadRequest, match="generation model"):
        Explainer(torch.nn.Identity(), {"task": "generation", "input_shape": [4]}, "gan")


# -- served, over real HTTP ------------------------------------------------------------------------

DIGITS = """
kind: train
name: explain_digits
data: {name: digits, max_train_samples: 400}
model: {name: cnn, params: {channels: [8], hidden_sizes: [16]}}
train: {epochs: 2, batch_size: 32}
register: {model_name: explain-digits}
explain: {examples: 3, method: gradient_shap, steps: 20}
"""
CANCER = """
kind: train
name: explain_cancer
data: {name: breast_cancer}
model: {name: mlp, params: {hidden_sizes: [16]}}
train: {epochs: 3, batch_size: 32}
register: {model_name: explain-cancer}
"""
REVIEWS = """
kind: train
name: explain_reviews
data: {name: text_csv, params: {path: PATH, text: review, label: stars, max_length: 8}}
model: {name: transformer_encoder, params: {width: 16, layers: 1, heads: 2}}
train: {epochs: 3, batch_size: 16}
register: {model_name: explain-reviews}
"""


@pytest.fixture(scope="module")
def explained(ray_cluster, tmp_path_factory):
    """An image, a table and a text classifier, trained, registered and deployed together."""
    from ray import serve
    from typer.testing import CliRunner

    from deepyard.cli import app
    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions

    folder = tmp_path_factory.mktemp("explain")
    reviews = folder / "reviews.csv"
    reviews.write_text("review,stars\n" + "\n".join(f'"great fun film {i}",good\n"dull slow plot {i}",bad'
                                                      for i in range(40)))
    runs = {}
    for name, text in (("digits", DIGITS), ("cancer", CANCER), ("reviews", REVIEWS.replace("PATH", str(reviews)))):
        spec = folder / f"{name}.yaml"
        spec.write_text(text)
        result = CliRunner().invoke(app, ["run", str(spec), "--json"])
        assert result.exit_code == 0, result.stdout + result.stderr
        runs[name] = last_json(result)["run_id"]
    port = free_port()
    options = [EndpointOptions(model=f"explain-{name}:1", num_cpus=0.5, max_explain_instances=4)
               for name in ("digits", "cancer", "reviews")]
    deploy.start(options, host="127.0.0.1", port=port)
    yield {"url": f"http://127.0.0.1:{port}", "runs": runs}
    serve.shutdown()


@pytest.fixture()
def base(explained) -> str:
    return explained["url"]


def explain(base: str, name: str, body) -> httpx.Response:
    return httpx.post(f"{base}/models/{name}/explain", json=body, timeout=60)


@pytest.mark.slow
def test_an_image_model_explains_its_predictions_per_pixel(base):
    import base64
    import io

    from PIL import Image

    from deepyard import tracking

    images = tracking.input_example("explain-digits", "1")[:2].tolist()
    answer = explain(base, "explain-digits", {"instances": images, "steps": 128, "heatmap": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    predicted = httpx.post(f"{base}/models/explain-digits/predict", json={"instances": images}, timeout=30).json()
    assert body["predictions"] == predicted["predictions"] and body["version"] == "1"
    for one, prediction in zip(body["explanations"], body["predictions"]):
        assert one["target"] == prediction["label"] and np.asarray(one["attributions"]).shape == (1, 8, 8)
        change = one["output"] - one["baseline_output"]
        assert abs(one["convergence_delta"]) <= 0.02 * abs(change) + 1e-4
        assert Image.open(io.BytesIO(base64.b64decode(one["heatmap_png"]))).format == "PNG"


@pytest.mark.slow
def test_table_and_text_models_name_their_features_and_tokens(base):
    from deepyard import tracking

    rows = tracking.input_example("explain-cancer", "1")[:1].tolist()
    table = explain(base, "explain-cancer", {"instances": rows, "top_attributions": 3}).json()["explanations"][0]
    names = tracking.model_metadata("explain-cancer", "1")["feature_names"]
    assert table["features"] == names and table["baseline"] == "mean" and len(table["top"]) == 3
    assert {entry["feature"] for entry in table["top"]} <= set(names)

    text = {"instances": ["great fun film", "dull slow plot"], "target": "good"}
    answer = explain(base, "explain-reviews", text)
    assert answer.status_code == 200, answer.text
    first, second = answer.json()["explanations"]
    assert first["tokens"] == ["great", "fun", "film"] and len(first["attributions"]) == 3
    assert first["target"] == second["target"] == "good" and first["baseline"] == "unk"
    # KServe v1's :explain (HAProxy hands it to the model's own route): the same answer
    v1 = httpx.post(f"{base}/v1/models/explain-reviews:explain", json=text, timeout=60)
    assert v1.status_code == 200 and v1.json()["explanations"] == answer.json()["explanations"]


@pytest.mark.slow
@pytest.mark.parametrize("name, body, status, message", [
    ("explain-digits", {"instances": [[0] * 64], "method": "lime"}, 400, "method"),
    ("explain-digits", {"instances": [[0] * 64], "steps": 1}, 400, "steps"),
    ("explain-digits", {"instances": [[0] * 64], "steps": 100000}, 400, "steps"),
    ("explain-digits", {"instances": [[0] * 64], "target": "zebra"}, 400, "not a class"),
    ("explain-digits", {"instances": [[0] * 64], "methd": "saliency"}, 400, "methd"),
    ("explain-digits", {"instances": [[0] * 64] * 5}, 413, "limit of 4"),
    ("explain-digits", [[0] * 64], 400, "instances"),
    ("explain-digits", {"instances": [[0] * 63]}, 400, "instances[0]"),
    ("explain-reviews", {"instances": ["great"], "method": "saliency"}, 400, "token ids have none"),
    ("explain-reviews", {"instances": ["great"], "baseline": "zeros"}, 400, "unk"),
    ("explain-cancer", {"instances": [[0] * 30], "baseline": "unk"}, 400, "text models"),
])
def test_bad_explain_requests_get_a_4xx_and_the_endpoint_keeps_answering(base, name, body, status, message):
    answer = explain(base, name, body)
    assert answer.status_code == status and message in answer.json()["error"], answer.text
    assert explain(base, "explain-cancer", {"instances": [[1.0] * 30]}).status_code == 200


@pytest.mark.slow
def test_explain_bodies_generated_from_the_openapi_schema_never_get_a_5xx(base):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    root = f"{base}/models/explain-cancer"
    operation = schemathesis.openapi.from_url(f"{root}/openapi.json")["/explain"]["POST"]
    answered = []

    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def fuzz(case):
        response = case.call(base_url=root, timeout=60)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
        answered.append(response.status_code)

    fuzz()
    assert len(answered) >= 40 and explain(base, "explain-cancer", {"instances": [[1.0] * 30]}).status_code == 200


@pytest.mark.slow
def test_cli_explain_prints_attributions_and_writes_pictures(base, cli, tmp_path):
    from deepyard import tracking

    body = tmp_path / "rows.json"
    body.write_text(json.dumps({"instances": tracking.input_example("explain-cancer", "1")[:2].tolist()}))
    result = cli("explain", "explain-cancer:1", "--input", str(body), "--out", str(tmp_path / "pictures"), "--json")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(answer["explanations"]) == 2 and len(answer["pictures"]) == 2
    assert all(open(path, "rb").read(4) == b"\x89PNG" for path in answer["pictures"])
    shown = cli("explain", "explain-cancer:1", "--input", str(body), "--top", "2", "--out", str(tmp_path)).stdout
    assert answer["explanations"][0]["top"][0]["feature"] in shown
    assert "--steps" in cli("explain", "explain-cancer:1", "--input", str(body), "--steps", "0", expect=2).stderr
    assert "explain-nothing" in cli("explain", "explain-nothing:1", "--input", str(body), expect=2).stderr


def test_an_explanation_past_the_time_limit_is_a_503_and_frees_the_replica_after():
    """The endpoint's time limit, on the class the replica uses (no Serve needed for the clock)."""
    from deepyard.serve.app import Loaded
    from deepyard.serve.explaining import Explanations
    from deepyard.serve.options import EndpointOptions
    from deepyard.tasks import codec

    explainer, x = served("cnn", (1, 8, 8), 10, task="classification", pixel_max=16.0)
    loaded = Loaded(None, "1", explainer.metadata, {}, codec("classification"))
    explaining = Explanations("m", "unused", EndpointOptions(model="m", explain_timeout_s=0.3,
                                                             max_explain_instances=64))
    explaining._explainers["1"] = explainer
    body = {"instances": x.reshape(4, -1).tolist() * 16, "steps": 512}

    async def ask():
        started = time.monotonic()
        with pytest.raises(BadRequest, match="explain_timeout_s") as late:
            await explaining.explain(loaded, body)
        assert late.value.status == 503 and time.monotonic() - started < 3
        while explaining._turn.locked() and time.monotonic() - started < 10:  # it stops at the next instance
            await asyncio.sleep(0.01)
        return await explaining.explain(loaded, {"instances": x[:1].reshape(1, -1).tolist(), "steps": 4})

    assert len(asyncio.run(ask())) == 1


@pytest.mark.slow
def test_a_train_jobs_explain_block_logs_pictures_to_its_run(explained):
    from mlflow import MlflowClient

    from deepyard import tracking

    logged = {entry.path for entry in MlflowClient(tracking.tracking_uri()).list_artifacts(
        explained["runs"]["digits"], "explanations")}
    assert logged == {f"explanations/explain_digits-{i}.png" for i in range(3)} | {"explanations/explanations.json"}


@pytest.mark.parametrize("data, model, explain, message", [
    ("digits", "dcgan", "{}", "generation model"),
    ("digits", "mlp", "{method: lime}", "explain.method"),
    ("digits", "mlp", "{target: zebra}", "not a class"),
    ("digits", "mlp", "{baseline: unk}", "for text models"),
    ("digits", "mlp", "{examples: 0}", "explain.examples"),
])
def test_bad_explain_blocks_exit_2_before_ray_starts(cli, write_spec, data, model, explain, message):
    spec = write_spec(f"kind: train\nname: bad_explain\ndata: {{name: {data}}}\nmodel: {{name: {model}}}\n"
                      f"explain: {explain}\n")
    assert message in cli("validate", spec, expect=2).stderr


@pytest.mark.slow
def test_an_int8_version_is_refused_with_the_reason(digits_source, cli, write_spec, tmp_path):
    spec = write_spec("kind: compress\nname: explain_int8\nmodel: digits_source@champion\n"
                      "method: {name: quantize, mode: dynamic}\nregister: {model_name: explain-int8}\n")
    result = last_json(cli("run", spec, "--json"))
    body = tmp_path / "x.json"
    body.write_text(json.dumps({"instances": [[0] * 64]}))
    stderr = cli("explain", f"explain-int8:{result['model_version']}", "--input", str(body), expect=2).stderr
    assert "TorchScript" in stderr and "explain the float model" in stderr
