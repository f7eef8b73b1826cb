"""The same 16-trial random search on digits_mlp, with FIFO and with ASHA, in one run.

    .venv/bin/python bench/sweep_asha.py [--trials 16] [--epochs 30]

Prints one JSON object: per scheduler the wall time, trial-epochs actually trained (epochs logged
by the trials, including the ones run between a stop decision and the trial's end), trials stopped
early and the best validation accuracy; then ASHA/FIFO ratios (ASHA halving, as the job files use
it, and keeping a third per rung), and the sweep overhead: wall time against the sum of the trials'
training time. All sweeps sample the same configurations (seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]


# name -> (scheduler, reduction_factor): ASHA as the job files use it (halving), and with thirds
SCHEDULERS = {"fifo": ("fifo", 2), "asha": ("asha", 2), "asha_rf3": ("asha", 3)}


def sweep_document(name: str, scheduler: str, reduction_factor: float, trials: int, epochs: int) -> dict:
    return {
        "kind": "sweep", "name": name, "base": str(ROOT / "jobs/digits_mlp.yaml"),
        "space": {"optim.lr": {"loguniform": [0.0001, 0.03]},
                  "model.params.hidden_sizes": {"choice": [[32], [128, 64], [256, 128]]},
                  "model.params.dropout": {"uniform": [0.0, 0.5]}},
        "scheduler": {"name": scheduler, "grace_period": 2, "reduction_factor": reduction_factor},
        "metric": "val_accuracy", "num_samples": trials, "register": {"enabled": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    os.environ["DEEPYARD_HOME"] = tempfile.mkdtemp(prefix="deepyard-sweep-bench-")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from deepyard import cluster
    from deepyard.runners.summary import RunOptions
    from deepyard.runners.sweep import run
    from deepyard.spec import parse_spec

    results = {}
    with cluster.connected():
        for scheduler, (name, reduction_factor) in SCHEDULERS.items():
            spec = parse_spec(sweep_document(f"bench_{scheduler}", name, reduction_factor, args.trials, args.epochs),
                              str(ROOT / "bench/sweep_asha.py"),
                              [f"base.train.epochs={args.epochs}", "base.train.early_stopping=null"])
            started = time.perf_counter()
            summary = run(spec, RunOptions()).to_json()
            wall = time.perf_counter() - started
            results[scheduler] = {
                "wall_s": wall, "trial_epochs": summary["trial_epochs"], "trials": summary["trials"],
                "trials_stopped_early": summary["trials_stopped_early"],
                "best_val_accuracy": summary["val_accuracy"], "best_config": summary["best_config"],
                "test_accuracy_of_best": summary["metrics"]["test_accuracy"],
                "trials_train_s": summary["trials_train_s"],
                "overhead_ratio_wall_vs_train": wall / summary["trials_train_s"],
                # the part the scheduler acts on, and the fixed costs around it
                "tune_fit_s": summary["timings"]["tune_fit_s"], "timings": summary["timings"],
            }
            print(json.dumps({scheduler: results[scheduler]}), file=sys.stderr)
    fifo = results["fifo"]
    comparison = {}
    for name in ("asha", "asha_rf3"):
        asha = results[name]
        comparison[f"{name}_vs_fifo"] = {
            "trial_epochs": asha["trial_epochs"] / fifo["trial_epochs"],
            "wall": asha["wall_s"] / fifo["wall_s"],
            "tune_fit": asha["tune_fit_s"] / fifo["tune_fit_s"],
            "best_val_accuracy_gap_points": 100 * (fifo["best_val_accuracy"] - asha["best_val_accuracy"]),
        }
    name = record.variant("sweep_asha", args.trials != parser.get_default("trials") and f"trials{args.trials}",
                          args.epochs != parser.get_default("epochs") and f"epochs{args.epochs}")
    record.save(name, {"bench": "sweep_asha", "trials": args.trials, "epochs_per_trial": args.epochs,
                       "cpus": os.cpu_count(), **results, **comparison})


if __name__ == "__main__":
    main()
