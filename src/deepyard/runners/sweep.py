"""`kind: sweep`: hyperparameter search on Ray Tune. Run one with `deepyard run jobs/digits_mlp_sweep.yaml`.

Driver: check the base job and the space (before Ray starts) -> the parent MLflow run -> a Tuner
whose trials are jobs of the base's kind -> the best trial's model registered -> the alias moved
only if better. Each trial is one child run. What a trial is and does belongs to the base kind's
trials module (``runners/trials.py``: train_trials, rl_trials); this module never asks which.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from types import ModuleType
from typing import Any

from deepyard import settings, stops, tracking, transfer
from deepyard.errors import BadInput, JobFailed
from deepyard.runners.summary import RunOptions, RunSummary
from deepyard.runners.trials import Checked
from deepyard.spec import KINDS, SweepJob

PARENT_RUN_FILE = "deepyard_parent_run_id"


def trials_of(spec: SweepJob) -> ModuleType:
    return KINDS[spec.base.kind].trials_module()


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
    seed, time_attr, max_t = trials_of(spec).clock(spec)
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
            quantile_fraction=options.quantile_fraction, resample_probability=options.resample_probability,
            synch=options.synchronous),
    }[options.name]()
    return searcher, scheduler


def _parent_to_resume(spec: SweepJob, sweep_dir: Path, resume: bool) -> str | None:
    """The sweep's run to go on with (``--resume``), or None for a new one."""
    saved = sweep_dir / PARENT_RUN_FILE
    if not resume:
        if saved.exists():
            raise BadInput(f"a sweep named {spec.name!r} already ran in {sweep_dir}; continue it with --resume, "
                           "or give this one another name")
        return None
    if not saved.is_file():
        return None
    run_id = saved.read_text().strip()
    if tracking.run_status(run_id) == "FINISHED":
        raise BadInput(f"sweep {spec.name!r} already finished (MLflow run {run_id}); nothing to resume")
    return run_id


def _tuner(spec: SweepJob, context: dict, sweep_dir: Path, resume: bool, metric: str, mode: str):
    import ray
    from ray import tune

    from deepyard import cluster

    trials = trials_of(spec)
    trainable = tune.with_resources(tune.with_parameters(trials.run_trial, context=context), trials.resources(spec))
    if resume and tune.Tuner.can_restore(str(sweep_dir)):
        return tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    concurrency = spec.max_concurrent_trials or trials.concurrency(spec, ray.cluster_resources())
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
                                    reuse_actors=trials.reuse_actors(spec)),
        run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                  callbacks=cluster.tune_callbacks()),
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


def check(spec: SweepJob) -> str:
    """What `deepyard validate` prints: the base job's checks with the space's values."""
    checked = trials_of(spec).check(spec)
    return f"base kind={spec.base.kind} {checked.described}"


def best_trial(finished: list[dict], mode: str) -> dict:
    """The best trial; among trials that tie on the metric, the lower tie-breaker (the best epoch's
    validation loss) wins, as it does between epochs."""
    sign = 1 if mode == "max" else -1

    def rank(trial: dict) -> tuple[float, float]:
        tie = trial.get("tie")
        return sign * trial["best"], -(tie if tie is not None and math.isfinite(tie) else math.inf)

    return max(finished, key=rank)


def run(spec: SweepJob, options: RunOptions) -> RunSummary:
    from contextlib import nullcontext

    from deepyard import cluster, progress, sweep_report

    trials = trials_of(spec)
    checked: Checked = trials.check(spec)
    # Every trial copies the same source version, even if the alias moves during the sweep (and a
    # relative weights file still resolves inside a trial's own directory).
    spec = spec.model_copy(update={"base": transfer.pinned_spec(spec.base)})
    metric, mode = checked.metric, checked.mode
    sweep_dir = Path(settings.storage_path(spec.storage_path)) / spec.name
    previous = _parent_to_resume(spec, sweep_dir, options.resume)
    random.seed(trials.clock(spec)[0])  # PBT's explore steps draw from Python's random
    cluster.quiet_tune()
    # Tune's experiment snapshot is what --resume restores: every second, so that an interrupted
    # trial goes on from a recent checkpoint (Tune's adaptive default can lag by minutes).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    with tracking.job_run(spec, tags={"deepyard.task": checked.task}, reopen=previous, failure="sweep failed",
                          killed_note="interrupted; continue with `deepyard run SPEC --resume`",
                          on_stop=sweep_report.close_interrupted) as run:
        parent = run.id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(parent)
        run.lap("open_run")
        context = {"base": spec.base.model_dump(mode="json"), "metric": metric, "mode": mode,
                   "experiment": spec.experiment, "parent_run_id": parent, "resume": options.resume,
                   "pbt": spec.scheduler.name == "pbt"}
        with cluster.connected(options.address, options.ray_logs, stop_behind=True):
            tuner = _tuner(spec, context, sweep_dir, options.resume, metric, mode)
            run.lap("ray_connect")
            watching = (progress.watch_sweep(parent, spec.varied_paths, metric, mode, options.console)
                        if options.console else nullcontext())
            with watching, stops.safe_points():
                results = tuner.fit()
            run.lap("tune_fit")
        # Trial directories are named by trial id (an errored trial may not have reported any metric).
        errored = {Path(result.path).name for result in results if result.error is not None}
        final_checkpoints = {Path(result.path).name: result.checkpoint.path for result in results
                             if result.error is None and result.checkpoint and result.metrics.get("final")}
        closed = sweep_report.close_trials(parent, metric, mode, errored, final_checkpoints)
        _prune(results, final_checkpoints)
        finished = [t for t in closed if t["checkpoint"] and t["best"] is not None and math.isfinite(t["best"])]
        if not finished:
            raise JobFailed("no trial finished; see the child runs' errors in MLflow")
        best = best_trial(finished, mode)
        summary = sweep_report.log_summary(parent, closed, best, spec.varied_paths, metric, mode,
                                           wall_s=run.elapsed())
        run.lap("report")
        outcome = trials.promote(spec, best, metric, mode)
        run.lap("promote")
    note = (f"best trial {best['run_id']}: {best['config']} ({summary['trials_finished']} of {summary['trials']} "
            f"trials finished, {summary['trials_stopped_early']} stopped early)")
    return RunSummary(run_id=parent, experiment=spec.experiment, metrics=outcome.pop("test_metrics"),
                      timings=run.timings, notes=[note],
                      details={"best_trial_run_id": best["run_id"], "best_config": best["config"],
                               metric: best["best"], **summary, **outcome})
