"""Adversarial robustness: the attacks held to IBM's adversarial-robustness-toolbox, then `kind:
robustness` on a registered model on the session's Ray cluster and MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import last_json
from deepyard.robust.attacks import accuracy, fgsm, pgd


@pytest.fixture(scope="module")
def digits_mlp():
    """A small MLP trained on digits (pixels 0-16) for a few hundred steps: ~95% on held-out digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:1400] / 16), y[:1400]).backward()
        optimizer.step()
    scaled = nn.Sequential(Scale(1 / 16), model).eval()  # raw pixels in, as a registered pipeline takes them
    return scaled, x[1400:1700], y[1400:1700]


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def art_classifier(model: nn.Module):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(64,), nb_classes=10,
                             clip_values=(0.0, 16.0))


def test_fgsm_makes_the_examples_art_makes(digits_mlp):
    from art.attacks.evasion import FastGradientMethod

    model, x, y = digits_mlp
    ours = fgsm(model, x, y, 2.0, torch.tensor(0.0), torch.tensor(16.0))
    theirs = FastGradientMethod(art_classifier(model), eps=2.0).generate(x.numpy(), y=y.numpy())
    assert np.abs(ours.numpy() - theirs).max() < 1e-4
    assert accuracy(model, ours, y) < accuracy(model, x, y) - 0.2


def test_pgd_agrees_with_art_and_stays_in_the_ball_and_the_range(digits_mlp):
    from art.attacks.evasion import ProjectedGradientDescent

    model, x, y = digits_mlp
    ours = pgd(model, x, y, 2.0, torch.tensor(0.0), torch.tensor(16.0), steps=10, step_size=0.5, random_start=False)
    attack = ProjectedGradientDescent(art_classifier(model), eps=2.0, eps_step=0.5, max_iter=10, num_random_init=0,
                                      verbose=False)
    theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    assert abs(accuracy(model, ours, y) - accuracy(model, theirs, y)) <= 0.01
    assert (ours - x).abs().max() <= 2.0 + 1e-5 and ours.min() >= 0 and ours.max() <= 16
    restarted = pgd(model, x, y, 2.0, torch.tensor(0.0), torch.tensor(16.0), steps=10, restarts=3,
                    generator=torch.Generator().manual_seed(0))
    assert accuracy(model, restarted, y) <= accuracy(model, fgsm(model, x, y, 2.0, torch.tensor(0.0),
                                                                 torch.tensor(16.0)), y)


ROBUSTNESS = """
kind: robustness
name: digits_source_robustness
model: digits_source@champion
epsilons: [1, 4]
examples: 120
"""


@pytest.mark.slow
def test_a_robustness_job_tags_the_version_and_logs_its_table(digits_source, cli, write_spec):
    from mlflow import MlflowClient

    from deepyard import tracking

    result = last_json(cli("run", write_spec(ROBUSTNESS), "--json"))
    accuracies = result["accuracy"]
    clean = result["metrics"]["clean_accuracy"]
    assert clean > 0.8 and accuracies["pgd"][1] < accuracies["fgsm"][1] <= clean
    assert set(result["checks"]) == {"pgd_at_most_fgsm", "fgsm_not_rising_with_epsilon",
                                     "pgd_not_rising_with_epsilon", "more_pgd_steps_never_raise_it"}
    version = tracking.model_version("digits_source", alias="champion")
    tags = MlflowClient(tracking.tracking_uri()).get_model_version("digits_source", version["version"]).tags
    assert float(tags["robustness.pgd.eps4"]) == pytest.approx(accuracies["pgd"][1], abs=1e-3)
    assert tags["robustness.run_id"] == result["run_id"] and tags["robustness.checks"].startswith(("passed", "failed"))
    report = json.loads(open(tracking.download(result["run_id"], "robustness.json")).read())
    assert report["epsilons"] == [1, 4] and report["examples"] == 120


@pytest.mark.parametrize("change, message", [
    ("epsilons: [-0.1]", "epsilons.0"),
    ("epsilons: [2, 1]", "epsilons must rise"),
    ("attacks: [cw]", "attacks.0"),
    ("pgd: {steps: 0}", "pgd.steps"),
    ("model: no_such_model@champion", "no_such_model"),
])
def test_bad_robustness_specs_exit_2_before_ray_starts(cli, write_spec, change, message):
    key = change.split(":")[0]
    text = "\n".join(line for line in ROBUSTNESS.strip().splitlines() if not line.startswith(key)) + f"\n{change}\n"
    assert message in cli("validate", write_spec(text), expect=2).stderr
