"""`deepyard cluster up --idle-stop`: a real one-node cluster that stays up while a driver uses it and
goes down by itself once idle (its watcher process, cluster_watch.py); `deepyard run --keep-cluster`
starts one for the next jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepyard import local_cluster

pytestmark = [pytest.mark.slow, pytest.mark.long]  # (~1.5 min: clusters of their own, drivers, the idle wait)


def test_an_idle_cluster_goes_down_by_itself_and_a_busy_one_stays(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path))  # a cluster, and a state file, of this test's own
    state = local_cluster.up(workers=0, cpus_per_node=1, idle_stop_s=10)
    head, watcher = state["nodes"][0], state["watcher"]
    try:
        assert local_cluster.alive(watcher) and local_cluster.status()["idle_stop_s"] == 10
        # A driver connected for longer than the idle time keeps it up (it records its join first, as
        # `deepyard run` does: its connection may take seconds on a loaded machine)
        script = ("import ray, time; from deepyard import local_cluster; local_cluster.record_join(); "
                  f"ray.init(address={state['gcs_address']!r}); time.sleep(25)")
        driver = subprocess.Popen([sys.executable, "-c", script],
                                  env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""})
        time.sleep(20)
        assert driver.poll() is None, "the driver could not join"
        assert local_cluster.alive(head) and local_cluster.read_state() is not None
        assert driver.wait(timeout=60) == 0
        # ...and once it has gone, the cluster goes after the idle time
        deadline = time.monotonic() + 60
        while local_cluster.read_state() is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert local_cluster.read_state() is None, "still up a minute after its driver left"
        assert not local_cluster.alive(head)
        deadline = time.monotonic() + 10
        while local_cluster.alive(watcher) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not local_cluster.alive(watcher)
        assert "idle for 10 s: 1 node(s) stopped" in (tmp_path / "cluster" / "watcher.log").read_text()
    finally:
        local_cluster.down()


def test_keep_cluster_starts_one_that_the_next_job_joins(tmp_path, monkeypatch):
    import json

    from test_train_job import TINY_MLP

    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path))
    spec = tmp_path / "kept.yaml"
    spec.write_text(TINY_MLP.format(name="kept", epochs=1) + "register: {enabled: false}\n")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "DEEPYARD_KEEP_CLUSTER": "120"}

    def run() -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "deepyard", "run", str(spec), "--json"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["metrics"]["test_accuracy"] > 0.3
        return done

    try:
        first = run()
        state = local_cluster.read_state()
        assert state is not None and f"started the local cluster at {state['gcs_address']}" in first.stderr
        assert local_cluster.alive(state["nodes"][0]) and state["idle_stop_s"] == 120  # (after the job's exit)
        deadline = time.monotonic() + 60
        while not Path(state["host"]["socket"]).exists():
            assert time.monotonic() < deadline, "the job host did not listen"
            time.sleep(0.2)
        second = run()
        assert f"on the local cluster at {state['gcs_address']}" in second.stderr
        # driven from the host that the first job started, with the shell's environment, not the job's own
        assert "note:" not in second.stderr, second.stderr
        assert " runs run " in Path(state["host"]["log"]).read_text()
    finally:
        local_cluster.down()
