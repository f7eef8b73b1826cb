"""Forecasting against the naive baselines, on the same chronological test span.

    .venv/bin/python bench/forecast.py [--job jobs/sunspots_lstm.yaml] [--season 11]
    .venv/bin/python bench/forecast.py --job jobs/co2_gru.yaml --season 52

Trains the job (on a local Ray cluster, tracked in MLflow as usual), then scores on its test
windows: persistence (next value = last value) and seasonal naive (next value = the value one
season earlier). Prints one JSON object: the model's and the baselines' RMSE and MAE, and how far
below persistence the model's RMSE is. Goal: at least 15% below.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import record

ROOT = Path(__file__).resolve().parents[1]
# `make bench`'s runs by job: (result name, season); another job or season is another result
RUNS = {"sunspots_lstm": ("forecast_sunspots", 11), "co2_gru": ("forecast_co2", 52)}


def scores(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    error = predicted - actual
    return {"rmse": float(np.sqrt(np.mean(error**2))), "mae": float(np.mean(np.abs(error)))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", default=str(ROOT / "jobs/sunspots_lstm.yaml"))
    parser.add_argument("--season", type=int, default=11, help="steps per season for the seasonal naive forecast")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deepyard-forecast-bench-")
    os.environ["DEEPYARD_HOME"] = home
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    from deepyard.runners.setup import load_data
    from deepyard.runners.train import run
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import load_spec

    spec = load_spec(args.job)
    splits = load_data(spec)
    windows, actual = splits.x_test[..., 0], splits.y_test
    if args.season > windows.shape[1]:
        raise SystemExit(f"--season {args.season} is longer than the lookback {windows.shape[1]}")
    started = time.perf_counter()
    summary = run(spec, RunOptions()).to_json()
    model = {"rmse": summary["metrics"]["test_rmse"], "mae": summary["metrics"]["test_mae"]}
    # On a differenced series the windows hold changes: persistence (the level stays) predicts no
    # change, and the seasonal naive forecast repeats the change of one season before.
    differenced = bool(spec.data.params.get("difference"))
    persistence = scores(np.zeros_like(actual) if differenced else windows[:, -1], actual)
    seasonal = scores(windows[:, -args.season], actual)  # the value one season before the target
    job = Path(args.job).stem
    base, season = RUNS.get(job, (f"forecast_{job}", None))
    name = record.variant(base, season != args.season and f"season{args.season}")
    record.save(name, {
        "bench": "forecast", "job": Path(args.job).name, "test_windows": len(actual), "differenced": differenced,
        "wall_s": time.perf_counter() - started, "epochs_run": summary["epochs_run"],
        "model": model, "persistence": persistence, f"seasonal_naive_{args.season}": seasonal,
        "rmse_below_persistence": 1 - model["rmse"] / persistence["rmse"],
        "rmse_below_seasonal_naive": 1 - model["rmse"] / seasonal["rmse"],
    })


if __name__ == "__main__":
    main()
