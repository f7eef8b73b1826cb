"""The worker host of a driver's own cluster: a `deepyard run` with no cluster up starts Ray in its
process (``cluster.connected``), and, beside it, a worker host (``job_host``, kind "worker") that
forks that cluster's Ray workers, as `deepyard cluster up`'s does for its nodes. It imports torch
and the libraries Ray uses while Ray starts (~9 s on 2 cores), instead of each fresh worker importing
them on the job's critical path.

`deepyard run` starts it as soon as it knows the job gets a cluster of its own (``ahead``), while
it imports and checks the job, one core's work: on 2 cores, the host's imports take the other, where
beside Ray's start they slowed it by ~2 s (bench/train_overhead.py).

It lives in ``<home>/cluster/embedded/<driver pid>/`` (its socket and log) and ends with the driver:
stopped after Ray is (``stop``), or, if the driver is killed, on seeing its exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

from deepyard import job_client, settings

# What libraries a driver imports set in its environment when imported (scikit-learn and joblib, for
# Intel's OpenMP runtime; the data sets of scikit-learn are loaded after the host has started): set
# ahead, as they would be, so that the host has the environment the raylet will have.
IMPORT_DEFAULTS = {"KMP_DUPLICATE_LIB_OK": "True", "KMP_INIT_AT_FORK": "FALSE"}
STOP_S = 30.0  # for its workers to end after SIGTERM (Ray has stopped them by then), then SIGKILL


@dataclass
class EmbeddedWorkers:
    process: subprocess.Popen
    folder: Path
    env: dict[str, str]  # what of its environment its imports read (``job_client.import_env_of``)

    @property
    def socket(self) -> str:
        return str(self.folder / "workers.sock")

    def stop(self) -> None:
        """After ray.shutdown: SIGTERM (the host passes it to any worker left and waits for them)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_ahead: EmbeddedWorkers | None = None  # started by ``ahead``, for ``take``
_unwanted = False  # ``ahead`` was told the job starts no Ray workers (an RL job that samples in its driver)


@contextmanager
def ahead(wanted: bool) -> Iterator[None]:
    """A host started now if ``wanted`` (no cluster to join, and a job that asks Ray for CPUs or GPUs:
    one that asks for none starts no workers, and a host would only take CPU from it), for the cluster
    this process will start in the block (``take``); stopped at the block's end if none took it. (None
    where this process is connected to Ray already, as a program that embeds deepyard may be.)"""
    global _ahead, _unwanted
    ray = sys.modules.get("ray")
    _unwanted = not wanted
    _ahead = start() if wanted and not (ray is not None and ray.is_initialized()) else None
    try:
        yield
    finally:
        unused, _ahead, _unwanted = _ahead, None, False
        if unused is not None:
            unused.stop()


def take() -> EmbeddedWorkers | None:
    """The host for the cluster this process starts now: the one started ahead, or a new one (where
    that one died, or where this process has set a variable its imports read since)."""
    global _ahead
    workers, _ahead = _ahead, None
    same_env = workers is not None and workers.env == job_client.import_env_of(os.environ, "worker")
    if same_env and workers.process.poll() is None:
        return workers
    if workers is not None:
        workers.stop()
    return None if _unwanted else start()


def start() -> EmbeddedWorkers | None:
    """A worker host for the cluster this process is about to start, with this process's environment
    (the raylet's, and so its workers'); None where hosts are off (``DEEPYARD_JOB_HOST=0``) or
    cannot run (not Linux)."""
    if os.environ.get(job_client.ENABLED_ENV) == "0" or not job_client.SUPPORTED:
        return None
    for name, value in IMPORT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    base = Path(settings.home()) / "cluster" / "embedded"
    remove_stale(base)
    folder = base / str(os.getpid())
    shutil.rmtree(folder, ignore_errors=True)  # (an earlier process of this pid's, killed)
    folder.mkdir(parents=True, mode=0o700)
    with (folder / "workers.log").open("ab") as log:
        process = subprocess.Popen(job_client.host_command(str(folder / "workers.sock"), "worker", os.getpid()),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # (Ctrl-C reaches the driver, which stops Ray, then it)
    return EmbeddedWorkers(process, folder, job_client.import_env_of(os.environ, "worker"))


@contextmanager
def starting(workers: EmbeddedWorkers | None) -> Iterator[dict]:
    """While ray.init starts a local node whose Ray workers ``workers`` forks (None: Ray's own way):
    yields ray.init's further options."""
    from deepyard import ray_node  # (Ray: only where a node starts)

    with ray_node.forking_workers(workers.socket if workers else None):
        # (the workers Ray starts ahead for a first driver, before its job is known, took no task of
        # it: forked, a worker starts in ~1 s, and these cost CPU then)
        yield {"_system_config": {"prestart_worker_first_driver": False}} if workers else {}


def remove_stale(base: Path) -> None:
    """The folders of drivers killed outright (their hosts saw them go, and exited)."""
    if not base.is_dir():
        return
    for folder in base.iterdir():
        if folder.name.isdigit() and not psutil.pid_exists(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
