"""deepyard against a plain single-process PyTorch loop: same model, same data, interleaved repeats.

    .venv/bin/python bench/train_overhead.py [--pairs 5] [--epochs 4] [--samples 12000] [--before SRC]

Each repeat runs, one after another: the plain loop; a deepyard job with 1 worker (2 CPUs) on its
own embedded cluster (cold); the same while `deepyard cluster up --workers 0` is up (one 2-CPU
node), which `deepyard run` joins by itself, its driver forked by the cluster's job host (warm); the
same in a process of its own (``DEEPYARD_JOB_HOST=0``: warm alone, as before the host); 2 workers
of 1 CPU each (cold); and, with ``--before SRC``, the 1-worker job cold and warm with another
checkout's ``src`` first on PYTHONPATH (the design being replaced, side by side; its warm jobs join a
cluster of its own, started with that ``src``, as `deepyard run` joins only a cluster that runs its
own code).
Prints medians over the repeats:
- steady-state training samples/s (median over epochs after the first) and the ratios 1 worker /
  plain and 2 workers / 1 worker;
- each job's fixed cost = wall time minus time spent training (from the run's per-epoch metrics),
  split into process start and data check, Ray start, fit() beyond training (and, inside it, the
  trial's start, its setup, its validation and its test split, as the run's timings say), model
  logging; and the plain loop's own (imports, data, evaluation) beside it.
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
# The environment the commands get: this process's as it started (the plain loop's torch adds to its
# own, e.g. TORCHINDUCTOR_CACHE_DIR), as a user's shell would give every command the same.
SHELL = dict(os.environ)
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
    environment = {**SHELL, "DEEPYARD_HOME": home, **(env or {})}
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
            "fit_minus_training": timings["fit_s"] - train_s,
            "model_logging_and_teardown": timings["total_s"] - timings["fit_s"] - timings["startup_s"],
            # inside fit, as the trial reports it (checkouts from before 2026-12-04 report none)
            **{f"in_fit_{name}": timings[name] for name in ("trial_start_s", "trial_setup_s", "validation_s",
                                                             "test_s") if name in timings},
            # a streaming job's pass over its data (statistics, checks) once Ray is up
            **({"data_stats": timings["data_stats_s"] - timings["ray_connect_s"]} if "data_stats_s" in timings else {}),
        },
        "test_accuracy": summary["metrics"].get("test_accuracy"),
        "test_metrics": summary["metrics"],
        "tokens_per_s": statistics.median(tokens[1:] or tokens) if (tokens := history("tokens_per_s")) else None,
        "worker_peak_rss_mb": summary.get("worker_peak_rss_mb") or 0.0,
    }


ALONE = {"DEEPYARD_JOB_HOST": "0"}  # the warm job in a process of its own, not driven from the job host


def warm_cluster(home: str, env: dict | None = None) -> None:
    """`deepyard cluster up` in the warm jobs' home: they join it (cli/jobs.py), as a user's would."""
    subprocess.run([str(ROOT / ".venv/bin/deepyard"), "cluster", "up", "--workers", "0", "--cpus-per-node", "2"],
                   check=True, capture_output=True, env={**SHELL, "DEEPYARD_HOME": home, **(env or {})})


def cluster_down(home: str, env: dict | None = None) -> None:
    subprocess.run([str(ROOT / ".venv/bin/deepyard"), "cluster", "down"], check=False, capture_output=True,
                   env={**SHELL, "DEEPYARD_HOME": home, **(env or {})})


def medians(runs: list[dict]) -> dict:
    """The median of every number over the repeats (nested dicts kept), and the repeats' values."""
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = medians([run[key] for run in runs])
        elif all(isinstance(run[key], (int, float)) for run in runs):
            out[key] = statistics.median(run[key] for run in runs)
        else:  # (a value some runs lack, e.g. a metric the task leaves None)
            out[key] = [run[key] for run in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=5, help="interleaved repeats of every variant")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=12000)
    parser.add_argument("--before", help="another checkout's src folder: its 1-worker job runs beside this one's")
    parser.add_argument("--cold-only", action="store_true", help="the plain loop and the 1-worker jobs on clusters "
                                                                 "of their own only (and --before's)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="deepyard-overhead-")
    spec_path = str(Path(work) / "overhead.yaml")
    Path(spec_path).write_text(SPEC.format(samples=args.samples, epochs=args.epochs))
    before_env = {"PYTHONPATH": os.pathsep.join(filter(None, [args.before, os.environ.get("PYTHONPATH")]))}

    warm = not args.cold_only
    runs: dict[str, list[dict]] = {"plain": [], "one_worker_cold": [],
                                   **({"one_worker_warm": [], "one_worker_warm_alone": [], "two_workers_cold": []}
                                      if warm else {})}
    if args.before:
        runs["before_one_worker_cold"] = []
        if warm:
            runs["before_one_worker_warm"] = []
            warm_cluster(f"{work}/warm_before", before_env)
    if warm:
        warm_cluster(f"{work}/warm")
    try:
        if warm:
            deepyard_job(spec_path, f"{work}/warm")  # the first job on a new cluster warms it
        if args.before and warm:
            deepyard_job(spec_path, f"{work}/warm_before", env=before_env)
        for repeat in range(args.pairs):
            runs["plain"].append(plain_loop(spec_path))
            runs["one_worker_cold"].append(deepyard_job(spec_path, f"{work}/one{repeat}"))
            if warm:
                runs["one_worker_warm"].append(deepyard_job(spec_path, f"{work}/warm"))
                runs["one_worker_warm_alone"].append(deepyard_job(spec_path, f"{work}/warm", env=ALONE))
                runs["two_workers_cold"].append(deepyard_job(spec_path, f"{work}/two{repeat}",
                                                             "scaling.num_workers=2", "scaling.cpus_per_worker=1"))
            if args.before:
                runs["before_one_worker_cold"].append(deepyard_job(spec_path, f"{work}/before{repeat}", env=before_env))
            if args.before and warm:
                runs["before_one_worker_warm"].append(deepyard_job(spec_path, f"{work}/warm_before", env=before_env))
            print(json.dumps({"repeat": repeat, **{name: round(done[-1]["wall_s"], 1) for name, done in runs.items()}}),
                  file=sys.stderr)
        # (every warm job but the alone ones, the first included, should have been driven from the host)
        hosted = (Path(work) / "warm/cluster/host.log").read_text().count(" runs run ") if warm else None
    finally:
        if warm:
            cluster_down(f"{work}/warm")
        if args.before and warm:
            cluster_down(f"{work}/warm_before", before_env)

    median = {name: medians(done) for name, done in runs.items()}
    plain = median["plain"]
    plain_fixed = plain["wall_s"] - plain["train_s"]

    def ratio(of: str, to: str) -> float | None:
        if not runs.get(of):
            return None
        return statistics.median(a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs[of], runs[to]))

    def fixed(variant: str) -> float | None:
        return median[variant]["fixed_cost_s"] if variant in median else None

    def fixed_ratio(of: str, to: str, key: str = "fixed_cost_s") -> float | None:
        return median[of][key] / median[to][key] if of in median and to in median else None

    name = record.variant("train_overhead", args.epochs != parser.get_default("epochs") and f"epochs{args.epochs}",
                          args.samples != parser.get_default("samples") and f"samples{args.samples}",
                          args.cold_only and "cold")
    record.save(name, {
        "bench": "train_overhead",
        "setup": {"data": "fashion_mnist", "train_samples": args.samples, "epochs": args.epochs,
                  "model": "cnn [16, 32] + 64", "batch_size": 128, "cpus": os.cpu_count(), "repeats": args.pairs,
                  "before": args.before},
        "warm_jobs_driven_from_the_job_host": hosted,
        "medians": median,
        "wall_s_each": {name: [round(run["wall_s"], 2) for run in done] for name, done in runs.items()},
        "ratio_samples_per_s_1_worker_vs_plain": ratio("one_worker_cold", "plain"),
        "ratio_samples_per_s_1_worker_warm_vs_plain": ratio("one_worker_warm", "plain"),
        "ratio_samples_per_s_1_worker_warm_alone_vs_plain": ratio("one_worker_warm_alone", "plain"),
        "ratio_samples_per_s_2_workers_vs_1": ratio("two_workers_cold", "one_worker_cold"),
        "plain_fixed_cost_s": plain_fixed,
        "fixed_cost_s_cold": fixed("one_worker_cold"),
        "fixed_cost_s_warm_cluster": fixed("one_worker_warm"),
        "fixed_cost_s_warm_alone": fixed("one_worker_warm_alone"),
        "ratio_fixed_cost_warm_host_vs_alone": fixed_ratio("one_worker_warm", "one_worker_warm_alone"),
        "ratio_wall_warm_host_vs_alone": fixed_ratio("one_worker_warm", "one_worker_warm_alone", "wall_s"),
        "fixed_cost_s_2_workers_cold": fixed("two_workers_cold"),
        "fixed_cost_s_before_cold": fixed("before_one_worker_cold"),
        "ratio_fixed_cost_cold_vs_before": fixed_ratio("one_worker_cold", "before_one_worker_cold"),
        "fixed_cost_s_before_warm": fixed("before_one_worker_warm"),
        "ratio_fixed_cost_warm_vs_before": fixed_ratio("one_worker_warm", "before_one_worker_warm"),
    })


if __name__ == "__main__":
    sys.exit(main())
