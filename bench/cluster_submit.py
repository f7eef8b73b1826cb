"""The cost of going through a cluster: one small train job three ways, on a local multi-node cluster
(`deepyard cluster up`: a head and one worker node).

    .venv/bin/python bench/cluster_submit.py [--job jobs/digits_mlp.yaml] [--set train.epochs=3] [--repeats 2]

- submit: `deepyard submit` (the job API; spec and code uploaded), timed to RUNNING and to SUCCEEDED;
- run on the cluster: `deepyard run` with RAY_ADDRESS at the running cluster (no Ray start-up);
- run embedded: `deepyard run` starting its own local Ray, the laptop default (the baseline).
Each is a fresh CLI process. Prints one JSON object with the medians and the ratios to the baseline.
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
CLI = [sys.executable, "-m", "deepyard"]
OVERRIDES = ["train.epochs=3"]  # without --set


def timed_run(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], check=False, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - started


def timed_submit(job: str, overrides: list[str], env: dict[str, str]) -> dict[str, float]:
    from deepyard import submit

    started = time.perf_counter()
    done = subprocess.run([*CLI, "submit", job, *overrides, "--json"], check=False, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    job_id = json.loads(done.stdout.strip().splitlines()[-1])["submission_id"]
    submitted = time.perf_counter() - started
    client = submit.client(None)
    running = None
    while (status := str(client.get_job_status(job_id))) not in submit.TERMINAL:
        if status == "RUNNING" and running is None:
            running = time.perf_counter() - started
        time.sleep(0.05)
    assert status == "SUCCEEDED", client.get_job_logs(job_id)[-2000:]
    return {"submit_returned_s": submitted, "to_running_s": running or submitted,
            "to_succeeded_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", default=str(ROOT / "jobs/digits_mlp.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    overrides = [part for value in (args.overrides or OVERRIDES)
                 for part in ("--set", value)]
    home = tempfile.mkdtemp(prefix="deepyard-cluster-bench-")
    os.environ.update({"DEEPYARD_HOME": home, "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"})
    os.environ.pop("RAY_ADDRESS", None)
    from deepyard import local_cluster

    env = dict(os.environ)
    embedded = [timed_run(["run", args.job, *overrides], env) for _ in range(args.repeats)]
    started = time.perf_counter()
    state = local_cluster.up(workers=1)
    cluster_up_s = time.perf_counter() - started
    try:
        on_cluster = [timed_run(["run", args.job, *overrides], {**env, "RAY_ADDRESS": state["gcs_address"]})
                      for _ in range(args.repeats)]
        submitted = [timed_submit(args.job, overrides, env) for _ in range(args.repeats)]
    finally:
        local_cluster.down()

    baseline = statistics.median(embedded)
    to_running = statistics.median(s["to_running_s"] for s in submitted)
    to_succeeded = statistics.median(s["to_succeeded_s"] for s in submitted)
    # another job or other overrides: another result
    name = record.variant("cluster_submit",
                          Path(args.job).stem != Path(parser.get_default("job")).stem and Path(args.job).stem,
                          *(args.overrides if args.overrides not in (None, OVERRIDES) else []))
    record.save(name, {
        "bench": "cluster_submit", "job": Path(args.job).name, "overrides": overrides, "cpus": os.cpu_count(),
        "repeats": args.repeats, "cluster_up_s": cluster_up_s,
        "run_embedded_s": embedded, "run_on_cluster_s": on_cluster, "submit": submitted,
        "median": {"run_embedded_s": baseline, "run_on_cluster_s": statistics.median(on_cluster),
                   "submit_to_running_s": to_running, "submit_to_succeeded_s": to_succeeded},
        "ratio_submit_to_succeeded_vs_run_embedded": to_succeeded / baseline,
        "ratio_run_on_cluster_vs_run_embedded": statistics.median(on_cluster) / baseline,
    })


if __name__ == "__main__":
    main()
