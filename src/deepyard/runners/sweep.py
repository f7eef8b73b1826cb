"""`kind: sweep`: hyperparameter search on Ray Tune. Run one with `deepyard run jobs/digits_mlp_sweep.yaml`.

Driver: check the base job and the space (before Ray starts) -> the parent MLflow run -> a Tuner
whose trials are train jobs -> the best trial's model registered -> the alias moved only if better.
Each trial is one child run. A single-worker trial runs the training loop in the Tune trial itself
(``edges.TuneTrial``): its epochs and checkpoints are Tune's, so schedulers stop it early, PBT copies
its checkpoints, and ``--resume`` continues it mid-way. A multi-worker trial is a TorchTrainer of its
own whose epochs reach Tune through Ray's TuneReportCallback.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from deepyard import settings, tracking
from deepyard.errors import BadInput, DeepyardError, JobFailed
from deepyard.runners import checkpoints
from deepyard.runners.setup import build, check_metric, load_data, monitored, preflight
from deepyard.runners.train import log_outcome, make_trainer, promote
from deepyard.spec import RLJob, SweepJob, TrainJob, flatten, parse_spec, sample_values, to_yaml

PARENT_RUN_FILE = "deepyard_parent_run_id"


def _domain(distribution: dict[str, Any]):
    from ray import tune

    kind, args = next(iter(distribution.items()))
    ranges = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
              "quniform": tune.quniform, "qloguniform": tune.qloguniform, "normal": tune.randn}
    return tune.choice(args) if kind in ("choice", "grid") else ranges[kind](*args)


def tune_space(spec: SweepJob) -> dict[str, Any]:
    from ray import tune

    grid = {path for path, d in spec.space.items() if "grid" in d or ("choice" in d and spec.search == "grid")}
    return {path: tune.grid_search(next(iter(d.values()))) if path in grid else _domain(d)
            for path, d in spec.space.items()}


def _search_and_schedule(spec: SweepJob, concurrency: int):
    from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule,
                                     PopulationBasedTraining)
    from ray.tune.search import BasicVariantGenerator

    options = spec.scheduler
    seed, time_attr, max_t = _trial_clock(spec)
    # Seeded, so that the same spec samples the same trials (FIFO and ASHA can be compared). PBT
    # needs its whole population created up front (Tune runs as many at once as the CPUs allow).
    searcher = BasicVariantGenerator(random_state=seed, max_concurrent=0 if options.name == "pbt" else concurrency)
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=seed)
    scheduler = {
        "fifo": lambda: FIFOScheduler(),
        "asha": lambda: ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=options.grace_period,
                                      reduction_factor=options.reduction_factor),
        "hyperband": lambda: HyperBandScheduler(time_attr=time_attr, max_t=max_t,
                                                reduction_factor=options.reduction_factor),
        "median": lambda: MedianStoppingRule(time_attr=time_attr, grace_period=options.grace_period),
        "pbt": lambda: PopulationBasedTraining(
            time_attr=time_attr, perturbation_interval=options.perturbation_interval,
            # a choice perturbs to a neighbouring value, so it goes as a list
            hyperparam_mutations={path: d["choice"] if "choice" in d else _domain(d)
                                  for path, d in options.mutations.items()},
            quantile_fraction=options.quantile_fraction, resample_probability=options.resample_probability),
    }[options.name]()
    return searcher, scheduler


def _trial_clock(spec: SweepJob) -> tuple[int, str, int]:
    """(seed, what schedulers count trials' progress in, its maximum). The maximum is one past the
    last epoch (or iteration): a trial that gets there must finish itself (and log its model's final
    checkpoint), not be stopped by the scheduler for having reached max_t."""
    if isinstance(spec.base, RLJob):
        return spec.base.seed, "training_iteration", (spec.base.stop.iterations or 100_000) + 1
    return spec.base.train.seed, "epoch", spec.base.train.epochs + 1


def trial_spec(base: dict, values: dict[str, Any], metric: str, mode: str, every_epoch: bool = False) -> TrainJob:
    """The base job with a trial's values; checkpoints ranked by the sweep's metric (and, for PBT,
    taken every epoch: a worse trial copies a better one's latest)."""
    overrides = [f"{path}={json.dumps(value)}" for path, value in values.items()]
    overrides += [f"checkpoint.metric={metric}", f"checkpoint.mode={mode}"]
    overrides += ["checkpoint.every_n_epochs=1"] if every_epoch else []
    return parse_spec(base, "base", overrides)


def inline(spec: TrainJob | RLJob) -> bool:
    """Does a trial of this job train in its Tune trial (one worker, or an rl job) rather than in a
    TorchTrainer?"""
    return isinstance(spec, RLJob) or spec.scaling.num_workers == 1


def _child_run(context: dict[str, Any], spec: TrainJob, trial_id: str, values: dict[str, Any],
               restored: bool) -> str:
    """The trial's MLflow run: a new one, or, when the trial goes on from a checkpoint (a resumed
    sweep, or PBT restarting it from a better trial's), the one it had. Its params stay the initial
    values (MLflow params never change); the tag ``deepyard.trial_config`` holds the current ones."""
    tags = {"deepyard.trial_config": json.dumps(values)}
    if restored and (previous := tracking.trial_run(context["parent_run_id"], trial_id)) is not None:
        tracking.reopen_run(previous.info.run_id)
        tracking.set_tags(previous.info.run_id, tags)
        tracking.delete_tag(previous.info.run_id, "deepyard.interrupted")  # it goes on
        return previous.info.run_id
    return tracking.start_run(context["experiment"], f"trial-{trial_id}", flatten(spec), to_yaml(spec),
                              tags={"mlflow.parentRunId": context["parent_run_id"], "deepyard.kind": "trial",
                                    "deepyard.trial_id": trial_id, **tags})


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
    run_id = _child_run(context, spec, trial_id, values, restored=tune.get_checkpoint() is not None)
    try:
        if inline(spec):
            best = fit_loop({"spec": spec.model_dump(mode="json"), "run_id": run_id,
                             "tracking_uri": tracking.tracking_uri(), "trial_values": values},
                            TuneTrial(spec.scaling.use_gpu))
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            result = make_trainer(spec, run_id, (metric, mode), callbacks=[TuneReportCallback()]).fit()
            best = result.metrics.get(metric)  # the final report carries the best epoch's value
            tracking.set_tags(run_id, {"deepyard.final_checkpoint": result.checkpoint.path})
        tracking.log_metrics(run_id, {f"best_{metric}": best} if best is not None else {}, 0)
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

    from deepyard.runners import rl_trials

    resources = ray.cluster_resources()
    if isinstance(spec.base, RLJob):
        return spec.max_concurrent_trials or max(1, int(resources.get("CPU", 1) // rl_trials.cpus_per_trial(spec)))
    scaling = spec.base.scaling
    fits = resources.get("CPU", 1) // (scaling.num_workers * scaling.cpus_per_worker)
    if scaling.use_gpu:
        fits = min(fits, resources.get("GPU", 0) // scaling.num_workers)
    return spec.max_concurrent_trials or max(1, int(fits))


def _tuner(spec: SweepJob, context: dict, sweep_dir: Path, resume: bool, metric: str, mode: str):
    from ray import tune

    from deepyard.runners import rl_trials

    if isinstance(spec.base, RLJob):
        trial, resources = rl_trials.run_trial, rl_trials.resources(spec)
    else:
        # A TorchTrainer trial only waits on its workers, which hold the CPUs (Tune wants a non-empty
        # request: one byte of memory); an inline trial trains in place and holds its worker's share.
        scaling = spec.base.scaling
        trial, resources = run_trial, ({"cpu": scaling.cpus_per_worker, "gpu": int(scaling.use_gpu)}
                                       if inline(spec.base) else {"cpu": 0, "memory": 1})
    trainable = tune.with_resources(tune.with_parameters(trial, context=context), resources)
    if resume and tune.Tuner.can_restore(str(sweep_dir)):
        return tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    concurrency = _concurrency(spec)
    searcher, scheduler = _search_and_schedule(spec, concurrency)
    # Inline trials' checkpoints are Tune's, and all are kept while the sweep runs: Tune deletes
    # old ones as soon as newer ones land, but its experiment snapshot (what --resume restores)
    # can still name a deleted one, and the trial then cannot resume. `_prune` tidies up after.
    return tune.Tuner(
        trainable,
        param_space=tune_space(spec),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                    trial_dirname_creator=lambda trial: trial.trial_id,
                                    num_samples=spec.trials,
                                    # (a BasicVariantGenerator limits itself, above)
                                    max_concurrent_trials=concurrency if spec.search == "optuna" else None,
                                    time_budget_s=spec.time_budget_s,
                                    # one process goes from trial to trial (and through PBT's restarts)
                                    # instead of a new one each time: seconds per trial on a laptop
                                    # (an rl trial builds its algorithm anew anyway)
                                    reuse_actors=isinstance(spec.base, TrainJob) and inline(spec.base)),
        run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
    )


def _prune(results, final_checkpoints: dict[str, str]) -> None:
    """After the sweep: each finished trial keeps its final checkpoint only (local storage)."""
    import shutil

    for result in results:
        trial_dir, final = Path(result.path), final_checkpoints.get(Path(result.path).name)
        if final is None or not trial_dir.is_dir():
            continue
        for checkpoint in trial_dir.glob("checkpoint_*"):
            if checkpoint.is_dir() and str(checkpoint) != final:
                shutil.rmtree(checkpoint, ignore_errors=True)


def _promote(spec: SweepJob, best: dict, metric: str, mode: str) -> dict[str, Any]:
    """The best trial's final checkpoint -> a logged model -> a new version; then the alias, maybe."""
    if isinstance(spec.base, RLJob):
        from deepyard.runners import rl_trials

        return rl_trials.promote(spec, best, metric, mode)
    best_spec = trial_spec(spec.base.model_dump(mode="json"), best["config"], metric, mode)
    from ray.train import Checkpoint

    with Checkpoint(best["checkpoint"]).as_directory() as directory:  # local or remote storage
        final = checkpoints.load(directory)
    outcome = log_outcome(best_spec, load_data(best_spec), best["run_id"], final,
                          registered_name=spec.model_name if spec.register.enabled else None)
    outcome["test_metrics"] = final["test"]
    if spec.promote and outcome.get("model_version"):  # (a spec cannot promote without registering)
        outcome["promotion"] = promote(spec.model_name, outcome["model_version"], spec.promote, metric, mode)
    return outcome


def check(spec: SweepJob):
    """The base job's preflight, a metric its task reports, and PBT mutations that keep the model's
    shape: (splits, task, metric, mode)."""
    splits, task = preflight(spec.base)
    check_metric("metric", spec.metric, task)
    if spec.scheduler.name == "pbt":
        _check_mutations_keep_shape(spec, splits)
    return (splits, task, *monitored(spec.metric, spec.mode, task))


def _check_mutations_keep_shape(spec: SweepJob, splits) -> None:
    def shapes(job: TrainJob) -> dict[str, tuple]:
        return {key: tuple(value.shape) for key, value in build(job, splits)[0].state_dict().items()}

    base = spec.base.model_dump(mode="json")
    expected = shapes(spec.base)
    for path, distribution in spec.scheduler.mutations.items():
        for value in sample_values(distribution):
            if shapes(parse_spec(base, "base", [f"{path}={json.dumps(value)}"])) != expected:
                raise BadInput(f"scheduler.mutations.{path}: PBT copies weights between trials, so it can only "
                               f"perturb values that keep the model's shape, and {path}={value!r} changes it; "
                               "vary it in space instead")


def run(spec: SweepJob, *, address: str | None = None, ray_logs: bool = False,
        watch: Callable[..., Any] | None = None, resume: bool = False) -> dict[str, Any]:
    from contextlib import nullcontext

    from deepyard import cluster, sweep_report

    if isinstance(spec.base, RLJob):
        from deepyard.runners import rl_trials

        (metric, mode), task_name = rl_trials.check(spec), "rl"
    else:
        _, task, metric, mode = check(spec)
        task_name = task.name
    sweep_dir = Path(settings.storage_path(spec.storage_path)) / spec.name
    if not resume and (sweep_dir / PARENT_RUN_FILE).exists():
        raise BadInput(f"a sweep named {spec.name!r} already ran in {sweep_dir}; continue it with --resume, "
                       "or give this one another name")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:  # seconds since the previous lap
        timings[f"{name}_s"] = time.perf_counter() - started - sum(timings.values())

    parent = _open_parent(spec, sweep_dir, resume, task_name)
    lap("open_run")
    context = {"base": spec.base.model_dump(mode="json"), "metric": metric, "mode": mode,
               "experiment": spec.experiment, "parent_run_id": parent, "resume": resume,
               "pbt": spec.scheduler.name == "pbt"}
    random.seed(_trial_clock(spec)[0])  # PBT's explore steps draw from Python's random
    # Tune turns the first Ctrl-C into a normal end of fit(), which would register a model from a
    # half-run sweep; let it stop the sweep instead (then --resume continues it).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune's newer console output prints a configuration box even at verbose=0; deepyard has its own table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's experiment snapshot is what --resume restores: every second, so that an interrupted
    # trial goes on from a recent checkpoint (Tune's adaptive default can lag by minutes).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        with cluster.connected(address, ray_logs):
            tuner = _tuner(spec, context, sweep_dir, resume, metric, mode)
            lap("ray_connect")
            with watch(parent, spec.varied_paths, metric, mode) if watch else nullcontext():
                results = tuner.fit()
            lap("tune_fit")
        # Trial directories are named by trial id (an errored trial may not have reported any metric).
        errored = {Path(result.path).name for result in results if result.error is not None}
        final_checkpoints = {Path(result.path).name: result.checkpoint.path for result in results
                             if result.error is None and result.checkpoint and result.metrics.get("final")}
        trials = sweep_report.close_trials(parent, metric, mode, errored, final_checkpoints)
        _prune(results, final_checkpoints)
        finished = [t for t in trials if t["checkpoint"] and t["best"] is not None and math.isfinite(t["best"])]
        if not finished:
            raise JobFailed("no trial finished; see the child runs' errors in MLflow")
        best = (max if mode == "max" else min)(finished, key=lambda t: t["best"])
        summary = sweep_report.log_summary(parent, trials, best, spec.varied_paths, metric, mode,
                                           wall_s=time.perf_counter() - started)
        lap("report")
        outcome = _promote(spec, best, metric, mode)
        lap("promote")
        tracking.log_metrics(parent, {f"timing_{name}": value for name, value in timings.items()}, 0)
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
            **summary, **outcome, "timings": timings}
