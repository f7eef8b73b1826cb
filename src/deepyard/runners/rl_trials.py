"""A sweep whose base is an rl job: each Tune trial trains one RLlib agent (``runners/sweep.py``
drives the sweep; this module is what differs from a train base).

A trial reports every iteration, so ASHA, Hyperband and the median rule compare trials at the same
``training_iteration`` and PBT perturbs them every few. Its checkpoints are the algorithm's own
state (``Algorithm.save_to_path``) handed to Tune: PBT copies them between trials, ``--resume``
goes on from them. The best trial's final policy is registered, tested on fresh episodes, and
promoted on ``test_return_mean``.
"""

from __future__ import annotations

import tempfile
from typing import Any

from deepyard import tracking
from deepyard.errors import BadInput
from deepyard.rl import algorithms
from deepyard.runners.rl import describe, log_policy, train_iterations
from deepyard.runners.trials import Checked, child_run, overrides, reported_finished
from deepyard.spec import RLJob, SweepJob, parse_spec, sample_values
from deepyard.tasks.base import selectable
from deepyard.tasks.rl_policy import RLPolicy

METRICS = tuple(selectable(RLPolicy))  # eval_return_mean, return_mean
NO_RETURN_YET = -1e12  # finite: Tune's TensorBoard logger complains about infinities


def trial_spec(base: dict, values: dict[str, Any]) -> RLJob:
    return parse_spec(base, "base", overrides(values))


def check(spec: SweepJob) -> Checked:
    """The base job's checks with every value the space can take; what ranks the trials."""
    spaces = algorithms.check(spec.base)
    base = spec.base.model_dump(mode="json")
    for path, distribution in {**spec.space, **spec.scheduler.mutations}.items():
        for value in sample_values(distribution):
            try:
                algorithms.check(trial_spec(base, {path: value}))
            except BadInput as error:
                raise BadInput(f"space.{path}={value!r}: {error}") from None
    for path in spec.scheduler.mutations:
        if path.startswith(("model.", "algorithm", "env")):
            raise BadInput(f"scheduler.mutations.{path}: PBT copies a trial's state into another, so it can only "
                           "perturb training values (training.lr, training.gamma...); vary it in space instead")
    metric = spec.metric or ("eval_return_mean" if spec.base.evaluation.interval else "return_mean")
    if metric not in METRICS:
        raise BadInput(f"metric: an rl sweep ranks trials by {' or '.join(METRICS)}, not {metric}")
    if metric == "eval_return_mean" and not spec.base.evaluation.interval:
        raise BadInput("metric: eval_return_mean needs base.evaluation.interval >= 1 (or use return_mean)")
    if spec.mode == "min":
        raise BadInput("mode: an rl sweep maximizes the return; leave mode out or set max")
    return Checked(metric, "max", RLPolicy.name, f"{describe(spec.base, spaces)} ranked by {metric}")


def clock(spec: SweepJob) -> tuple[int, str, int]:
    """(seed, what schedulers count trials' progress in, its maximum: one past the last iteration,
    so that a trial that gets there finishes itself instead of being stopped)."""
    return spec.base.seed, "training_iteration", (spec.base.stop.iterations or 100_000) + 1


def concurrency(spec: SweepJob, available: dict[str, float]) -> int:
    return max(1, int(available.get("CPU", 1) // (1 + spec.base.env_runners.count)))


def reuse_actors(spec: SweepJob) -> bool:
    return False  # each trial builds its algorithm anew anyway


def resources(spec: SweepJob):
    """The trial's own CPU, plus one per EnvRunner actor it starts (they join its placement group)."""
    from ray import tune

    return tune.PlacementGroupFactory([{"CPU": 1}] + [{"CPU": 1}] * spec.base.env_runners.count)


def run_trial(values: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: an rl job with the sampled values, tracked as a child run of the sweep."""
    from ray import tune

    metric = context["metric"]
    spec = trial_spec(context["base"], values)
    trial_id = tune.get_context().get_trial_id()
    if reported_finished(context, trial_id, "iteration", NO_RETURN_YET):
        return
    restored = tune.get_checkpoint()
    run_id = child_run(context, spec, trial_id, values, restored=restored is not None)
    with tracking.finishing(run_id):
        algo = algorithms.build_config(spec).build_algo()
        try:
            if restored is not None:  # PBT's exploit step, or a resumed sweep
                with restored.as_directory() as directory:
                    algo.restore_from_path(directory)
            final = _train(spec, algo, run_id, metric, every_iteration=context["pbt"])
        finally:
            algo.stop()
        # The registered policy is the final one, so the final evaluation is what ranks the trial.
        tracking.log_metrics(run_id, {f"best_{metric}": final} if final is not None else {}, 0)


def _train(spec: RLJob, algo, run_id: str, metric: str, every_iteration: bool) -> float | None:
    """Iterations until a stop condition, each reported to Tune; returns the metric's last value."""
    from ray import tune

    latest, reason, evaluated_once = None, None, False
    for iteration, metrics, _, reason in train_iterations(spec, algo, run_id):
        # Tune wants the metric in every report: the last evaluation's; before the first one, the
        # exploring policy's return stands in, and before any episode ends, a floor below any return.
        if metric in metrics:
            latest, evaluated_once = metrics[metric], True
        elif not evaluated_once:
            latest = metrics.get("return_mean", latest)
        report = {**{k: v for k, v in metrics.items() if not k.startswith("learner/")},
                  metric: NO_RETURN_YET if latest is None else latest,
                  "final": int(reason is not None)}
        if reason is not None or every_iteration or iteration % spec.checkpoint.every_n_iterations == 0:
            with tempfile.TemporaryDirectory() as directory:
                algo.save_to_path(directory)
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
        else:
            tune.report(report)
    tracking.set_tags(run_id, {"deepyard.stop_reason": reason})
    return latest


def promote(spec: SweepJob, best: dict, metric: str, mode: str) -> dict[str, Any]:
    """The best trial's final checkpoint -> its greedy policy, tested and registered; then the alias, maybe."""
    from ray.train import Checkpoint

    from deepyard.rl.policy import from_checkpoint

    best_spec = trial_spec(spec.base.model_dump(mode="json"), best["config"])
    spaces = algorithms.check(best_spec)
    with Checkpoint(best["checkpoint"]).as_directory() as directory:  # local or remote storage
        policy = from_checkpoint(directory, spaces[1], best_spec.algorithm)
    outcome = log_policy(best_spec, policy, best["run_id"], spaces,
                         spec.model_name if spec.register.enabled else None)
    if spec.promote and outcome.get("model_version"):
        outcome["promotion"] = tracking.promote(spec.model_name, outcome["model_version"], spec.promote.alias,
                                                only_if_better=spec.promote.only_if_better,
                                                metric="test_return_mean", mode="max")
    return outcome
