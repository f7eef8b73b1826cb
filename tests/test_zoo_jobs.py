"""The sequence and generative zoo end to end: a character GPT, a text classifier and a DCGAN trained
through the CLI on the session's real Ray cluster, tracked in real MLflow, then served by real Ray
Serve over HTTP."""

from __future__ import annotations

import base64
import math

import httpx
import pytest
import torch

from deepyard import tracking
from tests.conftest import last_json

pytestmark = pytest.mark.slow

TINY_GPT = """
kind: train
name: tiny_gpt
data:
  name: shakespeare_char
  params: {context_length: 32, plays: [macbeth]}
  val_fraction: 0.05
  test_fraction: 0.05
  max_train_samples: 300
model: {name: transformer_decoder, params: {width: 32, layers: 1, heads: 2, dropout: 0.0}}
optim: {name: adamw, lr: 0.003}
train: {epochs: 2, batch_size: 32, grad_clip: 1.0}
register: {model_name: tiny-gpt}
"""

TINY_BERT = """
kind: train
name: tiny_bert
data:
  name: rotten_tomatoes
  params: {max_length: 24}
  max_train_samples: 400
model: {name: transformer_encoder, params: {width: 32, layers: 1, heads: 2}}
train: {epochs: 1, batch_size: 32}
register: {model_name: tiny-bert}
"""

TINY_GAN = """
kind: train
name: tiny_gan
data: {name: digits, max_train_samples: 300}
model: {name: dcgan, params: {latent_dim: 8, width: 16}}
optim: {name: adam, lr: 0.001, params: {betas: [0.5, 0.999]}}
train: {epochs: 2, batch_size: 32}
register: {model_name: tiny-gan}
"""


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    from typer.testing import CliRunner

    from deepyard.cli import app

    folder = tmp_path_factory.mktemp("text_jobs")
    results = {}
    for name, text in (("gpt", TINY_GPT), ("bert", TINY_BERT), ("gan", TINY_GAN)):
        spec = folder / f"{name}.yaml"
        spec.write_text(text)
        result = CliRunner().invoke(app, ["run", str(spec), "--json"])
        assert result.exit_code == 0, result.stderr
        results[name] = last_json(result)
    return results


def test_language_model_run_is_tracked_with_bits_samples_and_a_servable_model(trained):
    run = tracking.client().get_run(trained["gpt"]["run_id"])
    metrics = run.data.metrics
    assert metrics["val_bits_per_token"] == pytest.approx(metrics["val_loss"] / math.log(2))
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    vocab = tracking.model_metadata("tiny-gpt", trained["gpt"]["model_version"])["vocab"]
    assert metrics["test_loss"] < math.log(len(vocab))  # better than uniform over the characters
    assert metrics["train_samples"] == 300  # windows, not tokens (the sums count tokens)
    first, last = (tracking.metric_history(run.info.run_id, "train_loss")[i][1] for i in (0, -1))
    assert last < first
    artifacts = {a.path for a in tracking.client().list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/epoch_0001.txt", "samples/epoch_0002.txt"}
    module, metadata = tracking.load_model("tiny-gpt", trained["gpt"]["model_version"])
    assert metadata["task"] == "language_model" and metadata["token_level"] == "char"
    assert metadata["vocab"][:2] == ["<pad>", "<unk>"] and metadata["input_shape"] == [32]
    with torch.inference_mode():
        log_probs = module(torch.as_tensor(tracking.input_example("tiny-gpt", trained["gpt"]["model_version"])))
    assert log_probs.shape == (5, 32, len(metadata["vocab"]))
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(5, 32))


def test_text_classifier_run_reports_accuracy_f1_and_confusion(trained):
    metrics = trained["bert"]["metrics"]
    assert metrics["test_accuracy"] > 0.55 and metrics["test_f1_macro"] > 0  # (58% are fresh: a tiny run barely learns)
    artifacts = {a.path for a in tracking.client().list_artifacts(trained["bert"]["run_id"], "plots")}
    assert "plots/confusion_matrix.png" in artifacts


def test_gan_run_is_judged_by_a_reference_classifier_and_logs_image_grids(trained):
    run_id = trained["gan"]["run_id"]
    metrics = tracking.client().get_run(run_id).data.metrics
    assert {"train_d_loss", "train_g_loss", "val_d_loss", "val_g_loss", "val_quality", "val_confident_share",
            "val_min_class_share", "test_quality", "test_reference_accuracy"} <= set(metrics)
    assert metrics["test_reference_accuracy"] > 0.8  # the judge itself reads real digits well
    balance = min(1.0, metrics["val_min_class_share"] * 10)
    assert metrics["val_quality"] == pytest.approx(metrics["val_confident_share"] * balance)
    samples = {a.path for a in tracking.client().list_artifacts(run_id, "samples")}
    assert samples == {"samples/epoch_0001.png", "samples/epoch_0002.png"}
    metadata = tracking.model_metadata("tiny-gan", trained["gan"]["model_version"])
    assert metadata["task"] == "generation" and metadata["input_shape"] == [8]
    assert metadata["image_shape"] == [1, 8, 8] and metadata["pixel_max"] == 16.0


@pytest.mark.long  # ~25 s: an endpoint of the zoo's models (make test covers serving in test_serve)
def test_zoo_models_served_over_http(trained):
    from ray import serve

    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions
    from tests.test_serve import free_port

    port = free_port()
    infos = deploy.start([EndpointOptions(model=f"tiny-bert:{trained['bert']['model_version']}", num_cpus=0.5),
                          EndpointOptions(model=f"tiny-gpt:{trained['gpt']['model_version']}", num_cpus=0.5),
                          EndpointOptions(model=f"tiny-gan:{trained['gan']['model_version']}", num_cpus=0.5)],
                         host="127.0.0.1", port=port)
    try:
        bert, gpt, gan = (info["url"] + "/predict" for info in infos)
        answer = httpx.post(bert, json={"instances": ["A moving, beautifully acted film.", "Dull."]}, timeout=30)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert [p["label"] in ("rotten", "fresh") for p in predictions] == [True, True]
        assert sum(predictions[0]["probabilities"].values()) == pytest.approx(1.0)
        wrong = httpx.post(bert, json={"instances": [[1, 2, 3]]}, timeout=30)
        assert wrong.status_code == 400 and "each instance: a text string" in wrong.json()["error"]

        request = {"instances": ["MACBETH:", {"prompt": "Thane", "max_new_tokens": 20, "temperature": 0,
                                              "top_k": 5}]}
        answer = httpx.post(gpt, json=request, timeout=60)
        assert answer.status_code == 200, answer.text
        first, greedy = answer.json()["predictions"]
        assert first["prompt"] == "MACBETH:" and len(first["text"]) == 100
        assert len(greedy["text"]) == 20
        again = httpx.post(gpt, json={"instances": [request["instances"][1]]}, timeout=60).json()
        assert again["predictions"][0]["text"] == greedy["text"]  # greedy decoding is deterministic
        too_long = httpx.post(gpt, json={"instances": [{"prompt": "a", "max_new_tokens": 99999}]}, timeout=30)
        assert too_long.status_code == 400 and "max_new_tokens" in too_long.json()["error"]
        assert httpx.get(infos[1]["url"] + "/healthz", timeout=10).status_code == 200

        answer = httpx.post(gan, json={"instances": [{"n": 3, "seed": 7}]}, timeout=30)
        assert answer.status_code == 200, answer.text
        images = answer.json()["predictions"][0]["images"]
        assert len(images) == 3 and base64.b64decode(images[0]).startswith(b"\x89PNG")
        again = httpx.post(gan, json={"instances": [{"n": 3, "seed": 7}]}, timeout=30).json()
        assert again["predictions"][0]["images"] == images
        wrong = httpx.post(gan, json={"instances": [{"n": 1000}]}, timeout=30)
        assert wrong.status_code == 400 and "must be an integer from 1 to 64" in wrong.json()["error"]
    finally:
        serve.shutdown()
