"""What the job host's preload buys a driver it forks: MLflow's first store and run, and logging a
small model, timed in forked children of a process that imported the libraries only (torch, Ray,
MLflow: the host before abe95b8) or everything ``job_host.PRELOAD`` names and MLflow's package map
(the host now), interleaved.

    .venv/bin/python bench/host_preload.py [--rounds 3] [--forks 3]

Each child opens a new sqlite store in a folder of its own, creates an experiment and a run, then
logs and registers an MLP (``tracking.log_model``, as a job's driver does), and reports both times.
Each host variant runs in a process of its own (an import cannot be undone). Prints medians and
their ratios (now / libraries only).
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

import record

# What the host preloaded before abe95b8: the libraries only.
LIBRARIES = ("torch", "torch._dynamo", "ray", "ray.tune", "ray.train", "ray.train.torch", "ray.data", "mlflow",
             "mlflow.pytorch", "ray.rllib", "gymnasium", "pandas", "pyarrow", "pydantic", "typer", "rich", "yaml")
CHILD = f"LIBRARIES = {LIBRARIES!r}" + """
import importlib, json, os, sys, tempfile, time
from deepyard import job_host, warm
names = job_host.PRELOAD if sys.argv[1] == "full" else LIBRARIES
for name in names:
    importlib.import_module(name)
if sys.argv[1] == "full":
    warm.map_installed_packages()
for _ in range(int(sys.argv[2])):
    read, write = os.pipe()
    if (pid := os.fork()) == 0:
        home = tempfile.mkdtemp()
        os.environ.update(DEEPYARD_HOME=home, MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db")
        started = time.perf_counter()
        import numpy as np
        import torch
        from deepyard import tracking
        store = tracking.client()
        run = store.create_run(store.create_experiment("bench"))
        opened = time.perf_counter()
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 10))
        tracking.log_model(run.info.run_id, model, np.zeros((2, 1, 28, 28), np.float32), registered_name="bench",
                           metadata={}, version_tags={"run_id": run.info.run_id})
        os.write(write, json.dumps({"store_and_run_s": opened - started,
                                    "log_model_s": time.perf_counter() - opened}).encode())
        os._exit(0)
    os.close(write)
    print(os.read(read, 4096).decode(), flush=True)
    os.close(read)
    os.waitpid(pid, 0)
"""


def forked_drivers(variant: str, forks: int) -> list[dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, variant, str(forks)], capture_output=True, text=True,
                          check=True, cwd=tempfile.gettempdir())
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [{**line, "host_process_s": time.perf_counter() - started} for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forks", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"libraries_only": [], "full": []}
    for _ in range(args.rounds):
        for variant, name in (("libraries", "libraries_only"), ("full", "full")):
            runs[name] += forked_drivers(variant, args.forks)
    median = {name: {key: statistics.median(run[key] for run in done) for key in ("store_and_run_s", "log_model_s")}
              for name, done in runs.items()}
    record.save("host_preload", {
        "bench": "host_preload", "rounds": args.rounds, "forks_per_round": args.forks, "cpus": os.cpu_count(),
        "medians": median,
        "ratio_store_and_run_full_vs_libraries": median["full"]["store_and_run_s"]
        / median["libraries_only"]["store_and_run_s"],
        "ratio_log_model_full_vs_libraries": median["full"]["log_model_s"] / median["libraries_only"]["log_model_s"],
        "saved_s_per_driver": sum(median["libraries_only"].values()) - sum(median["full"].values()),
        "each": {name: [{k: round(v, 3) for k, v in run.items()} for run in done] for name, done in runs.items()},
    })


if __name__ == "__main__":
    main()
