"""Shared fixtures: one real local Ray cluster (its workers forked by a worker host, as a job's own
cluster's are) and one real MLflow sqlite store per test session.

The CLI runs in-process (typer's runner) so that every job reuses the session's Ray cluster
instead of paying Ray's start-up per test; Ray, MLflow and the training loop are all real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepyard.cli import app, exit_at_once

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Once pytest is done, end as the `deepyard` command does: the interpreter's teardown of torch,
    Ray and MLflow took another 4 s of every test run, for nothing. Without a finished session (a
    usage error), pytest ends as usual."""
    if hasattr(config, "deepyard_exit_status"):
        exit_at_once(config.deepyard_exit_status)


def pytest_sessionfinish(session, exitstatus):
    session.config.deepyard_exit_status = int(exitstatus)


@pytest.fixture(scope="session", autouse=True)
def deepyard_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("deepyard_home")
    os.environ["DEEPYARD_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ.pop("RAY_ADDRESS", None)
    return home


@pytest.fixture(scope="session")
def ray_cluster(deepyard_home):
    import ray

    from deepyard.cluster import serve_env
    from deepyard.settings import NODE_ENV, TRAIN_ENV

    # a local cluster's settings; serving tests run what `deepyard deploy` runs
    os.environ.update({**TRAIN_ENV, **NODE_ENV, **serve_env()})
    # Every worker can import the tests' own fault injection (faults.py), which stays inert until a test asks.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    _start_cluster(ray)
    yield ray
    _stop_cluster(ray)


_workers = None  # the session cluster's worker host (embedded_workers), as a `deepyard run` of its own has


def _start_cluster(ray) -> None:
    """A local cluster whose Ray workers are forked by a worker host, as a job's own cluster's are: a
    trial then starts in ~1.5 s instead of ~5 s, and each job of the session gains the difference."""
    global _workers
    from deepyard import embedded_workers

    _workers = embedded_workers.start()
    with embedded_workers.starting(_workers) as forked:
        ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": "faults.install"}, **forked)


def _stop_cluster(ray) -> None:
    ray.shutdown()
    if _workers is not None:  # (after Ray: the raylet stops its workers first)
        _workers.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test whose job leaves CPUs of the session's cluster held (an actor, a task or a placement
    group that outlived it) fails here, and the cluster starts afresh: otherwise a later streaming
    job's Ray Data tasks wait for CPUs that never come back, and it hangs until a timeout."""
    import ray

    if "ray_cluster" not in item.fixturenames or not ray.is_initialized():
        return (yield)
    free_before, passed = _free_cpus(ray), False
    try:
        result = yield
        passed = True
        return result
    finally:
        _leave_the_cluster_free(ray, free_before, fail=passed)


def _leave_the_cluster_free(ray, free_before: float, fail: bool) -> None:
    if not ray.is_initialized():
        return
    deadline = time.monotonic() + LEAK_GRACE_S  # (a killed actor gives its CPUs back within a second or two)
    while (held := free_before - _free_cpus(ray)) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    if held <= 0:
        return
    holders = _cpu_holders()
    _stop_cluster(ray)
    _start_cluster(ray)
    if fail:  # (a test that failed already keeps its own failure)
        pytest.fail(f"the test left {held:g} CPU(s) of the session's cluster held {LEAK_GRACE_S} s after it "
                    f"ended, by {holders}; the cluster was restarted for the tests after it")


LEAK_GRACE_S = 60


def _free_cpus(ray) -> float:
    return ray.available_resources().get("CPU", 0.0)


def _cpu_holders() -> dict:
    from ray.util import placement_group_table
    from ray.util.state import list_actors, list_tasks

    alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    running = list_tasks(filters=[("state", "=", "RUNNING")], detail=True)
    return {
        "actors": [(a.class_name, a.required_resources) for a in alive if (a.required_resources or {}).get("CPU")],
        "tasks": [(t.name, t.required_resources) for t in running if (t.required_resources or {}).get("CPU")],
        "placement_groups": [(g["name"], g["bundles"]) for g in placement_group_table().values()
                             if g["state"] == "CREATED"],
    }


def ended(process: subprocess.Popen, timeout: float) -> str:
    """``process`` (a `deepyard` command) ended within ``timeout`` s: its stderr. If not, it fails
    with where each of its threads waited (the command prints them on SIGUSR2), and is killed."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR2)
        time.sleep(3)
        process.kill()
        stderr = process.communicate()[1]
        raise AssertionError(f"the command did not end within {timeout} s; its threads then:\n"
                             f"{stderr[-12000:]}") from None


@pytest.fixture()
def cli():
    runner = CliRunner()

    def invoke(*args: str, expect: int | None = 0):
        result = runner.invoke(app, list(args))
        _log_handlers_to_stderr_again()
        if expect is not None and result.exit_code != expect:
            raise AssertionError(f"exit {result.exit_code} != {expect}\nstdout:\n{result.stdout}\n"
                                 f"stderr:\n{result.stderr}\n{result.exception!r}")
        return result

    return invoke


def _log_handlers_to_stderr_again() -> None:
    """A library imported during an invocation (Ray: its "ray" logger) bound its log handler to the
    runner's stderr, closed now: later warnings (Ray Data's "no CPU available") would be lost."""
    import logging
    import sys

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # (not setStream: it flushes the closed one first)


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now (for a Serve instance a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture()
def write_spec(tmp_path):
    def write(text: str, name: str = "spec.yaml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


DIGITS_SOURCE = """
kind: train
name: digits_source
data: {name: digits, params: {classes: [0, 1, 2, 3, 4]}}
model: {name: cnn, params: {channels: [8, 16], hidden_sizes: [32]}}
optim: {name: adam, lr: 0.01}
train: {epochs: 2, batch_size: 32}
promote: {alias: champion, only_if_better: false}
"""


@pytest.fixture(scope="session")
def digits_source(ray_cluster, tmp_path_factory) -> dict:
    """A small CNN on digits 0-4, trained and registered once (digits_source@champion): the source
    of the transfer tests and the parent of the compress tests."""
    path = tmp_path_factory.mktemp("digits_source") / "digits_source.yaml"
    path.write_text(DIGITS_SOURCE)
    result = CliRunner().invoke(app, ["run", str(path), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    return last_json(result)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1; pyarrow (and so deepyard, and the Ray
    workers of a job started after it) finds it through AWS_ENDPOINT_URL. Yields the environment
    and a boto3 client to fill buckets with."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield {"env": env, "client": boto3.client("s3")}
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
