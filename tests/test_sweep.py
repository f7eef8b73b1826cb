"""Sweeps: spec errors before Ray starts; on real Ray Tune and MLflow: nested runs, promotion, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import ROOT, ended, last_json
from deepyard import tracking

SWEEP = f"""
kind: sweep
name: {{name}}
base: {ROOT}/jobs/digits_mlp.yaml
space:
  optim.lr: {{{{loguniform: [0.001, 0.02]}}}}
  model.params.hidden_sizes: {{{{choice: [[16], [32, 16]]}}}}
scheduler: {{{{name: {{scheduler}}, grace_period: 1}}}}
num_samples: {{samples}}
register: {{{{model_name: {{model}}}}}}
promote: {{{{alias: champion}}}}
"""
TINY = ["--set", "base.train.epochs=3", "--set", "base.data.max_train_samples=300",
        "--set", "base.data.augment=null"]


def sweep_spec(write_spec, name, scheduler="asha", samples=4, model="sweep-mlp"):
    return write_spec(SWEEP.format(name=name, scheduler=scheduler, samples=samples, model=model), f"{name}.yaml")


def test_bad_space_is_reported_before_ray_starts(cli, write_spec):
    spec = write_spec(f"""
kind: sweep
name: bad
base: {ROOT}/jobs/digits_mlp.yaml
space:
  optim.lrr: {{uniform: [0.1, 0.2]}}
  model.params.dropout: {{uniform: [0.0, 1.5]}}
  optim.lr: {{loguniform: [0, 0.1]}}
  train.epochs: {{grid: [1, 2]}}
  optim.name: {{gaussian: [1, 2]}}
search: optuna
metric: val_rmse
""")
    stderr = cli("validate", spec, expect=2).stderr
    assert "space.optim.lrr=0.1: optim.lrr: unknown field; did you mean 'lr'?" in stderr
    assert "space.model.params.dropout=1.5: model.params.dropout: Input should be less than 1" in stderr
    assert "space.optim.lr: loguniform: low must be > 0" in stderr
    assert "space.train.epochs: optuna samples, it cannot walk a grid" in stderr
    assert "space.optim.name: expected one distribution, got gaussian; one of: choice" in stderr
    result = cli("validate", spec, "--set", "space={optim.lr: {uniform: [0.001, 0.01]}}", expect=2)
    assert "metric: classification reports val_loss, val_accuracy, not 'val_rmse'" in result.stderr


def test_base_must_be_a_train_spec(cli, write_spec):
    assert "base: no spec file 'nope.yaml'" in cli("validate", write_spec(
        "kind: sweep\nname: s\nbase: nope.yaml\nspace: {optim.lr: {choice: [0.1]}}\n"), expect=2).stderr


def test_promote_needs_registration(cli, write_spec):
    spec = write_spec(f"kind: sweep\nname: s\nbase: {ROOT}/jobs/digits_mlp.yaml\n"
                      "space: {optim.lr: {choice: [0.1]}}\nregister: {enabled: false}\npromote: {alias: champion}\n")
    assert "promote moves an alias to the new registered version" in cli("validate", spec, expect=2).stderr


PBT = f"""
kind: sweep
name: pbt
base: {ROOT}/jobs/digits_mlp.yaml
space: {{}}
scheduler:
  name: pbt
  perturbation_interval: 2
  quantile_fraction: 0.5
  synchronous: true   # every step exploits, whatever the timing (async PBT skipped them all once in CI)
  mutations:
    optim.lr: {{loguniform: [0.0005, 0.02]}}
    model.params.dropout: {{uniform: [0.0, 0.3]}}
num_samples: 4
register: {{model_name: pbt-mlp}}
"""


@pytest.mark.parametrize(("override", "message"), [
    ("scheduler.mutations={model.params.hidden_sizes: {choice: [[16], [32]]}}",
     "scheduler.mutations.model.params.hidden_sizes: PBT copies weights between trials, so it can only perturb "
     "values that keep the model's shape, and model.params.hidden_sizes=[16] changes it"),
    ("scheduler.mutations={optim.lr: {grid: [0.1, 0.2]}}",
     "scheduler.mutations.optim.lr: pbt samples, it cannot walk a grid"),
    ("scheduler.mutations={optim.lrr: {uniform: [0.1, 0.2]}}", "optim.lrr: unknown field; did you mean 'lr'?"),
    ("scheduler.mutations={}", "pbt needs mutations"),
    ("search=optuna", "scheduler pbt picks the next hyperparameters itself; use search: random"),
    ("base.scaling.num_workers=2", "scheduler pbt runs each trial in one process"),
    ("scheduler.name=asha", "mutations are for scheduler pbt; asha does not use them"),
    ("scheduler={name: median, synchronous: true}", "synchronous is for scheduler pbt; median does not use it"),
])
def test_bad_pbt_specs_are_refused(cli, write_spec, override, message):
    spec = write_spec(PBT, "pbt.yaml")
    assert message in cli("validate", spec, "--set", override, expect=2).stderr


@pytest.mark.slow
@pytest.mark.long  # ~30 s: four trials through PBT's perturbations
def test_pbt_perturbs_trials_and_tracks_their_schedules(ray_cluster, cli, write_spec):
    summary = last_json(cli("run", write_spec(PBT, "pbt.yaml"), "--json", "--set", "base.train.epochs=4",
                            "--set", "base.data.max_train_samples=300", "--set", "base.data.augment=null"))
    client = MlflowClient()
    children = tracking.child_runs(summary["run_id"])
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)  # no param-change errors
    schedules = {c.info.run_id: {m.value for m in client.get_metric_history(c.info.run_id, "hp/optim.lr")}
                 for c in children}
    # The weaker half copied a better trial's checkpoint and went on with a perturbed learning rate.
    perturbed = [run_id for run_id, values in schedules.items() if len(values) > 1]
    assert perturbed
    for run_id in perturbed:
        run = client.get_run(run_id)
        assert client.get_metric_history(run_id, "resumed_from_epoch")
        current = json.loads(run.data.tags["deepyard.trial_config"])["optim.lr"]
        assert current != pytest.approx(float(run.data.params["optim.lr"]))  # params: the initial values
    assert summary["model_version"] == "1"


@pytest.mark.slow
def test_sweep_tracks_nested_runs_registers_and_promotes(ray_cluster, cli, write_spec):
    summary = last_json(cli("run", sweep_spec(write_spec, "tiny_sweep"), "--json", *TINY))
    client = MlflowClient()
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.csv", "best_config.json",
                                                                         "spec.yaml", "plots"}
    assert parent.data.metrics["trials"] == 4
    children = tracking.child_runs(parent.info.run_id)
    assert len(children) == 4 and all(c.info.status in ("FINISHED", "KILLED") for c in children)
    for child in children:  # params are that trial's resolved config
        config = child.data.tags["deepyard.trial_config"]
        assert child.data.params["model.params.hidden_sizes"] in config
        sampled = float(config.split('"optim.lr": ')[1].split(",")[0])
        assert float(child.data.params["optim.lr"]) == pytest.approx(sampled)
    best = client.get_run(summary["best_trial_run_id"])
    assert best.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert summary["model_version"] == "1" and summary["promotion"]["moved"]
    assert str(client.get_model_version_by_alias("sweep-mlp", "champion").version) == "1"


@pytest.mark.slow
def test_alias_moves_only_when_the_new_version_is_better(ray_cluster, cli, write_spec):
    job = write_spec("""
kind: train
name: promo
data: {name: digits, max_train_samples: 300}
model: {name: mlp, params: {hidden_sizes: [16]}}
train: {epochs: 4, batch_size: 32}
register: {model_name: promo-mlp}
""")
    good = last_json(cli("run", job, "--json", "--set", "optim.lr=0.01"))
    bad = last_json(cli("run", job, "--json", "--set", "optim.lr=0.00001", "--set", "train.epochs=1"))
    assert bad["metrics"]["test_accuracy"] < good["metrics"]["test_accuracy"]
    first = tracking.promote("promo-mlp", good["model_version"], "champion", only_if_better=True,
                             metric="test_accuracy", mode="max")
    assert first["moved"]
    kept = tracking.promote("promo-mlp", bad["model_version"], "champion", only_if_better=True,
                            metric="test_accuracy", mode="max")
    assert not kept["moved"] and f"version {good['model_version']} keeps 'champion'" in kept["reason"]
    assert str(MlflowClient().get_model_version_by_alias("promo-mlp", "champion").version) == good["model_version"]
    forced = tracking.promote("promo-mlp", bad["model_version"], "champion", only_if_better=False,
                              metric="test_accuracy", mode="max")
    assert forced["moved"]


LONG_AND_SHORT = """
kind: sweep
name: resumed_sweep
base: {root}/jobs/digits_mlp.yaml
space:
  optim.lr: {{loguniform: [0.001, 0.01]}}
  train.epochs: {{grid: [2, 80]}}
scheduler: {{name: fifo}}
num_samples: 2
register: {{model_name: resume-mlp}}
"""


@pytest.mark.slow
@pytest.mark.long
def test_resume_after_interruption_does_not_rerun_finished_trials(ray_cluster, cli, write_spec, deepyard_home):
    # Two short trials and two long ones: Ctrl-C lands after a short one finished, mid-way through a long one.
    spec = write_spec(LONG_AND_SHORT.format(root=ROOT), "resumed_sweep.yaml")
    overrides = ["--set", "base.data.max_train_samples=300", "--set", "base.data.augment=null",
                 "--set", "base.train.early_stopping=null"]
    process = subprocess.Popen([sys.executable, "-m", "deepyard.cli", "run", spec, *overrides],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    client = MlflowClient()
    deadline, finished_before = time.monotonic() + 180, []
    while time.monotonic() < deadline and process.poll() is None:
        experiment = client.get_experiment_by_name("resumed_sweep")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        trials = [r for r in runs if r.data.tags.get("deepyard.kind") == "trial"]
        finished_before = [r for r in trials if r.info.status == "FINISHED"]
        # a long trial well under way (seconds): Tune's snapshot holds one of its checkpoints by then
        if finished_before and any(r.data.metrics.get("epoch", 0) >= 20 for r in trials if r.info.status == "RUNNING"):
            break
        time.sleep(0.2)
    assert finished_before, process.communicate(timeout=60)
    process.send_signal(signal.SIGINT)  # Ctrl-C: Tune must not turn it into a normal, promoted end
    stderr = ended(process, timeout=90)
    assert process.returncode == 130, stderr[-3000:]
    (parent,) = [r for r in client.search_runs([experiment.experiment_id])
                 if r.data.tags.get("deepyard.kind") == "sweep"]
    assert parent.info.status == "KILLED"
    children = tracking.child_runs(parent.info.run_id)  # each finished, or stopped by the Ctrl-C and said so
    assert all(r.info.status == "FINISHED" or (r.info.status == "KILLED" and r.data.tags.get("deepyard.interrupted"))
               for r in children), [(r.info.status, r.data.tags.get("deepyard.error", "")[-300:]) for r in children]

    summary = last_json(cli("run", spec, "--resume", "--json", *overrides))
    assert summary["run_id"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    finished = [r for r in tracking.child_runs(parent.info.run_id) if r.info.status == "FINISHED"]
    trial_ids = [r.data.tags["deepyard.trial_id"] for r in finished]
    assert sorted(trial_ids) == sorted(set(trial_ids)) and len(trial_ids) == 4  # every trial finished once
    for before in finished_before:  # and the ones done before the interruption were not trained again
        assert before.info.run_id in {r.info.run_id for r in finished}
    # A trial that Tune's snapshot saw checkpointed went on from there, in the same child run, to its
    # own last epoch. (Whether the snapshot holds a checkpoint at the moment of Ctrl-C is timing: the
    # others restart, which the checks above cover.)
    resumed = [r for r in finished if client.get_metric_history(r.info.run_id, "resumed_from_epoch")]
    for run in resumed:
        assert run.data.metrics["epoch"] == json.loads(run.data.tags["deepyard.trial_config"])["train.epochs"]
    assert not [r for r in resumed if r.data.tags.get("deepyard.interrupted")]
