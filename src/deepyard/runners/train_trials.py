"""A sweep whose base is a train job: each Tune trial trains one model (``runners/trials.py`` lists
what a base kind's trials module provides; ``runners/sweep.py`` drives the sweep).

A single-worker trial runs the training loop in the Tune trial itself (``edges.TuneTrial``): its
epochs and checkpoints are Tune's, so schedulers stop it early, PBT copies its checkpoints, and
``--resume`` continues it mid-way; one process goes from trial to trial. A multi-worker trial is a
TorchTrainer of its own whose epochs reach Tune through Ray's TuneReportCallback.
"""

from __future__ import annotations

import math
from typing import Any

from deepyard import tracking
from deepyard.errors import BadInput
from deepyard.runners import checkpoints
from deepyard.runners.loop import Selection
from deepyard.runners.setup import build, check_metric, in_memory, load_data, monitored, preflight
from deepyard.runners.train import describe, log_outcome, make_trainer, promote as promote_version
from deepyard.runners.trials import Checked, child_run, overrides, reported_finished
from deepyard.spec import SweepJob, TrainJob, parse_spec, sample_values


def trial_spec(base: dict, values: dict[str, Any], metric: str, mode: str, every_epoch: bool = False) -> TrainJob:
    """The base job with a trial's values; checkpoints ranked by the sweep's metric (and, for PBT,
    taken every epoch: a worse trial copies a better one's latest)."""
    extra = [f"checkpoint.metric={metric}", f"checkpoint.mode={mode}"]
    extra += ["checkpoint.every_n_epochs=1"] if every_epoch else []
    return parse_spec(base, "base", overrides(values) + extra)


def inline(spec: TrainJob) -> bool:
    """Does a trial of this job train in its Tune trial (one worker) rather than in a TorchTrainer?"""
    return spec.scaling.num_workers == 1


def check(spec: SweepJob) -> Checked:
    """The base job's preflight, a metric its task reports, and PBT mutations that keep the model's shape."""
    splits, task = preflight(spec.base)
    in_memory(splits, spec.base, "sweep")
    check_metric("metric", spec.metric, task)
    if spec.scheduler.name == "pbt":
        _check_mutations_keep_shape(spec, splits)
    metric, mode = monitored(spec.metric, spec.mode, task)
    return Checked(metric, mode, task.name, describe(spec.base, splits))


def _check_mutations_keep_shape(spec: SweepJob, splits) -> None:
    def shapes(job: TrainJob) -> dict[str, tuple]:
        return {key: tuple(value.shape) for key, value in build(job, splits)[0].state_dict().items()}

    base = spec.base.model_dump(mode="json")
    expected = shapes(spec.base)
    for path, distribution in spec.scheduler.mutations.items():
        for value in sample_values(distribution):
            if shapes(parse_spec(base, "base", overrides({path: value}))) != expected:
                raise BadInput(f"scheduler.mutations.{path}: PBT copies weights between trials, so it can only "
                               f"perturb values that keep the model's shape, and {path}={value!r} changes it; "
                               "vary it in space instead")


def clock(spec: SweepJob) -> tuple[int, str, int]:
    """(seed, what schedulers count trials' progress in, its maximum). The maximum is one past the
    last epoch: a trial that gets there must finish itself (and log its model's final checkpoint),
    not be stopped by the scheduler for having reached max_t."""
    return spec.base.train.seed, "epoch", spec.base.train.epochs + 1


def resources(spec: SweepJob) -> dict[str, float]:
    """An inline trial trains in place and holds its worker's share; a TorchTrainer trial only waits
    on its workers, which hold the CPUs (Tune wants a non-empty request: one byte of memory)."""
    scaling = spec.base.scaling
    return {"cpu": scaling.cpus_per_worker, "gpu": int(scaling.use_gpu)} if inline(spec.base) else {"cpu": 0,
                                                                                                   "memory": 1}


def concurrency(spec: SweepJob, available: dict[str, float]) -> int:
    scaling = spec.base.scaling
    fits = available.get("CPU", 1) // (scaling.num_workers * scaling.cpus_per_worker)
    if scaling.use_gpu:
        fits = min(fits, available.get("GPU", 0) // scaling.num_workers)
    return max(1, int(fits))


def reuse_actors(spec: SweepJob) -> bool:
    """One process goes from trial to trial (and through PBT's restarts): seconds per trial on a laptop."""
    return inline(spec.base)


def run_trial(values: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: a train job with the sampled values, tracked as a child run of the sweep."""
    from ray import tune

    from deepyard.runners.edges import TuneTrial
    from deepyard.runners.train import fit_loop

    metric, mode = context["metric"], context["mode"]
    spec = trial_spec(context["base"], values, metric, mode, every_epoch=context["pbt"])
    trial_id = tune.get_context().get_trial_id()
    if reported_finished(context, trial_id, "epoch", -math.inf if mode == "max" else math.inf):
        return
    run_id = child_run(context, spec, trial_id, values, restored=tune.get_checkpoint() is not None)
    with tracking.finishing(run_id):
        if inline(spec):
            best = fit_loop({"spec": spec.model_dump(mode="json"), "run_id": run_id,
                             "tracking_uri": tracking.tracking_uri(), "trial_values": values},
                            TuneTrial(spec.scaling.use_gpu))
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            selection = Selection(metric, mode, None)
            result = make_trainer(spec, run_id, selection, callbacks=[TuneReportCallback()]).fit()
            # the final report carries the best epoch's value and its tie-breaker
            best = {"value": result.metrics.get(metric), "tie": result.metrics.get("tie_breaker")}
            tracking.set_tags(run_id, {"deepyard.final_checkpoint": result.checkpoint.path})
        logged = {f"best_{metric}": best["value"], "best_tie_breaker": best["tie"]} if best else {}
        tracking.log_metrics(run_id, {k: v for k, v in logged.items() if v is not None}, 0)


def promote(spec: SweepJob, best: dict, metric: str, mode: str) -> dict[str, Any]:
    """The best trial's final checkpoint -> a logged model -> a new version; then the alias, maybe."""
    from ray.train import Checkpoint

    best_spec = trial_spec(spec.base.model_dump(mode="json"), best["config"], metric, mode)
    with Checkpoint(best["checkpoint"]).as_directory() as directory:  # local or remote storage
        final = checkpoints.load(directory)
    outcome = log_outcome(best_spec, load_data(best_spec), best["run_id"], final,
                          registered_name=spec.model_name if spec.register.enabled else None)
    outcome["test_metrics"] = final["test"]
    if spec.promote and outcome.get("model_version"):  # (a spec cannot promote without registering)
        outcome["promotion"] = promote_version(spec.model_name, outcome["model_version"], spec.promote, metric, mode)
    return outcome
