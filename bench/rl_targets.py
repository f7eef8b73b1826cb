"""The shipped off-policy jobs to their goals: DQN on CartPole to a greedy mean return of 450, SAC on
Pendulum to -200. Each runs as `deepyard run` would (a local Ray cluster, tracked in MLflow).

    .venv/bin/python bench/rl_targets.py [--jobs jobs/cartpole_dqn.yaml jobs/pendulum_sac.yaml]

Prints one JSON object: per job, whether the goal was reached, env steps, wall seconds (start-up,
training, finishing) and the registered policy's return on fresh test episodes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]
JOBS = [str(ROOT / "jobs/cartpole_dqn.yaml"), str(ROOT / "jobs/pendulum_sac.yaml")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", nargs="+", default=JOBS)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deepyard-rl-targets-")
    os.environ["DEEPYARD_HOME"] = home
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    from deepyard import tracking
    from deepyard.runners.rl import run
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import load_spec

    results = {}
    for job in args.jobs:
        spec = load_spec(job)
        started = time.perf_counter()
        summary = run(spec, RunOptions()).to_json()
        evaluations = tracking.metric_history(summary["run_id"], "eval_return_mean")
        results[spec.name] = {
            "algorithm": spec.algorithm, "env": spec.env.id, "goal": spec.stop.mean_return,
            "reached": summary["stop_reason"].startswith("mean return"), "stop_reason": summary["stop_reason"],
            "env_steps": summary["metrics"]["timesteps"], "wall_s": time.perf_counter() - started,
            "timings": summary["timings"], "test_return_mean": summary["metrics"]["test_return_mean"],
            "eval_returns": [[step, value] for step, value in sorted(evaluations)],
        }
    jobs = [Path(job).stem for job in args.jobs]
    name = "rl_targets" if jobs == [Path(job).stem for job in JOBS] else record.variant("rl_targets", *jobs)
    record.save(name, {"bench": "rl_targets", "cpus": os.cpu_count(), "results": results})


if __name__ == "__main__":
    main()
