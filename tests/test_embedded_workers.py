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
from test_job_host import DEEPYARD, gone, run_status, trained
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


def test_an_embedded_jobs_trial_is_forked_by_its_worker_host_which_ends_with_the_driver(tmp_path):
    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "DEEPYARD_HOME": str(home)}
    job = "register: {enabled: false}\n"
    (tmp_path / "long.yaml").write_text(TINY_MLP.format(name="embedded_long", epochs=400) + job)
    command = subprocess.Popen([*DEEPYARD, "run", "long.yaml"], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    try:
        folder = home / "cluster" / "embedded" / str(command.pid)  # (no cluster up: the command is the driver)
        trained(home, "embedded_long")
        log = (folder / "workers.log").read_text()
        host = int(re.search(r"job host (\d+): serving", log).group(1))
        trial = wait_for(lambda: forked_busy(host), 30, f"the trial's worker was not forked by the host: {log}")
        command.send_signal(signal.SIGKILL)  # the driver, killed outright: no exit handler runs
        command.wait(timeout=30)
        wait_for(lambda: gone(host), 60, "the worker host outlived its driver")
        wait_for(lambda: all(gone(worker.pid) for worker in trial), 60, "the forked trial outlived its driver")
        assert not (folder / "workers.sock").exists()
    finally:
        if command.poll() is None:
            command.kill()
    # the next job in this home: its own host, the killed driver's folder cleared, nothing left after it
    (tmp_path / "short.yaml").write_text(TINY_MLP.format(name="embedded_short", epochs=2) + job)
    done = subprocess.run([*DEEPYARD, "run", "short.yaml", "--json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_status(home, json.loads(done.stdout.strip().splitlines()[-1])["run_id"]) == "FINISHED"
    assert list((home / "cluster" / "embedded").iterdir()) == []


def test_hosts_off_start_none(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path))
    monkeypatch.setenv("DEEPYARD_JOB_HOST", "0")
    assert embedded_workers.start() is None
    assert not Path(tmp_path, "cluster").exists()
