"""A real multi-node Ray cluster on loopback (a head and two worker raylets, `deepyard cluster up`),
jobs submitted to it through Ray's job API (`deepyard submit`), tracked in the session's MLflow."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

import faults
from conftest import ROOT, last_json
from test_train_job import TINY_MLP
from deepyard import local_cluster, tracking
from deepyard import submit as submitting

# A cluster of three nodes, started once for these tests (~3 minutes in all): CI runs them (make test-long).
pytestmark = [pytest.mark.slow, pytest.mark.long]

# test_train_job's tiny MLP, on as many workers as asked, surviving failures, registering nothing
SPEC = TINY_MLP + """scaling: {{num_workers: {workers}}}
failure: {{max_failures: 2}}
register: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def cluster(deepyard_home):
    # The head trains nothing: each of the two worker nodes has one CPU, so a two-worker job must
    # span both, and a one-worker job lives on exactly one worker node.
    state = local_cluster.up(workers=2, cpus_per_node=1, head_cpus=0)
    yield state
    local_cluster.down()


def spec(write_spec, name: str, epochs: int = 2, workers: int = 1) -> str:
    return write_spec(SPEC.format(name=name, epochs=epochs, workers=workers), f"{name}.yaml")


def wait_for(predicate, timeout_s: float = 120.0, what: str = "condition", job: str | None = None):
    """``job``: its driver's last words go into the failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.5)
    said = (f"; job {job} is {submitting.client(None).get_job_status(job)}, its driver said:\n"
            f"{submitting.client(None).get_job_logs(job)[-4000:]}") if job else ""
    raise AssertionError(f"timed out waiting for {what}{said}")


def job_count(cli) -> int:
    return len(json.loads(cli("jobs", "list", "--json").stdout.strip().splitlines()[-1]))


def test_cluster_up_starts_a_head_and_two_worker_nodes(cluster, cli):
    status = last_json(cli("cluster", "status", "--json"))
    assert status["alive_nodes"] == 3 and status["cpus"] == 2
    assert sorted(node["name"] for node in status["nodes"]) == ["head", "worker_0", "worker_1"]
    assert "already up" in cli("cluster", "up", expect=2).stderr


def test_submitted_jobs_queue_for_the_cluster_span_two_nodes_and_land_in_mlflow(cluster, cli, write_spec):
    """Two jobs that each need both worker CPUs: the second waits PENDING in the cluster's queue until
    the first is done (it used to start at once and starve both)."""
    path = spec(write_spec, "submitted_ddp", epochs=12, workers=2)  # two 1-CPU workers: one on each worker node
    first = last_json(cli("submit", path, "--json", "--id", "deepyard-test-ddp"))
    assert first["queue"] and first["waits_for"] == {"deepyard_queue_cpu": 2.0}
    jobs = submitting.client(None)
    training = wait_for(lambda: _running_run("submitted_ddp"), what="the first job's first epoch")
    second = last_json(cli("submit", spec(write_spec, "queued_ddp", epochs=1, workers=2), "--json"))["submission_id"]
    # (the first was still training when the second came: without the queue they would overlap)
    assert MlflowClient().get_run(training.info.run_id).info.status == "RUNNING"
    rows = {row["submission_id"]: row for row in json.loads(cli("jobs", "list", "--json").stdout)}
    assert rows[second]["status"] == "PENDING" and rows[second]["waits_for"] == "2 CPU"

    assert "done submitted_ddp" in cli("jobs", "logs", "deepyard-test-ddp", "--follow").stdout
    summary = last_json(cli("jobs", "status", "deepyard-test-ddp", "--json"))
    assert summary["status"] == "SUCCEEDED", summary
    run = MlflowClient().get_run(summary["run"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.metrics["test_accuracy"] > 0.3
    assert submitting.wait(jobs, second, timeout_s=300) == "SUCCEEDED", jobs.get_job_logs(second)[-3000:]
    queued = MlflowClient().get_run(last_json(cli("jobs", "status", second, "--json"))["run"]["run_id"])
    assert queued.info.start_time >= run.info.end_time  # it trained only once the first was done

    again = last_json(cli("submit", path, "--json", "--id", "deepyard-test-ddp"))
    assert again["already_submitted"] and again["status"] == "SUCCEEDED"


def test_deepyard_run_joins_the_cluster_that_is_up_unless_told_local(cluster, write_spec):
    import os
    import subprocess
    import sys

    from ray.util.state import list_jobs

    path = spec(write_spec, "joins_the_cluster", epochs=1)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}

    def run(*extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "deepyard", "run", path, "--json", *extra], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    def drivers() -> list[str]:  # the jobs whose drivers this cluster has seen
        return [job.entrypoint for job in list_jobs(address=cluster["address"], raise_on_missing_output=False)
                if job.type == "DRIVER" and "joins_the_cluster" in (job.entrypoint or "")]

    joined = run()
    assert f"on the local cluster at {cluster['gcs_address']}" in joined.stderr
    assert json.loads(joined.stdout.strip().splitlines()[-1])["metrics"]["test_accuracy"] > 0.3
    assert len(drivers()) == 1
    own = run("--address", "local")
    assert "on the local cluster" not in own.stderr and len(drivers()) == 1


def test_a_bad_spec_is_refused_before_anything_is_sent(cluster, cli, write_spec):
    before = job_count(cli)
    bad = write_spec(SPEC.format(name="bad", epochs=2, workers=1).replace("adam", "adamm"), "bad.yaml")
    assert "did you mean 'adam'" in cli("submit", bad, expect=2).stderr
    too_big = spec(write_spec, "too_big", workers=3)
    assert "too_big needs 3 CPUs for its workers, and this cluster's queue has 2 in all" in cli(
        "submit", too_big, expect=2).stderr
    assert "no job 'nope'" in cli("jobs", "status", "nope", expect=2).stderr
    assert job_count(cli) == before


def _running_run(name: str):
    experiment = MlflowClient().get_experiment_by_name(name)
    if experiment is None:
        return None
    runs = MlflowClient().search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    return runs[0] if runs and runs[0].data.metrics.get("epoch", 0) >= 1 else None


def test_stopping_a_job_marks_its_run_killed_and_frees_the_cluster(cluster, cli, write_spec):
    path = spec(write_spec, "stopped_job", epochs=500)
    job = last_json(cli("submit", path, "--json"))["submission_id"]
    run = wait_for(lambda: _running_run("stopped_job"), what="the job's first epoch")
    result = cli("jobs", "stop", job)
    assert f"job {job}: STOPPED" in result.stderr
    stopped = wait_for(lambda: (r := MlflowClient().get_run(run.info.run_id)).info.status != "RUNNING" and r,
                       timeout_s=30, what="the run to be closed", job=job)
    assert stopped.info.status == "KILLED"
    assert wait_for(lambda: _train_worker_node(cluster["address"]) is None, timeout_s=60,
                    what="the job's training workers to go"), "a stopped job left workers running"

    # `submit --resume`: the same run goes on, on the cluster, from its newest checkpoint
    again = last_json(cli("submit", path, "--resume", "--json"))["submission_id"]
    resumed = wait_for(lambda: tracking.metric_history(run.info.run_id, "resumed_from_epoch"),
                       what="the run to go on")
    assert resumed[0][1] >= 1
    cli("jobs", "stop", again)
    assert wait_for(lambda: MlflowClient().get_run(run.info.run_id).info.status == "KILLED", timeout_s=30,
                    what="the run to be closed again", job=again)
    assert wait_for(lambda: _train_worker_node(cluster["address"]) is None, timeout_s=60,
                    what="the job's training workers to go")
    status = last_json(cli("cluster", "status", "--json"))
    assert status["alive_nodes"] == 3  # stopping a job leaves the cluster up


def _train_worker_node(address: str) -> str | None:
    from ray.util.state import list_actors

    # A one-worker job trains in a Tune trial (a function trainable), a data-parallel one in Ray Train's workers.
    actors = [actor for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")],
                                             raise_on_missing_output=False)
              if actor.class_name in ("ImplicitFunc", "RayTrainWorker")]
    if not actors:
        return None
    names = {node["node_id"]: node["name"] for node in local_cluster.nodes(local_cluster.read_state())}
    return names.get(actors[0].node_id)


def test_training_survives_losing_its_worker_node(cluster, cli, write_spec):
    """SIGKILL the node the training worker lives on: Ray Train restarts the worker group on the
    other node from the last checkpoint, and the job and its run finish. (Runs last: it loses a node.)"""
    # The job must outlast the state API's answer, which came up to ~30 s late on 2 busy cores (and once
    # not within the 85 s a 900-epoch job took): its epochs take a second each until the node is gone.
    epochs = 300
    faults.slow_epochs("node_loss", 1.0)
    site = f"PYTHONPATH={ROOT / 'tests' / 'fault_site'}:{ROOT / 'tests'}"  # (its workers run tests/faults.py)
    text = SPEC.format(name="node_loss", epochs=epochs, workers=1)
    job = last_json(cli("submit", write_spec(text, "node_loss.yaml"), "--env", site, "--json"))["submission_id"]
    node = wait_for(lambda: _train_worker_node(cluster["address"]), timeout_s=240, what="the training worker's node",
                    job=job)
    run = wait_for(lambda: _running_run("node_loss"), what="the job's first epoch", job=job)
    assert node.startswith("worker_")
    local_cluster.kill_node(node)
    faults.clear()  # the restarted worker group trains at full speed
    client = submitting.client(None)
    assert submitting.wait(client, job, timeout_s=600) == "SUCCEEDED", client.get_job_logs(job)[-3000:]
    finished = MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.metrics["epoch"] == epochs
    resumed = tracking.metric_history(run.info.run_id, "resumed_from_epoch")
    assert resumed and resumed[0][1] >= 1, "the worker group was not restarted from a checkpoint"
    assert wait_for(lambda: last_json(cli("cluster", "status", "--json"))["alive_nodes"] == 2, timeout_s=60,
                    what="the lost node to leave the cluster")
