"""PPO on CartPole-v1 to a greedy evaluation mean return of 475: deepyard (RLlib on a local Ray
cluster, tracked in MLflow) next to stable-baselines3 in one process, evaluated the same way.

    .venv/bin/python bench/rl_cartpole.py [--job jobs/cartpole_ppo.yaml] [--target 475] [--seeds 3] [--warm]
                                          [--before SRC]

Both evaluate 10 greedy episodes about every 4,000 environment steps and stop at the first
evaluation whose mean reaches the target; each runs with seeds 0..N-1 and the medians are
compared (the runs interleaved, seed by seed). SB3 uses the rl-zoo hyperparameters for CartPole-v1
(8 envs, n_steps 32, batch 256, 20 epochs, gamma 0.98, GAE lambda 0.8, linear lr 1e-3 and clip
0.2). stable-baselines3 is a bench-only dependency: pip install "stable-baselines3>=2.3,<3".
Each deepyard job runs in a process of its own, so that Ray's and RLlib's imports count every
time, as they do for `deepyard run`; with ``--before SRC``, another checkout's job runs beside it.
With ``--warm``, also `deepyard run` itself on that cluster (its driver forked by the job host).
Prints one JSON object; the goal is a wall-time ratio deepyard/SB3 <= 1.0.
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


def sb3_to_target(target: float, eval_every: int = 4096, episodes: int = 10, max_steps: int = 300_000,
                  seed: int = 0) -> dict:
    import gymnasium
    import numpy as np
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    def linear(start: float):
        return lambda remaining: remaining * start

    class EvaluateAndStop(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next_at, self.eval_s, self.evaluations, self.reached_at = eval_every, 0.0, [], None
            self.env = gymnasium.make("CartPole-v1")

        def _on_step(self) -> bool:
            if self.num_timesteps < self.next_at:
                return True
            self.next_at += eval_every
            started = time.perf_counter()
            returns = []
            for episode in range(episodes):
                observation, _ = self.env.reset(seed=seed + episode)
                total, done = 0.0, False
                while not done:
                    action, _ = self.model.predict(observation, deterministic=True)
                    observation, reward, terminated, truncated, _ = self.env.step(int(action))
                    total, done = total + reward, terminated or truncated
                returns.append(total)
            self.eval_s += time.perf_counter() - started
            self.evaluations.append((self.num_timesteps, float(np.mean(returns))))
            if np.mean(returns) >= target:
                self.reached_at = self.num_timesteps
                return False
            return True

    started = time.perf_counter()
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                ent_coef=0.0, learning_rate=linear(1e-3), clip_range=linear(0.2), seed=seed, device="cpu")
    callback = EvaluateAndStop()
    model.learn(total_timesteps=max_steps, callback=callback)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "wall_without_eval_s": wall - callback.eval_s, "env_steps": callback.reached_at,
            "reached": callback.reached_at is not None, "evaluations": callback.evaluations}


def deepyard_in_a_process(job: str, target: float, seed: int, address: str | None, src: str | None = None,
                          home: str | None = None) -> dict:
    """One deepyard job in a process of its own, as `deepyard run` is: its imports count each time.
    ``src``: another checkout's source folder, first on the path (the design being replaced).
    ``home``: a DEEPYARD_HOME of its own (its MLflow store is built by this run)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import rl_cartpole; "
            f"print(json.dumps(rl_cartpole.deepyard_to_target({job!r}, {target!r}, {seed!r}, {address!r})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           **({"DEEPYARD_HOME": home, "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"} if home else {})}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_wall_s": time.perf_counter() - started}


def deepyard_command(job: str, target: float, seed: int) -> dict:
    """`deepyard run JOB --json` itself, as a user types it: on a running local cluster its driver is
    forked by the cluster's job host (``job_host``), with torch, Ray and MLflow loaded already."""
    started = time.perf_counter()
    done = subprocess.run([str(ROOT / ".venv/bin/deepyard"), "run", job, "--json", "--set",
                           f"stop.mean_return={target}", "--set", f"seed={seed}"], env=dict(os.environ),
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    timings = summary["timings"]
    return {"wall_s": wall, "to_target_s": timings["startup_s"] + timings["train_s"],
            "env_steps": summary["metrics"]["timesteps"], "iterations": summary["iterations"],
            "reached": summary["stop_reason"].startswith("mean return"), "timings": timings,
            "process_wall_s": wall, "notes": [line for line in done.stderr.splitlines() if "note:" in line]}


def deepyard_to_target(job: str, target: float, seed: int, address: str | None = None) -> dict:
    from deepyard import tracking
    from deepyard.runners.rl import run
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import load_spec

    spec = load_spec(job, [f"stop.mean_return={target}", f"seed={seed}"])
    started = time.perf_counter()
    summary = run(spec, RunOptions(address=address)).to_json()
    wall = time.perf_counter() - started
    evaluations = tracking.metric_history(summary["run_id"], "eval_return_mean")
    timings = summary["timings"]
    return {"wall_s": wall, "to_target_s": timings["startup_s"] + timings["train_s"],
            "env_steps": summary["metrics"]["timesteps"], "iterations": summary["iterations"],
            "reached": summary["stop_reason"].startswith("mean return"), "timings": timings,
            "eval_returns": [value for _, value in sorted(evaluations)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", default=str(ROOT / "jobs/cartpole_ppo.yaml"))
    parser.add_argument("--target", type=float, default=475)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--warm", action="store_true", help="join a running cluster (`deepyard cluster up "
                        "--workers 0`, started here) instead of starting Ray for each run")
    parser.add_argument("--before", help="another checkout's src folder: its job runs beside this one's, seed by seed")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deepyard-rl-bench-")
    os.environ["DEEPYARD_HOME"] = home
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"

    seeds = range(args.seeds)
    from deepyard import local_cluster

    # Interleaved, seed by seed: this machine's speed drifts over minutes (two runs of this bench
    # half an hour apart differed by 40%), and a drift must not fall on one side only. (--warm: the
    # idle cluster, ~0.07 of a core, runs beside SB3 too.)
    # (`deepyard cluster up` as a user runs it: a cluster started in this process would change this
    # process's environment, e.g. RAY_AUTH_MODE, and the commands it runs would not match the job host's)
    if args.warm:
        subprocess.run([str(ROOT / ".venv/bin/deepyard"), "cluster", "up", "--workers", "0"], check=True,
                       capture_output=True)
    state = local_cluster.read_state() if args.warm else None
    deepyard, sb3, before, commands = [], [], [], []
    try:
        for seed in seeds:
            address = state and state["gcs_address"]
            # (cold: each run in a new home, as train_overhead's cold jobs: a user's first job in a new
            # folder, its MLflow store built; warm: the cluster's home, its store there already)
            deepyard.append(deepyard_in_a_process(args.job, args.target, seed, address,
                                                  home=None if args.warm else f"{home}/now{seed}"))
            if args.warm:
                commands.append(deepyard_command(args.job, args.target, seed))
            sb3.append(sb3_to_target(args.target, seed=seed))
            if args.before:
                before.append(deepyard_in_a_process(args.job, args.target, seed, address, args.before,
                                                    home=None if args.warm else f"{home}/before{seed}"))
        hosted = (Path(home) / "cluster/host.log").read_text().count(" runs run ") if args.warm else 0
    finally:
        if state:
            subprocess.run([str(ROOT / ".venv/bin/deepyard"), "cluster", "down"], capture_output=True)

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs if run[key] is not None)

    job = Path(args.job).stem
    name = record.variant("rl_cartpole", job != Path(parser.get_default("job")).stem and job,
                          args.target != parser.get_default("target") and f"target{args.target:g}",
                          args.warm and "warm")
    record.save(name, {
        "bench": "rl_cartpole", "target_eval_mean_return": args.target, "cpus": os.cpu_count(), "seeds": args.seeds,
        "ray": "joined a running cluster" if args.warm else "started for each run, in a new home each",
        "deepyard": {"median_wall_s": median(deepyard, "wall_s"), "median_to_target_s": median(deepyard, "to_target_s"),
                     "median_env_steps": median(deepyard, "env_steps"), "runs": deepyard},
        "sb3": {"median_wall_s": median(sb3, "wall_s"), "median_env_steps": median(sb3, "env_steps"), "runs": sb3},
        # wall: the whole command (Ray's start, training, the checkpoint, the registered policy and
        # its GIF); to target: start to the evaluation that reached it. SB3 saves nothing.
        "wall_ratio_deepyard_vs_sb3": median(deepyard, "wall_s") / median(sb3, "wall_s"),
        "wall_ratio_median_of_seeds": statistics.median(d["wall_s"] / s["wall_s"] for d, s in zip(deepyard, sb3)),
        "to_target_ratio_deepyard_vs_sb3": median(deepyard, "to_target_s") / median(sb3, "wall_s"),
        "env_steps_ratio_deepyard_vs_sb3": median(deepyard, "env_steps") / median(sb3, "env_steps"),
        # --warm: `deepyard run` itself, its driver forked by the cluster's job host
        **({"command": {"median_wall_s": median(commands, "wall_s"),
                        "median_to_target_s": median(commands, "to_target_s"),
                        "driven_from_the_job_host": hosted, "runs": commands},
            "wall_ratio_command_vs_sb3": median(commands, "wall_s") / median(sb3, "wall_s"),
            "wall_ratio_command_vs_alone": median(commands, "wall_s") / median(deepyard, "wall_s")}
           if args.warm else {}),
        **({"before": {"src": args.before, "median_wall_s": median(before, "wall_s"),
                       "median_to_target_s": median(before, "to_target_s"), "runs": before},
            "wall_ratio_vs_before": median(deepyard, "wall_s") / median(before, "wall_s"),
            "wall_ratio_vs_before_median_of_seeds": statistics.median(
                now["wall_s"] / then["wall_s"] for now, then in zip(deepyard, before)),
            "wall_ratio_before_vs_sb3": median(before, "wall_s") / median(sb3, "wall_s")} if args.before else {}),
    })


if __name__ == "__main__":
    main()
