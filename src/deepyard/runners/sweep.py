"""`kind: sweep`: hyperparameter search on Ray Tune. Run one with `deepyard run jobs/digits_mlp_sweep.yaml`.

Driver: check the base job and the space (before Ray starts) -> the parent MLflow run -> a Tuner
whose trials are train jobs -> the best trial's model registered -> the alias moved only if better.
Each trial is its own TorchTrainer and its own child run; its epochs reach Tune through Ray's
TuneReportCallback, so a scheduler (ASHA, Hyperband, median) can stop it early.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from deepyard import settings, tracking
from deepyard.errors import BadInput, DeepyardError, JobFailed
from deepyard.runners import checkpoints
from deepyard.runners.setup import check_metric, load_data, monitored, preflight
from deepyard.runners.train import log_outcome, make_trainer
from deepyard.spec import SweepJob, TrainJob, flatten, parse_spec, to_yaml

PARENT_RUN_FILE = "deepyard_parent_run_id"


def tune_space(spec: SweepJob) -> dict[str, Any]:
    from ray import tune

    ranges = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
              "quniform": tune.quniform, "qloguniform": tune.qloguniform, "normal": tune.randn}
    space = {}
    for path, distribution in spec.space.items():
        kind, args = next(iter(distribution.items()))
        if kind == "grid" or (kind == "choice" and spec.search == "grid"):
            space[path] = tune.grid_search(args)
        else:
            space[path] = tune.choice(args) if kind == "choice" else ranges[kind](*args)
    return space


def _search_and_schedule(spec: SweepJob, concurrency: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    from ray.tune.search import BasicVariantGenerator

    # Seeded, so that the same spec samples the same trials (FIFO and ASHA can be compared).
    searcher = BasicVariantGenerator(random_state=spec.base.train.seed, max_concurrent=concurrency)
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=spec.base.train.seed)
    options = spec.scheduler
    # One past the last epoch: a trial that reaches its last epoch must finish itself (and log its
    # model's final checkpoint), not be stopped by the scheduler for having reached max_t.
    max_t = spec.base.train.epochs + 1
    scheduler = {
        "fifo": lambda: FIFOScheduler(),
        "asha": lambda: ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=options.grace_period,
                                      reduction_factor=options.reduction_factor),
        "hyperband": lambda: HyperBandScheduler(time_attr="epoch", max_t=max_t,
                                                reduction_factor=options.reduction_factor),
        "median": lambda: MedianStoppingRule(time_attr="epoch", grace_period=options.grace_period),
    }[options.name]()
    return searcher, scheduler


def trial_spec(base: dict, values: dict[str, Any], metric: str, mode: str) -> TrainJob:
    """The base job with a trial's values; checkpoints ranked by the sweep's metric."""
    overrides = [f"{path}={json.dumps(value)}" for path, value in values.items()]
    overrides += [f"checkpoint.metric={metric}", f"checkpoint.mode={mode}"]
    return parse_spec(base, "base", overrides)


def run_trial(values: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: a train job with the sampled values, tracked as a child run of the sweep."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = trial_spec(context["base"], values, context["metric"], context["mode"])
    trial_id = tune.get_context().get_trial_id()
    if context["resume"] and (done := tracking.finished_trial_run(context["parent_run_id"], trial_id)):
        # Resumed after an interruption that Tune's own state missed: MLflow knows this trial finished.
        worst = -math.inf if context["mode"] == "max" else math.inf
        tune.report({context["metric"]: done.data.metrics.get(f"best_{context['metric']}", worst),
                     "epoch": done.data.metrics.get("epoch", 0), "final": 1})
        return
    run_id = tracking.start_run(context["experiment"], f"trial-{trial_id}", flatten(spec), to_yaml(spec),
                                tags={"mlflow.parentRunId": context["parent_run_id"], "deepyard.kind": "trial",
                                      "deepyard.trial_id": trial_id,
                                      "deepyard.trial_config": json.dumps(values)})
    try:
        result = make_trainer(spec, run_id, (context["metric"], context["mode"]),
                              callbacks=[TuneReportCallback()]).fit()
        best = result.metrics.get(context["metric"])  # the final report carries the best epoch's value
        tracking.log_metrics(run_id, {f"best_{context['metric']}": best} if best is not None else {}, 0)
        tracking.set_tags(run_id, {"deepyard.final_checkpoint": result.checkpoint.path})
        tracking.finish_run(run_id, "FINISHED")
    except BaseException as error:  # a scheduler's stop kills this actor outright; the driver closes those runs
        tracking.finish_run(run_id, "FAILED", "".join(traceback.format_exception(error)))
        raise


def _open_parent(spec: SweepJob, sweep_dir: Path, resume: bool, task_name: str) -> str:
    saved = sweep_dir / PARENT_RUN_FILE
    if resume and saved.is_file():
        run_id = saved.read_text().strip()
        if tracking.client().get_run(run_id).info.status == "FINISHED":
            raise BadInput(f"sweep {spec.name!r} already finished (MLflow run {run_id}); nothing to resume")
        tracking.reopen_run(run_id)  # the parent run goes on where it stopped
        return run_id
    run_id = tracking.start_run(spec.experiment, spec.name, flatten(spec), to_yaml(spec),
                                tags={"deepyard.kind": "sweep", "deepyard.task": task_name})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(run_id)
    return run_id


def _concurrency(spec: SweepJob) -> int:
    import ray

    scaling, resources = spec.base.scaling, ray.cluster_resources()
    fits = resources.get("CPU", 1) // (scaling.num_workers * scaling.cpus_per_worker)
    if scaling.use_gpu:
        fits = min(fits, resources.get("GPU", 0) // scaling.num_workers)
    return spec.max_concurrent_trials or max(1, int(fits))


def _tuner(spec: SweepJob, context: dict, sweep_dir: Path, resume: bool, metric: str, mode: str):
    from ray import tune

    # The trial itself only waits on its TorchTrainer, whose workers hold the CPUs (Tune wants a
    # non-empty request: one byte of memory).
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": 0, "memory": 1})
    if resume and tune.Tuner.can_restore(str(sweep_dir)):
        return tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    concurrency = _concurrency(spec)
    searcher, scheduler = _search_and_schedule(spec, concurrency)
    return tune.Tuner(
        trainable,
        param_space=tune_space(spec),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                    trial_dirname_creator=lambda trial: trial.trial_id,
                                    num_samples=spec.trials,
                                    # (a BasicVariantGenerator limits itself, above)
                                    max_concurrent_trials=concurrency if spec.search == "optuna" else None,
                                    time_budget_s=spec.time_budget_s),
        run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0),
    )


def _promote(spec: SweepJob, best: dict, metric: str, mode: str) -> dict[str, Any]:
    """The best trial's final checkpoint -> a logged model -> a new version; then the alias, maybe."""
    best_spec = trial_spec(spec.base.model_dump(mode="json"), best["config"], metric, mode)
    from ray.train import Checkpoint

    with Checkpoint(best["checkpoint"]).as_directory() as directory:  # local or remote storage
        final = checkpoints.load(directory)
    outcome = log_outcome(best_spec, load_data(best_spec), best["run_id"], final,
                          registered_name=spec.model_name if spec.register.enabled else None)
    outcome["test_metrics"] = final["test"]
    if spec.promote and outcome.get("model_version"):  # (a spec cannot promote without registering)
        outcome["promotion"] = tracking.promote(spec.model_name, outcome["model_version"], spec.promote.alias,
                                                only_if_better=spec.promote.only_if_better, metric=_test_metric(metric),
                                                mode=mode)
    return outcome


def _test_metric(metric: str) -> str:
    return "test_" + metric.removeprefix("val_")


def check(spec: SweepJob):
    """The base job's preflight, and a metric its task reports: (splits, task, metric, mode)."""
    splits, task = preflight(spec.base)
    check_metric("metric", spec.metric, task)
    return (splits, task, *monitored(spec.metric, spec.mode, task))


def run(spec: SweepJob, *, address: str | None = None, ray_logs: bool = False,
        watch: Callable[..., Any] | None = None, resume: bool = False) -> dict[str, Any]:
    from contextlib import nullcontext

    from deepyard import cluster, sweep_report

    _, task, metric, mode = check(spec)
    sweep_dir = Path(settings.storage_path(spec.storage_path)) / spec.name
    if not resume and (sweep_dir / PARENT_RUN_FILE).exists():
        raise BadInput(f"a sweep named {spec.name!r} already ran in {sweep_dir}; continue it with --resume, "
                       "or give this one another name")
    started = time.perf_counter()
    parent = _open_parent(spec, sweep_dir, resume, task.name)
    context = {"base": spec.base.model_dump(mode="json"), "metric": metric, "mode": mode,
               "experiment": spec.experiment, "parent_run_id": parent, "resume": resume}
    # Tune turns the first Ctrl-C into a normal end of fit(), which would register a model from a
    # half-run sweep; let it stop the sweep instead (then --resume continues it).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune's newer console output prints a configuration box even at verbose=0; deepyard has its own table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        with cluster.connected(address, ray_logs):
            tuner = _tuner(spec, context, sweep_dir, resume, metric, mode)
            with watch(parent, list(spec.space), metric, mode) if watch else nullcontext():
                results = tuner.fit()
        # Trial directories are named by trial id (an errored trial may not have reported any metric).
        errored = {Path(result.path).name for result in results if result.error is not None}
        trials = sweep_report.close_trials(parent, metric, mode, errored)
        finished = [t for t in trials if t["checkpoint"] and t["best"] is not None and math.isfinite(t["best"])]
        if not finished:
            raise JobFailed("no trial finished; see the child runs' errors in MLflow")
        best = (max if mode == "max" else min)(finished, key=lambda t: t["best"])
        summary = sweep_report.log_summary(parent, trials, best, list(spec.space), metric, mode,
                                           wall_s=time.perf_counter() - started)
        outcome = _promote(spec, best, metric, mode)
        tracking.finish_run(parent, "FINISHED")
    except KeyboardInterrupt:
        sweep_report.close_interrupted(parent)
        tracking.finish_run(parent, "KILLED", "interrupted; continue with `deepyard run SPEC --resume`")
        raise
    except BaseException as error:
        sweep_report.close_interrupted(parent)
        tracking.finish_run(parent, "FAILED", "".join(traceback.format_exception(error)))
        if isinstance(error, DeepyardError):
            raise
        raise JobFailed(f"sweep failed: {error}; the MLflow run {parent} is marked FAILED") from error
    return {"run_id": parent, "experiment": spec.experiment, "metrics": outcome.pop("test_metrics"),
            "best_trial_run_id": best["run_id"], "best_config": best["config"], metric: best["best"],
            **summary, **outcome}
