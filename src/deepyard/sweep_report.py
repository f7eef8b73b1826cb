"""What a sweep leaves on its parent MLflow run: the trials table (CSV), the best config, and plots."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from deepyard import tracking


def _trial(run, metric: str, mode: str) -> dict[str, Any]:
    history = [v for _, v in sorted(tracking.metric_history(run.info.run_id, metric)) if math.isfinite(v)]
    pick = max if mode == "max" else min
    metrics = run.data.metrics
    return {
        "trial_id": run.data.tags.get("deepyard.trial_id"),
        "run_id": run.info.run_id,
        "status": run.info.status,
        "config": json.loads(run.data.tags.get("deepyard.trial_config", "{}")),
        "epochs": int(metrics.get("epoch", metrics.get("iteration", 0))),  # (an rl trial's iterations)
        # A finished trial logged the value its checkpoint was chosen by; a stopped one has its history.
        "best": metrics.get(f"best_{metric}", pick(history) if history else None),
        "tie": metrics.get("best_tie_breaker"),  # the best epoch's validation loss: breaks ties
        "last": history[-1] if history else None,
        "checkpoint": run.data.tags.get("deepyard.final_checkpoint"),
        "stopped_early": run.data.tags.get("deepyard.stopped_early") == "true",
        "train_s": sum(n / r for n, r in zip(
            [v for _, v in sorted(tracking.metric_history(run.info.run_id, "train_samples"))],
            [v for _, v in sorted(tracking.metric_history(run.info.run_id, "samples_per_s"))]) if r)
        + sum(v for _, v in tracking.metric_history(run.info.run_id, "iteration_s")),
    }


def close_trials(parent_run_id: str, metric: str, mode: str, errored_dirs: set[str],
                 final_checkpoints: dict[str, str]) -> list[dict[str, Any]]:
    """Every child run, closed and labelled; the trials table, one row per trial.

    A trial a scheduler stopped had its actors killed mid-fit, so its run is left RUNNING (or
    FAILED, if the trial saw the kill as an error): unless Tune says the trial errored (its trial
    directory is in ``errored_dirs``), it becomes KILLED with ``deepyard.stopped_early``. A finished
    inline trial's final checkpoint is Tune's (``final_checkpoints``, by trial id): it is tagged here.
    A trial that ran again after ``--resume`` keeps its newest run; the interrupted ones are marked
    ``deepyard.interrupted``.
    """
    latest: dict[str, Any] = {}
    for run in sorted(tracking.child_runs(parent_run_id), key=lambda r: r.info.start_time):
        trial_id = run.data.tags.get("deepyard.trial_id", run.info.run_id)
        if (older := latest.get(trial_id)) is not None:
            if older.info.status == "RUNNING":
                tracking.set_tags(older.info.run_id, {"deepyard.interrupted": "true"})
                tracking.finish_run(older.info.run_id, "KILLED")
        latest[trial_id] = run
    trials = []
    for trial_id, run in latest.items():
        if trial_id in final_checkpoints and "deepyard.final_checkpoint" not in run.data.tags:
            tracking.set_tags(run.info.run_id, {"deepyard.final_checkpoint": final_checkpoints[trial_id]})
            run = tracking.get_run(run.info.run_id)
        if run.info.status != "FINISHED":
            if trial_id in errored_dirs:
                tracking.finish_run(run.info.run_id, "FAILED")
            else:
                tracking.set_tags(run.info.run_id, {"deepyard.stopped_early": "true"})
                tracking.finish_run(run.info.run_id, "KILLED")
            run = tracking.get_run(run.info.run_id)
        trials.append(_trial(run, metric, mode))
    return sorted(trials, key=lambda t: t["trial_id"] or "")


def close_interrupted(parent_run_id: str) -> None:
    """The sweep itself stopped: trials still RUNNING are KILLED and marked ``deepyard.interrupted``."""
    for run in tracking.child_runs(parent_run_id):
        if run.info.status == "RUNNING":
            tracking.set_tags(run.info.run_id, {"deepyard.interrupted": "true"})
            tracking.finish_run(run.info.run_id, "KILLED")


def log_summary(parent_run_id: str, trials: list[dict], best: dict, paths: list[str], metric: str, mode: str,
                wall_s: float) -> dict[str, Any]:
    from deepyard import plots

    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["trial_id", "run_id", "status", "stopped_early", "epochs", f"best_{metric}", f"last_{metric}",
                     "train_s", *paths])
    for t in trials:
        writer.writerow([t["trial_id"], t["run_id"], t["status"], t["stopped_early"], t["epochs"], t["best"],
                         t["last"], round(t["train_s"], 3), *(json.dumps(t["config"].get(p)) for p in paths)])
    tracking.log_text(parent_run_id, table.getvalue(), "trials.csv")
    tracking.log_dict(parent_run_id, {"config": best["config"], metric: best["best"], "run_id": best["run_id"]},
                      "best_config.json")

    scored = [t for t in trials if t["best"] is not None]
    tracking.log_figure(parent_run_id, plots.metric_vs_params(scored, paths, metric), "plots/metric_vs_params.png")
    top = sorted(scored, key=lambda t: t["best"], reverse=mode == "max")[:5]
    curves = {f"{t['trial_id']}": tracking.metric_history(t["run_id"], metric) for t in top}
    tracking.log_figure(parent_run_id, plots.trial_curves(curves, metric), "plots/top_trials.png")

    trial_epochs = sum(t["epochs"] for t in trials)
    train_s = sum(t["train_s"] for t in trials)
    summary = {"trials": len(trials), "trials_finished": sum(bool(t["checkpoint"]) for t in trials),
               "trials_stopped_early": sum(t["stopped_early"] for t in trials), "trial_epochs": trial_epochs,
               "sweep_wall_s": wall_s, "trials_train_s": train_s}
    tracking.log_metrics(parent_run_id, {f"best_{metric}": best["best"], **summary}, 0)
    return summary
