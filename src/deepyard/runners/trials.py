"""What every sweep trial shares, whatever its base kind: its MLflow run (a child of the sweep's),
and the report of a trial that finished before an interruption.

A base kind that can be swept registers a trials module (``spec/kinds.py``) with:

    check(sweep) -> Checked                 its checks, before Ray starts: the metric and its mode
    clock(sweep) -> (seed, time_attr, max_t) what schedulers count a trial's progress in
    resources(sweep), concurrency(sweep, cluster_cpus_gpus) -> int, reuse_actors(sweep) -> bool
    run_trial(values, context)               one Tune trial
    promote(sweep, best, metric, mode)       the best trial's model, registered (and the alias, maybe)

``runners/sweep.py`` drives the sweep through these and never asks which kind its base is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from deepyard import tracking
from deepyard.spec import JobBase, flatten, to_yaml


@dataclass(frozen=True)
class Checked:
    metric: str  # what ranks the trials
    mode: str  # "max" or "min"
    task: str  # the base job's task, tagged on the sweep's run
    described: str  # what `deepyard validate` prints about the base job


def child_run(context: dict[str, Any], spec: JobBase, trial_id: str, values: dict[str, Any], restored: bool) -> str:
    """The trial's MLflow run: a new one, or, when the trial goes on from a checkpoint (a resumed
    sweep, or PBT restarting it from a better trial's), the one it had. Its params stay the initial
    values (MLflow params never change); the tag ``deepyard.trial_config`` holds the current ones."""
    tags = {"deepyard.trial_config": json.dumps(values)}
    if restored and (previous := tracking.find_trial_run(context["parent_run_id"], trial_id)) is not None:
        tracking.reopen_run(previous.info.run_id)
        tracking.set_tags(previous.info.run_id, tags)
        tracking.delete_tag(previous.info.run_id, "deepyard.interrupted")  # it goes on
        return previous.info.run_id
    return tracking.start_run(context["experiment"], f"trial-{trial_id}", flatten(spec), to_yaml(spec), kind="trial",
                              tags={"mlflow.parentRunId": context["parent_run_id"], "deepyard.trial_id": trial_id,
                                    "deepyard.base_kind": spec.kind, **tags})


def reported_finished(context: dict[str, Any], trial_id: str, clock: str, worst: float) -> bool:
    """Resumed after an interruption that Tune's own state missed, but MLflow knows this trial
    finished: report its result again (``clock``: its epochs or iterations) instead of training."""
    from ray import tune

    done = context["resume"] and tracking.finished_trial_run(context["parent_run_id"], trial_id)
    if not done:
        return False
    metric = context["metric"]
    tune.report({metric: done.data.metrics.get(f"best_{metric}", worst), clock: done.data.metrics.get(clock, 0),
                 "final": 1})
    return True


def overrides(values: dict[str, Any]) -> list[str]:
    """A trial's values as ``--set`` overrides of its base job."""
    return [f"{path}={json.dumps(value)}" for path, value in values.items()]
