"""Which cluster `deepyard run` joins: the one `deepyard cluster up` started, only while it is up and
runs the same code (its nodes' processes, here stood in for by this test's own process)."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from deepyard import local_cluster


@pytest.fixture()
def state_here(tmp_path, monkeypatch):
    """A cluster state file whose head is this live process, in a home of the test's own."""
    monkeypatch.setenv("DEEPYARD_HOME", str(tmp_path))
    me = psutil.Process()
    state = {"address": "http://127.0.0.1:1", "gcs_address": "127.0.0.1:2", "cpus": 2.0,
             "nodes": [{"name": "head", "pid": me.pid, "started_at": me.create_time()}],
             **local_cluster.code_identity()}

    def write(**changes) -> None:
        (tmp_path / "cluster").mkdir(exist_ok=True)
        (tmp_path / "cluster" / "state.json").write_text(json.dumps({**state, **changes}))

    return write


def test_a_cluster_that_is_up_with_this_code_is_joined(state_here):
    state_here()
    assert local_cluster.joinable({"CPU": 2.0}) == ("127.0.0.1:2", None)


def test_no_cluster_or_a_gone_one_is_not_joined_and_says_nothing(state_here, tmp_path):
    assert local_cluster.joinable({"CPU": 1.0}) == (None, None)
    state_here(nodes=[{"name": "head", "pid": os.getpid(), "started_at": 1.0}])  # (a pid used again)
    assert local_cluster.joinable({"CPU": 1.0}) == (None, None)


@pytest.mark.parametrize("changes, says", [
    ({"ray_version": "2.0.0"}, "runs Ray 2.0.0, this command"),
    ({"deepyard_path": "/elsewhere/deepyard"}, "runs deepyard /elsewhere/deepyard"),
    ({"python": None}, "was started by an older deepyard"),
])
def test_a_cluster_running_other_code_is_not_joined(state_here, changes, says):
    state_here(**changes)
    address, why_not = local_cluster.joinable({"CPU": 1.0})
    assert address is None and says in why_not and "`deepyard cluster down` and up again" in why_not


def test_a_job_larger_than_the_cluster_starts_its_own(state_here):
    state_here()
    assert local_cluster.joinable({"CPU": 3.0}) == (
        None, "the job asks for 3 CPU; the local cluster at 127.0.0.1:2 has 2 CPUs")
    assert local_cluster.joinable({"CPU": 1.0, "GPU": 1.0})[0] is None
    state_here(largest_node_cpus=1.0)  # (two nodes of one CPU: a 2-CPU worker fits on neither)
    assert local_cluster.joinable({"CPU": 2.0}, worker_cpus=2.0) == (
        None, "each of the job's workers asks for 2 CPUs; the local cluster's largest node has 1")


def test_the_workers_on_this_machines_cluster_see_the_drivers_environment(state_here, monkeypatch):
    from deepyard import cluster
    from deepyard.settings import TRAIN_ENV

    state_here()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")  # (a streamed s3:// source's, say)
    monkeypatch.setenv("RAY_SOMETHING", "1")
    here = cluster._job_env("127.0.0.1:2")
    assert here["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and "RAY_SOMETHING" not in here
    assert all(here[key] == value for key, value in TRAIN_ENV.items())
    assert cluster._job_env("10.0.0.9:6379") == dict(TRAIN_ENV)  # (a remote cluster keeps its own)


def test_cluster_down_stops_the_idle_watcher_too(state_here):
    import subprocess
    import sys

    watcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    state_here(nodes=[], watcher={"name": "watcher", "pid": watcher.pid,
                                  "started_at": psutil.Process(watcher.pid).create_time()})
    assert local_cluster.down() == {"stopped_nodes": 0}
    assert watcher.wait(timeout=10) == -15 and local_cluster.read_state() is None


def test_a_command_that_joins_counts_as_use_while_it_runs(state_here, tmp_path):
    import subprocess
    import sys

    state_here()
    assert local_cluster.joining() == []
    local_cluster.joinable({"CPU": 1.0})  # (its driver connects later, after the job's data check)
    assert local_cluster.joining() == [os.getpid()]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "cluster" / "joining" / str(gone.pid)).write_text(f'{{"pid": {gone.pid}, "started_at": 1.0}}')
    assert local_cluster.joining() == [os.getpid()]  # (an ended command's record is dropped)
    assert sorted(path.name for path in (tmp_path / "cluster" / "joining").iterdir()) == [str(os.getpid())]


def test_two_commands_starting_the_cluster_start_it_one_after_the_other(state_here, monkeypatch):
    import threading
    import time

    inside, overlapped = [], []

    def fake_up(*args):
        overlapped.append(bool(inside))
        inside.append(1)
        time.sleep(0.3)
        inside.pop()
        return {}

    monkeypatch.setattr(local_cluster, "_up", fake_up)
    starts = [threading.Thread(target=local_cluster.up, kwargs={"workers": 0}) for _ in range(2)]
    for start in starts:
        start.start()
    for start in starts:
        start.join()
    assert overlapped == [False, False]
