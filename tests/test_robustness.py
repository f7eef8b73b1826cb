"""Adversarial robustness: the attacks held to IBM's adversarial-robustness-toolbox, then `kind:
robustness` on a registered model on the session's Ray cluster and MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import last_json
from deepyard.robust.attacks import accuracy, fgsm, pgd

ROOT = Path(__file__).resolve().parents[1]


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
    assert result["checks"] == {"pgd_at_most_fgsm": True, "fgsm_not_rising_with_epsilon": True,
                                "pgd_not_rising_with_epsilon": True, "more_pgd_steps_never_raise_it": True}
    version = tracking.model_version("digits_source", alias="champion")
    tags = MlflowClient(tracking.tracking_uri()).get_model_version("digits_source", version["version"]).tags
    assert float(tags["robustness.pgd.eps4"]) == pytest.approx(accuracies["pgd"][1], abs=1e-3)
    assert tags["robustness.run_id"] == result["run_id"] and tags["robustness.checks"] == "passed"
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


def test_the_adversary_replaces_its_share_of_a_batch_within_the_budget(digits_mlp):
    from types import SimpleNamespace

    from deepyard.robust.training import Adversary
    from deepyard.spec.train import AdversarialSpec

    model, x, y = digits_mlp
    splits = SimpleNamespace(x_train=x.numpy(), is_image=False)
    task = SimpleNamespace(loss=nn.functional.cross_entropy)
    adversary = Adversary(AdversarialSpec(epsilon=2.0, mix=0.5, steps=3), splits, task, torch.device("cpu"))
    model.train()
    perturbed = adversary.perturb(model, x[:10], y[:10])
    assert model.training  # (attacked in eval mode, given back in train mode)
    moved = (perturbed - x[:10]).abs().amax(dim=1)
    assert (moved[:5] > 0).all() and (moved[5:] == 0).all() and moved.max() <= 2.0 + 1e-5
    lower, upper = x.min(dim=0).values, x.max(dim=0).values  # each feature's own range (not an image)
    assert (perturbed >= lower).all() and (perturbed <= upper).all()
    model.eval()
    model[0].train()  # (a part held in its own mode, as frozen batch norms are: given back as it was)
    adversary.perturb(model, x[:10], y[:10])
    assert model[0].training and not model.training
    model.eval()


def test_an_input_outside_the_training_range_moves_by_epsilon_at_most(digits_mlp):
    model, x, y = digits_mlp
    beyond = x[:20].clone()
    beyond[:, 0] = 30.0  # past the range the attacks keep inputs in (0 to 16)
    for attacked in (fgsm(model, beyond, y[:20], 2.0, torch.tensor(0.0), torch.tensor(16.0)),
                     pgd(model, beyond, y[:20], 2.0, torch.tensor(0.0), torch.tensor(16.0), steps=5)):
        assert (attacked - beyond).abs().max() <= 2.0 + 1e-5


ADVERSARIAL = """
kind: train
name: digits_adversarial
data: {name: digits}
model: {name: mlp, params: {hidden_sizes: [64], dropout: 0.0}}
optim: {name: adam, lr: 0.005}
train: {epochs: 15, batch_size: 64}
register: {model_name: digits_adversarial}
"""


@pytest.mark.slow
@pytest.mark.long  # ~30 s: two DDP workers on two cores
def test_adversarial_training_on_two_ddp_workers_keeps_more_accuracy_under_pgd(ray_cluster, cli, write_spec):
    from deepyard.compress.parent import load_parent, rebuild
    from deepyard.runners.setup import load_data

    plain = last_json(cli("run", write_spec(ADVERSARIAL), "--json"))
    robust = last_json(cli("run", write_spec(ADVERSARIAL), "--json", "--set", "scaling.num_workers=2",
                           "--set", "train.adversarial={method: pgd, epsilon: 2, steps: 3}"))
    under_attack = []
    for summary in (plain, robust):
        parent = load_parent(f"digits_adversarial:{summary['model_version']}")
        splits = load_data(parent.spec)
        pipeline = rebuild(parent, splits)[0].eval()
        x, y = torch.from_numpy(splits.x_test), torch.from_numpy(splits.y_test)
        adversarial = pgd(pipeline, x, y, 2.0, torch.tensor(0.0), torch.tensor(16.0), steps=10,
                          generator=torch.Generator().manual_seed(0))
        under_attack.append(accuracy(pipeline, adversarial, y))
    assert robust["metrics"]["test_accuracy"] > 0.8
    assert under_attack[1] > under_attack[0] + 0.1, under_attack


@pytest.mark.parametrize("change, message", [
    ("train: {adversarial: {epsilon: -1}}", "train.adversarial.epsilon"),
    ("train: {adversarial: {epsilon: 1, method: cw}}", "train.adversarial.method"),
    ("train: {adversarial: {epsilon: 1, mix: 0}}", "train.adversarial.mix"),
    ("model: {name: dcgan}\ntrain: {adversarial: {epsilon: 1}}", "has steps of its own"),
])
def test_bad_adversarial_settings_exit_2_before_ray_starts(cli, write_spec, change, message):
    spec = "kind: train\nname: bad_adversarial\ndata: {name: digits}\n" + (
        change if change.startswith("model") else "model: {name: mlp}\n" + change)
    assert message in cli("validate", write_spec(spec), expect=2).stderr


@pytest.mark.slow
def test_a_sweep_varies_the_adversarial_budget_of_its_trials(ray_cluster, cli, write_spec):
    from deepyard import tracking

    spec = write_spec(f"""
kind: sweep
name: adversarial_sweep
base: {ROOT}/jobs/digits_mlp.yaml
space:
  train.adversarial.epsilon: {{grid: [0.5, 2.0]}}
scheduler: {{name: fifo}}
register: {{enabled: false}}
""")  # (fifo: ASHA may stop the worse trial after its first epoch)
    summary = last_json(cli("run", spec, "--json", "--set", "base.train.epochs=2", "--set",
                            "base.data.max_train_samples=300", "--set",
                            "base.train.adversarial={method: pgd, epsilon: 1.0, steps: 2}"))
    trials = tracking.child_runs(summary["run_id"])
    assert sorted(t.data.params["train.adversarial.epsilon"] for t in trials) == ["0.5", "2.0"]
    assert all(t.info.status == "FINISHED" and t.data.params["train.adversarial.steps"] == "2" for t in trials)
