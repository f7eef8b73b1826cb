"""`kind: rl`: an RLlib agent on a gymnasium environment. Run one with `deepyard run jobs/cartpole_ppo.yaml`.

Driver: check the spec (before Ray starts) -> open the MLflow run -> build the algorithm -> train
iterations until a stop condition, logging each -> save the checkpoint, register the greedy
policy (observations -> actions) and log a GIF of it playing one episode.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from deepyard import settings, stops, tracking
from deepyard.errors import BadInput
from deepyard.rl import algorithms
from deepyard.runners.summary import RunOptions, RunSummary
from deepyard.spec import RLJob
from deepyard.tasks.rl_policy import RLPolicy

# Result keys -> metric names: what a user reads per iteration.
RESULT_METRICS = {
    ("env_runners", "episode_return_mean"): "return_mean",
    ("env_runners", "episode_return_min"): "return_min",
    ("env_runners", "episode_return_max"): "return_max",
    ("env_runners", "episode_len_mean"): "episode_len_mean",
    ("num_env_steps_sampled_lifetime",): "timesteps",
    ("env_runners", "num_env_steps_sampled"): "env_steps",
    ("time_this_iter_s",): "iteration_s",
    ("evaluation", "env_runners", "episode_return_mean"): "eval_return_mean",
    ("evaluation", "env_runners", "episode_len_mean"): "eval_episode_len_mean",
}


def _get(result: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def evaluated(spec: RLJob, iteration: int) -> bool:
    """Did RLlib evaluate in this (1-based) iteration? Its results repeat the last evaluation's
    numbers in the iterations after it, which must not be read as fresh ones."""
    return bool(spec.evaluation.interval) and iteration % spec.evaluation.interval == 0


def iteration_metrics(result: dict, evaluated: bool = True,
                      previous_timesteps: float | None = None) -> dict[str, float]:
    """The numbers worth a chart from one ``Algorithm.train()`` result: returns, lengths, steps,
    throughput, and every learner loss (the evaluation's only when it ran this iteration)."""
    metrics = {name: float(value) for path, name in RESULT_METRICS.items()  # (NaN: not measured this time)
               if isinstance(value := _get(result, path), (int, float)) and not math.isnan(value)
               and (evaluated or path[0] != "evaluation")}
    if "env_steps" not in metrics and previous_timesteps is not None and "timesteps" in metrics:
        metrics["env_steps"] = metrics["timesteps"] - previous_timesteps  # (not every algorithm reports it)
    if metrics.get("iteration_s") and "env_steps" in metrics:
        metrics["env_steps_per_s"] = metrics["env_steps"] / metrics["iteration_s"]
    for module, values in (result.get("learners") or {}).items():
        if module.startswith("__"):
            continue
        for key, value in values.items():
            if isinstance(value, (int, float)) and ("loss" in key or key in ("entropy", "mean_kl_loss")):
                metrics[f"learner/{key}"] = float(value)
    return metrics


def stop_reason(spec: RLJob, metrics: dict[str, float], iteration: int, elapsed: float) -> str | None:
    # with evaluation on, only a fresh greedy evaluation counts (the exploring return is noisier)
    target = metrics.get("eval_return_mean") if spec.evaluation.interval else metrics.get("return_mean")
    if spec.stop.mean_return is not None and target is not None and target >= spec.stop.mean_return:
        return f"mean return {target:.1f} >= {spec.stop.mean_return}"
    if spec.stop.timesteps and metrics.get("timesteps", 0) >= spec.stop.timesteps:
        return f"{metrics['timesteps']:.0f} timesteps"
    if spec.stop.time_s and elapsed >= spec.stop.time_s:
        return f"{elapsed:.0f} s"
    if spec.stop.iterations and iteration >= spec.stop.iterations:
        return f"{iteration} iterations"
    return None


def train_iterations(spec: RLJob, algo, run_id: str,
                     logged_up_to: int = 0) -> Iterator[tuple[int, dict[str, float], float, str | None]]:
    """Train and log one iteration at a time until a stop condition: (iteration, metrics, seconds
    so far, stop reason or None). Iterations count as RLlib's do: a restored algorithm goes on.
    Iterations up to ``logged_up_to`` (logged before a crash, after the checkpoint it resumed
    from) are trained again but logged once: their first values stand."""
    started, metrics, reason = time.perf_counter(), {}, None
    while reason is None:
        stops.safe_point()  # (a stop during an iteration: here, with the algorithm whole, to be saved)
        result = algo.train()
        iteration = algo.iteration
        metrics = iteration_metrics(result, evaluated(spec, iteration), metrics.get("timesteps"))
        metrics["iteration"] = iteration
        if iteration > logged_up_to:
            tracking.log_metrics(run_id, metrics, iteration)
        elapsed = time.perf_counter() - started
        reason = stop_reason(spec, metrics, iteration, elapsed)
        yield iteration, metrics, elapsed, reason


def iteration_line(iteration: int, metrics: dict[str, float], elapsed: float) -> str:
    nan = float("nan")
    # (an iteration in which no episode ended, e.g. a pole balanced all along, has no return to show)
    returns = (f"return {metrics['return_mean']:.1f} [{metrics.get('return_min', nan):.0f}, "
               f"{metrics.get('return_max', nan):.0f}]" if "return_mean" in metrics else "no episode ended")
    evaluation = f" eval {metrics['eval_return_mean']:.1f}" if "eval_return_mean" in metrics else ""
    return (f"iter {iteration} steps {metrics.get('timesteps', 0):.0f} {returns}{evaluation} "
            f"{metrics.get('env_steps_per_s', 0):.0f} steps/s {elapsed:.0f}s")


def _print_iteration(console, iteration: int, metrics: dict[str, float], elapsed: float) -> None:
    console.print(iteration_line(iteration, metrics, elapsed), highlight=False, soft_wrap=True)


TEST_SEED = 10_000  # the registered policy's test episodes start here: seeds no evaluation used


def log_policy(spec: RLJob, policy, run_id: str, spaces, registered_name: str | None) -> dict[str, Any]:
    """Log (and register) the greedy policy with a GIF of one episode, and test it on fresh
    episodes: ``test_return_mean``, the number a sweep's promotion compares."""
    import numpy as np

    from deepyard.rl.policy import GIF_EVERY, play, save_gif

    frames: list = []  # the GIF's episode, played beside the test episodes
    gif_return, *returns = play(policy, algorithms.env_maker(spec.env.id, spec.env.kwargs),
                                [spec.seed, *range(TEST_SEED, TEST_SEED + spec.evaluation.episodes)],
                                frames=frames, frame_every=GIF_EVERY)
    test = {"test_return_mean": float(np.mean(returns)), "test_return_std": float(np.std(returns))}
    tracking.log_metrics(run_id, test, 0)
    with tempfile.TemporaryDirectory() as folder:
        gif = Path(folder) / "policy.gif"
        save_gif(frames, str(gif))
        tracking.log_artifact(run_id, str(gif))
    example = np.stack([spaces[0].sample() for _ in range(5)]).astype(np.float32)
    metadata = {"task": RLPolicy.name, "env_id": spec.env.id, "env_kwargs": dict(spec.env.kwargs),
                "algorithm": spec.algorithm, "input_shape": list(spaces[0].shape),
                "action_space": str(spaces[1]), "job": spec.name}
    outcome = tracking.log_model(run_id, policy, example, registered_name=registered_name, metadata=metadata,
                                 version_tags={**{f"metric.{k}": f"{v:.6g}" for k, v in test.items()},
                                               "run_id": run_id})
    return {**outcome, "gif_return": gif_return, "test_metrics": test}


def checkpoint_root(spec: RLJob) -> Path:
    """Where rl jobs save the algorithm's state: a local or mounted path. An rl job does not write to
    URIs yet: a cluster's s3://... default (DEEPYARD_STORAGE) falls back to $DEEPYARD_HOME, and the
    final checkpoint reaches MLflow's artifact store anyway."""
    storage = settings.storage_path(spec.storage_path)
    if "://" in storage:
        if spec.storage_path:
            raise BadInput(f"storage_path: an rl job checkpoints to a local or mounted path, not {storage!r}; "
                           "leave it out (the final checkpoint is logged to MLflow) or give a path")
        storage = str(settings.home() / "ray_results")
    return Path(storage)


def checkpoint_dir(spec: RLJob, run_id: str) -> Path:
    return checkpoint_root(spec) / f"{spec.name}-{run_id[:8]}"


def save(algo, folder: Path) -> None:
    """Replace the checkpoint in ``folder`` all at once: a kill mid-save leaves the previous one."""
    import shutil

    partial, previous = folder.with_name(folder.name + ".saving"), folder.with_name(folder.name + ".previous")
    shutil.rmtree(partial, ignore_errors=True)
    algo.save_to_path(str(partial))
    if folder.exists():
        folder.rename(previous)
    partial.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def interrupted_run(spec: RLJob) -> str:
    """The newest run of this job, if it was stopped or failed and left a checkpoint; else BadInput."""
    tracking.close_orphans(spec.experiment)  # a driver killed outright left its run RUNNING
    last = (tracking.latest_run(spec.experiment, spec.name, {"deepyard.task": RLPolicy.name})
            or tracking.latest_run(spec.experiment, spec.name, {"deepyard.task": "rl"}))  # (older runs' tag)
    if last is None:
        raise BadInput(f"--resume: no earlier run of {spec.name!r} in experiment {spec.experiment!r}; "
                       "run it without --resume")
    run_id, status = last.info.run_id, last.info.status
    if status in ("FINISHED", "RUNNING"):
        raise BadInput(f"--resume: the last run of {spec.name!r} ({run_id}) is {status}, not interrupted; "
                       "run it without --resume to train anew")
    if not ((folder := checkpoint_dir(spec, run_id)) / "algorithm_state.pkl").is_file():
        raise BadInput(f"--resume: the {status} run {run_id} saved no checkpoint in {folder} "
                       "(one is saved every checkpoint.every_n_iterations and on Ctrl-C); run it without --resume")
    return run_id


def describe(spec: RLJob, spaces) -> str:
    observations, actions = spaces
    return f"algorithm={spec.algorithm} env={spec.env.id} (observations {observations.shape}, actions {actions})"


def check(spec: RLJob) -> str:
    """What `deepyard validate` prints: the algorithm and the environment's spaces, once checked."""
    spaces = algorithms.check(spec)
    checkpoint_root(spec)
    return describe(spec, spaces)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads, for the block: the process's own count after it (tests run many jobs in one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(spec: RLJob, options: RunOptions) -> RunSummary:
    """Train to a stop condition; returns the ids, the final metrics and the model URIs. With
    ``resume``, the last interrupted run goes on from its checkpoint (``stop.time_s`` counts anew)."""
    from rich.console import Console

    from deepyard import cluster
    from deepyard.rl.policy import from_algorithm

    spaces = algorithms.check(spec)
    checkpoint_root(spec)  # a URI storage_path is refused before anything starts
    resumed = interrupted_run(spec) if options.resume else None
    imports = algorithms.import_in_background(spec.algorithm)
    console = options.console or Console(stderr=True, quiet=True)
    with tracking.job_run(spec, tags={"deepyard.task": RLPolicy.name}, reopen=resumed, failure="rl training failed",
                          killed_note="interrupted; continue with `deepyard run SPEC --resume`") as run:
        # The cluster stops behind the driver while it tests, logs and registers the policy.
        # The learner runs here, in the driver: an MLP policy's ops are too short to split across
        # threads (CartPole's PPO: 16% faster on one than on two), and a sweep's trials get one too.
        # (RLlib's algorithm runs here, not in Ray Train: a local cluster needs no dashboard)
        with cluster.connected(options.address, options.ray_logs, stop_behind=True, dashboard=False), \
                torch_threads(1):
            # (MLflow opens the run while Ray starts: waiting for it first cost 1-5 s, a new store most)
            run_id = run.id
            folder = checkpoint_dir(spec, run_id)
            imports.join()
            algo = algorithms.build_config(spec).build_algo()
            try:
                if resumed:  # (an interrupt here must not save a half-restored state over the checkpoint)
                    algo.restore_from_path(str(folder))
                    console.print(f"resuming run {run_id} after iteration {algo.iteration}", highlight=False)
            except BaseException:
                algo.stop()
                raise
            try:
                run.lap("startup")
                iteration, metrics, reason = algo.iteration, {}, None
                logged_up_to = tracking.last_step(run_id, "iteration") if resumed else 0
                with stops.safe_points():
                    for iteration, metrics, elapsed, reason in train_iterations(spec, algo, run_id, logged_up_to):
                        _print_iteration(console, iteration, metrics, elapsed)
                        if iteration % spec.checkpoint.every_n_iterations == 0:
                            save(algo, folder)
                console.print(f"[green]stopping[/]: {reason}")
                run.lap("train")
                save(algo, folder)
                policy = from_algorithm(algo, spaces[1], spec.algorithm)  # a torch module: needs no Ray
            except stops.StoppedSafely:  # (a stop that came through mid-iteration: the last checkpoint stands)
                save(algo, folder)  # what --resume goes on from
                raise
            finally:
                algo.stop()
        tracking.log_artifacts(run_id, str(folder), "checkpoint")
        outcome = log_policy(spec, policy, run_id, spaces, spec.model_name if spec.register.enabled else None)
        run.lap("finish")  # the checkpoint, the registered policy and its GIF
        run.timings["total_s"] = run.elapsed()
        tracking.set_tags(run_id, {"deepyard.stop_reason": reason})
    final = {k: v for k, v in metrics.items() if not k.startswith("learner/")} | outcome.pop("test_metrics")
    return RunSummary(run_id=run_id, experiment=spec.experiment, metrics=final, timings=run.timings,
                      notes=[f"stopped after {iteration} iterations: {reason}"],
                      details={"iterations": iteration, "stop_reason": reason, "checkpoint": str(folder), **outcome})
