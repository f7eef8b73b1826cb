"""The worker host of a driver's own cluster (`embedded_workers.py`): a `deepyard run` with no cluster
up forks its Ray workers from it, and it ends with the driver, even one killed outright."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import ended
from test_job_host import DEEPYARD, gone, run_status, store, trained
from test_train_job import TINY_MLP

from deepyard import embedded_workers

pytestmark = pytest.mark.slow


def forked_busy(host_pid: int) -> list[psutil.Process]:
    """The host's forked Ray workers that run a task or actor (Ray titles them `ray::NAME`)."""
    return [child for child in psutil.Process(host_pid).children()
            if (title := " ".join(child.cmdline())).startswith("ray::") and "IDLE" not in title]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return found


def start_embedded_job(tmp_path: Path) -> tuple[subprocess.Popen, Path, int, list[psutil.Process], str]:
    """A 400-epoch job with no cluster up, once it trains: its command (the driver itself), its host's
    folder and pid, the host's forked workers that run its trial, and its run's id."""
    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "DEEPYARD_HOME": str(home)}
    (tmp_path / "long.yaml").write_text(TINY_MLP.format(name="embedded_long", epochs=400) +
                                        "register: {enabled: false}\n")
    command = subprocess.Popen([*DEEPYARD, "run", "long.yaml"], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                               text=True)
    folder = home / "cluster" / "embedded" / str(command.pid)
    run = trained(home, "embedded_long")
    log = (folder / "workers.log").read_text()
    host = int(re.search(r"job host (\d+): serving", log).group(1))
    trial = wait_for(lambda: forked_busy(host), 30, f"the trial's worker was not forked by the host: {log}")
    return command, folder, host, trial, run.info.run_id


@pytest.mark.long  # ~25 s: a process with a cluster of its own (make test's own cluster forks its workers alike)
def test_an_embedded_jobs_trial_is_forked_by_its_worker_host_which_stops_with_the_job(tmp_path):
    command, folder, host, trial, run_id = start_embedded_job(tmp_path)
    try:
        command.send_signal(signal.SIGINT)
        stderr = ended(command, 90)
        assert command.returncode == 130, stderr[-3000:]
    finally:
        if command.poll() is None:
            command.kill()
    assert run_status(tmp_path / "home", run_id) == "KILLED"
    assert gone(host) and all(gone(worker.pid) for worker in trial)  # (stopped before the command exits)
    assert not folder.exists()


@pytest.mark.long
def test_the_worker_host_of_a_driver_killed_outright_ends_and_the_next_clears_its_folder(tmp_path):
    command, folder, host, trial, _ = start_embedded_job(tmp_path)
    try:
        command.send_signal(signal.SIGKILL)  # no exit handler runs: the host sees its driver go
        command.wait(timeout=30)
        wait_for(lambda: gone(host), 60, "the worker host outlived its driver")
        wait_for(lambda: all(gone(worker.pid) for worker in trial), 60, "the forked trial outlived its driver")
    finally:
        if command.poll() is None:
            command.kill()
    assert not (folder / "workers.sock").exists() and (folder / "workers.log").exists()
    embedded_workers.remove_stale(folder.parent)  # (as the next job's start does)
    assert not folder.exists()


@pytest.mark.long
def test_a_worker_host_killed_mid_job_costs_its_trial_a_restart_from_a_checkpoint_not_the_job(tmp_path):
    """Its forked workers end with it (their stand-ins stop them); the trial's retry starts its worker
    as Ray starts them, and goes on from the newest checkpoint."""
    import json

    epochs, home = 150, tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "DEEPYARD_HOME": str(home)}
    (tmp_path / "job.yaml").write_text(TINY_MLP.format(name="host_killed", epochs=epochs) +
                                       "failure: {max_failures: 1}\nregister: {enabled: false}\n")
    command = subprocess.Popen([*DEEPYARD, "run", "job.yaml", "--json"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        folder = home / "cluster" / "embedded" / str(command.pid)
        trained(home, "host_killed")
        host = int(re.search(r"job host (\d+): serving", (folder / "workers.log").read_text()).group(1))
        trial = wait_for(lambda: forked_busy(host), 30, "the trial's worker was not forked by the host")
        os.kill(host, signal.SIGKILL)
        wait_for(lambda: all(gone(worker.pid) for worker in trial), 30, "a forked worker outlived its host")
        stdout, stderr = command.communicate(timeout=240)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 0, stderr[-3000:]
    run_id = json.loads(stdout.strip().splitlines()[-1])["run_id"]
    client = store(home)
    (resumed,) = [m.value for m in client.get_metric_history(run_id, "resumed_from_epoch")]
    logged = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert resumed >= 1 and set(logged) == set(range(1, epochs + 1))
    assert len(logged) <= epochs + 1  # (at most the epoch it was in, trained again after its last checkpoint)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not folder.exists()


def test_hosts_off_start_none(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path))
    monkeypatch.setenv("DEEPYARD_JOB_HOST", "0")
    assert embedded_workers.start() is None
    assert not Path(tmp_path, "cluster").exists()


def test_a_job_refused_before_ray_starts_leaves_no_worker_host(tmp_path):
    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "DEEPYARD_HOME": str(home)}
    (tmp_path / "tiny.yaml").write_text(TINY_MLP.format(name="never_ran", epochs=2))
    done = subprocess.run([*DEEPYARD, "run", "tiny.yaml", "--resume"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "no earlier run" in done.stderr, done.stderr[-2000:]
    assert list((home / "cluster" / "embedded").iterdir()) == []  # (its host was started, and stopped)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(home) in " ".join(p.info["cmdline"] or [])]


def test_a_job_that_asks_ray_for_no_cpus_gets_no_worker_host(tmp_path, monkeypatch):
    """An RL job that samples in its driver starts no Ray workers: a host would only take CPU from it."""
    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path))
    with embedded_workers.ahead(False):
        assert embedded_workers.take() is None
    assert not (tmp_path / "cluster").exists()


# The head's Python processes that a job with no dashboard and no streamed logs never asks anything of
IDLE_HEAD = ("dashboard/dashboard.py", "autoscaler/_private/monitor.py", "_private/log_monitor.py")


@pytest.mark.parametrize("ray_logs", [False, True])
def test_a_cluster_of_a_jobs_own_without_the_dashboard_starts_none_of_the_heads_idle_processes(tmp_path, ray_logs):
    """Ray starts a dashboard process even with include_dashboard=False (usage stats only) and waits
    for it before it starts the raylet, and an autoscaler's monitor and a log monitor beside it; a
    job's own cluster that wants no dashboard starts none of them, but the log monitor where the
    job shows its workers' output (``--ray-logs``), and its tasks and worker host work as ever."""
    script = f"""
import json, time, psutil, ray
from deepyard import cluster
IDLE_HEAD = {IDLE_HEAD!r}
with cluster.connected(None, ray_logs={ray_logs!r}, dashboard=False):
    titles = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
    answer = ray.get(ray.remote(num_cpus=1)(lambda: print("a worker's line") or 6 * 7).remote())
    time.sleep(1.5)  # (the log monitor's pace)
    print(json.dumps({{"idle": [name for name in IDLE_HEAD if any(name in t for t in titles)],
                      "agent": any("DashboardAgent" in t for t in titles), "answer": answer}}))
"""
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}, "DEEPYARD_HOME": str(tmp_path)}
    done = subprocess.run([DEEPYARD[0], "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"idle": [IDLE_HEAD[-1]] if ray_logs else [], "agent": True, "answer": 42}
    assert ("a worker's line" in done.stdout + done.stderr) == ray_logs
    assert not (tmp_path / "cluster" / "embedded").exists() or not any((tmp_path / "cluster" / "embedded").iterdir())
