"""deepyard (TorchTrainer) against a plain single-process PyTorch loop: same model, same data.

    .venv/bin/python bench/train_overhead.py [--epochs 4] [--samples 12000]

Prints one JSON object:
- steady-state training samples/s (median over epochs after the first) of the plain loop and of
  deepyard with 1 worker (2 CPUs) and with 2 workers (1 CPU each), and their ratios;
- wall time of each whole job, and deepyard's fixed cost = wall time minus time spent training
  and evaluating, split into MLflow start, Ray start, fit() overhead and model logging;
- the same fixed cost against a long-lived local cluster (`ray start --head`, via RAY_ADDRESS);
- one job with Ray Train's default 2 s health-check interval instead of deepyard's 0.1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
kind: train
name: overhead
data: {{name: fashion_mnist, max_train_samples: {samples}, val_fraction: 0.05}}
model: {{name: cnn, params: {{channels: [16, 32], hidden_sizes: [64], dropout: 0.0}}}}
optim: {{name: adam, lr: 0.001}}
train: {{epochs: {epochs}, batch_size: 128, seed: 0}}
scaling: {{num_workers: 1, cpus_per_worker: 2}}
register: {{enabled: false}}
"""


def plain_loop(spec_path: str) -> dict:
    """The loop a user would write without deepyard: one process, no Ray, no tracking."""
    started = time.perf_counter()
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from deepyard.runners.setup import build, load_data
    from deepyard.spec import load_spec

    spec = load_spec(spec_path)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    splits = load_data(spec)
    model, task = build(spec, splits)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.optim.lr)
    loader = DataLoader(TensorDataset(torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train)),
                        batch_size=128, shuffle=True)
    rates, seconds = [], 0.0
    for _ in range(spec.train.epochs):
        model.train()
        epoch_start = time.perf_counter()
        for inputs, targets in loader:
            loss = task.loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        elapsed = time.perf_counter() - epoch_start
        seconds += elapsed
        rates.append(len(splits.x_train) / elapsed)
        model.eval()
        with torch.inference_mode():
            model(torch.from_numpy(splits.x_val))
    return {"samples_per_s": statistics.median(rates[1:] or rates), "train_s": seconds,
            "wall_s": time.perf_counter() - started}


def deepyard_job(spec_path: str, home: str, *overrides: str, env: dict | None = None) -> dict:
    command = [str(ROOT / ".venv/bin/deepyard"), "run", spec_path, "--json"]
    for override in overrides:
        command += ["--set", override]
    environment = {**os.environ, "DEEPYARD_HOME": home, **(env or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=True)
    wall = time.perf_counter() - started
    summary = json.loads(done.stdout.strip().splitlines()[-1])

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    from mlflow import MlflowClient

    client = MlflowClient()

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(summary["run_id"], key), key=lambda m: m.step)]

    rates, samples = history("samples_per_s"), history("train_samples")
    train_s = sum(n / r for n, r in zip(samples, rates))
    del os.environ["MLFLOW_TRACKING_URI"]
    timings = summary["timings"]
    return {
        "samples_per_s": statistics.median(rates[1:] or rates),
        "train_s": train_s,
        "wall_s": wall,
        "fixed_cost_s": wall - train_s,
        "breakdown_s": {
            "process_start_imports_and_data_check": wall - timings["total_s"],
            "ray_start": timings["ray_connect_s"],
            "mlflow_run_start (overlaps ray_start)": timings["mlflow_start_s"],
            "fit_minus_training": timings["fit_s"] - train_s,
            "model_logging_and_teardown": timings["total_s"] - timings["fit_s"] - timings["startup_s"],
        },
        "test_accuracy": summary["metrics"]["test_accuracy"],
    }


def warm_cluster(home: str):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([str(ROOT / ".venv/bin/ray"), "start", "--head", "--num-cpus=2", "--port=6391",
                    "--include-dashboard=false", f"--temp-dir={home}/ray_tmp", "--disable-usage-stats"],
                   check=True, capture_output=True, env={**env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"})
    return {"RAY_ADDRESS": "127.0.0.1:6391", "RAY_AUTH_MODE": "disabled"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=12000)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="deepyard-overhead-")
    spec_path = str(Path(work) / "overhead.yaml")
    Path(spec_path).write_text(SPEC.format(samples=args.samples, epochs=args.epochs))

    plain = plain_loop(spec_path)
    one = deepyard_job(spec_path, f"{work}/one")
    # Ray Train's default 2 s health-check poll, against deepyard's 0.1 s: does polling cost throughput?
    slow_poll = deepyard_job(spec_path, f"{work}/slow_poll", env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"})
    two = deepyard_job(spec_path, f"{work}/two", "scaling.num_workers=2", "scaling.cpus_per_worker=1")
    warm_env = warm_cluster(work)
    try:
        deepyard_job(spec_path, f"{work}/warm", env=warm_env)  # the first job on a new cluster warms it
        warm = deepyard_job(spec_path, f"{work}/warm", env=warm_env)
    finally:
        subprocess.run([str(ROOT / ".venv/bin/ray"), "stop", "--force"], check=False, capture_output=True)

    name = record.variant("train_overhead", args.epochs != parser.get_default("epochs") and f"epochs{args.epochs}",
                          args.samples != parser.get_default("samples") and f"samples{args.samples}")
    record.save(name, {
        "bench": "train_overhead",
        "setup": {"data": "fashion_mnist", "train_samples": args.samples, "epochs": args.epochs,
                  "model": "cnn [16, 32] + 64", "batch_size": 128, "cpus": os.cpu_count()},
        "plain": plain,
        "deepyard_1_worker": one,
        "deepyard_1_worker_health_check_2s": slow_poll,
        "deepyard_2_workers": two,
        "deepyard_1_worker_warm_cluster": warm,
        "ratio_samples_per_s_1_worker_vs_plain": one["samples_per_s"] / plain["samples_per_s"],
        "ratio_samples_per_s_2_workers_vs_1": two["samples_per_s"] / one["samples_per_s"],
        "fixed_cost_s_cold": one["fixed_cost_s"],
        "fixed_cost_s_warm_cluster": warm["fixed_cost_s"],
    })


if __name__ == "__main__":
    sys.exit(main())
