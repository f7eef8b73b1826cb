"""Fault injections on a small train job and what became of it, each in a fresh DEEPYARD_HOME.

    .venv/bin/python bench/faults.py [--repeats 3] [--epochs 30]

- driver_SIGINT / driver_SIGTERM / driver_SIGKILL: the `deepyard run` process gets the signal at a
  random epoch (2-5), then `deepyard run --resume` continues it;
- worker_SIGKILL: the training process (the Tune trial of a one-worker job) is killed
  (failure.max_failures: 1), the job goes on;
- worker_node_SIGKILL: the worker node it trains on is lost (a local cluster of two one-CPU nodes);
- four_jobs_fresh_home: four `deepyard run` started together on a new home.
Per try: the exit codes, the run's final state, epochs redone (logged before the fault, trained
again), epochs lost (missing from the final history), and seconds to training again: from the
fault (a worker, a node), or from the start of `--resume` (a driver: the time before it is the
user's), to the loop starting again from the checkpoint (`resumed_from_epoch` logged). Goal (the
staying-power issue): every job finishes, 0 epochs lost, at most the epochs since the newest
checkpoint redone.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

CLI = [sys.executable, "-m", "deepyard.cli", "run"]
SPEC = """kind: train
name: {name}
data: {{name: digits}}
model: {{name: mlp, params: {{hidden_sizes: [128, 128]}}}}
optim: {{name: adam, lr: 0.003}}
train: {{epochs: {epochs}, batch_size: 8}}
checkpoint: {{every_n_epochs: 1, keep: 2}}
failure: {{max_failures: 1}}
"""


def _home() -> dict[str, str]:
    env = {**os.environ, "DEEPYARD_HOME": tempfile.mkdtemp(prefix="deepyard-faults-")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _client(env):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{env['DEEPYARD_HOME']}/mlflow.db")


def _epochs(client, run_id: str) -> list[tuple[int, int]]:
    return [(m.step, m.timestamp) for m in client.get_metric_history(run_id, "train_loss")]


def _wait_for_epoch(client, name: str, epoch: int, process, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            experiment = client.get_experiment_by_name(name)
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
        except Exception:  # noqa: BLE001 - the store is still being created
            runs = []
        if runs and runs[0].data.metrics.get("epoch", 0) >= epoch:
            return runs[0]
        time.sleep(0.2)
    raise RuntimeError(f"{name} never reached epoch {epoch}: {process.poll()}")


def _outcome(client, run_id: str, epochs: int, fault_at: float, codes: list[int],
             going_on_at: float | None = None) -> dict:
    """``going_on_at``: when training was asked to go on (the --resume command); default the fault.
    Training is going again when the run logs ``resumed_from_epoch`` (the loop starts from the
    checkpoint); the epochs reached are those logged before that, also by a dying process."""
    going_on_at = going_on_at or fault_at
    run = client.get_run(run_id)
    history = _epochs(client, run_id)
    steps = [step for step, _ in history]
    resumes = [(m.value, m.timestamp) for m in client.get_metric_history(run_id, "resumed_from_epoch")
               if m.timestamp / 1000 > going_on_at]
    resumed, again = resumes[-1] if resumes else (None, None)
    reached = max((step for step, stamp in history if again is None or stamp <= again), default=0)
    return {"exit_codes": codes, "final_state": run.info.status, "epochs_reached_at_fault": reached,
            "resumed_from_epoch": int(resumed) if resumed is not None else None,
            "epochs_redone": max(0, reached - int(resumed)) if resumed is not None else reached,
            "epochs_lost": len(set(range(1, epochs + 1)) - set(steps)),
            "epochs_logged_twice": len(steps) - len(set(steps)),
            "to_training_again_s": round(again / 1000 - going_on_at, 1) if again else None}


def _started(name: str, epochs: int, env: dict[str, str] | None = None):
    """A job in a fresh home (or ``env``'s), once it reached a random epoch (2-5): (env, spec, client,
    process, run)."""
    env = env or _home()
    spec = Path(env["DEEPYARD_HOME"]) / "job.yaml"
    spec.write_text(SPEC.format(name=name, epochs=epochs))
    client = _client(env)
    process = subprocess.Popen([*CLI, str(spec)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    return env, spec, client, process, _wait_for_epoch(client, name, random.randint(2, 5), process)


def driver_fault(stop: str, epochs: int) -> dict:
    env, spec, client, process, run = _started(f"fault_{stop.lower()}", epochs)
    fault_at = time.time()
    process.send_signal(getattr(signal, stop))
    process.communicate(timeout=120)
    resume_at = time.time()
    resumed = subprocess.run([*CLI, str(spec), "--resume"], env=env, capture_output=True, text=True)
    return _outcome(client, run.info.run_id, epochs, fault_at, [process.returncode, resumed.returncode],
                    going_on_at=resume_at)


def worker_fault(epochs: int) -> dict:
    import psutil

    _, _, client, process, run = _started("fault_worker", epochs)
    # a one-worker job trains in a Tune trial's process (a function trainable), a data-parallel one in Ray Train's
    workers = [p for p in psutil.process_iter(["cmdline"])
               if any(name in " ".join(p.info["cmdline"] or []) for name in ("RayTrainWorker", "ImplicitFunc"))]
    fault_at = time.time()
    for worker in workers:
        worker.kill()
    process.communicate(timeout=600)
    return {**_outcome(client, run.info.run_id, epochs, fault_at, [process.returncode]),
            "workers_killed": len(workers)}


def _training_node(state: dict) -> str | None:
    """The local cluster's node that the job's training process lives on (a Tune trial or a Train worker)."""
    from ray.util.state import list_actors

    from deepyard import local_cluster

    actors = [actor for actor in list_actors(address=state["address"], filters=[("state", "=", "ALIVE")],
                                             raise_on_missing_output=False)
              if actor.class_name in ("ImplicitFunc", "RayTrainWorker")]
    names = {node["node_id"]: node["name"] for node in local_cluster.nodes(state)}
    return names.get(actors[0].node_id) if actors else None


def node_fault(epochs: int) -> dict:
    """SIGKILL of the worker node the training runs on (its raylet and workers: a machine that went
    down). A local cluster of a head with no CPUs and two one-CPU worker nodes; the job's driver joins it
    and its training goes on on the node that is left, from the newest checkpoint."""
    from deepyard import local_cluster

    env = _home()
    os.environ["DEEPYARD_HOME"] = env["DEEPYARD_HOME"]  # where local_cluster keeps the cluster's state
    state = local_cluster.up(workers=2, cpus_per_node=1, head_cpus=0)
    try:
        env["RAY_ADDRESS"] = state["gcs_address"]
        _, _, client, process, run = _started("fault_node", epochs, env)
        node = None
        while node is None and process.poll() is None:
            node = _training_node(state)
            time.sleep(0.2)
        if node is None:
            raise RuntimeError(f"the job ended ({process.poll()}) before its training node was found: "
                               f"{process.communicate()[1][-2000:]}")
        fault_at = time.time()
        local_cluster.kill_node(node)
        process.communicate(timeout=600)
        return {**_outcome(client, run.info.run_id, epochs, fault_at, [process.returncode]),
                "node_killed": node}
    finally:
        local_cluster.down()


def jobs_together(count: int = 4) -> dict:
    env = _home()
    processes = []
    for index in range(count):
        spec = Path(env["DEEPYARD_HOME"]) / f"job{index}.yaml"
        spec.write_text(SPEC.format(name=f"together_{index}", epochs=3))
        processes.append(subprocess.Popen([*CLI, str(spec)], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
    codes = [process.wait(timeout=900) for process in processes]
    client = _client(env)
    states = [client.search_runs([client.get_experiment_by_name(f"together_{i}").experiment_id])[0].info.status
              for i in range(count)]
    return {"exit_codes": codes, "final_states": states}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    random.seed(0)
    tries: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for stop in ("SIGINT", "SIGTERM", "SIGKILL"):
            tries.setdefault(f"driver_{stop}", []).append(driver_fault(stop, args.epochs))
            print(stop, tries[f"driver_{stop}"][-1], file=sys.stderr)
        tries.setdefault("worker_SIGKILL", []).append(worker_fault(args.epochs))
        tries.setdefault("worker_node_SIGKILL", []).append(node_fault(args.epochs))
        print("node", tries["worker_node_SIGKILL"][-1], file=sys.stderr)
        tries.setdefault("four_jobs_fresh_home", []).append(jobs_together())
    states = [state for runs in tries.values() for t in runs for state in t.get("final_states", [t.get("final_state")])]
    finished = all(state == "FINISHED" for state in states)
    lost = sum(t.get("epochs_lost", 0) for runs in tries.values() for t in runs)
    record.save("faults", {"bench": "faults", "goal": "every job finishes, 0 epochs lost, redone <= epochs since the "
                                                      "newest checkpoint", "repeats": args.repeats,
                           "every_job_finished": finished, "epochs_lost_total": lost, "tries": tries})


if __name__ == "__main__":
    main()
