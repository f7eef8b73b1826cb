"""The worker host of a driver's own cluster: a `deepyard run` with no cluster up starts Ray in its
process (``cluster.connected``), and, beside it, a worker host (``job_host``, kind "worker") that
forks that cluster's Ray workers, as `deepyard cluster up`'s does for its nodes. It imports torch
and the libraries Ray uses while Ray starts (~9 s on 2 cores), instead of each fresh worker importing
them on the job's critical path.

It lives in ``<home>/cluster/embedded/<driver pid>/`` (its socket and log) and ends with the driver:
stopped after Ray is (``stop``), or, if the driver is killed, on seeing its exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deepyard import job_client, settings

STOP_S = 30.0  # for its workers to end after SIGTERM (Ray has stopped them by then), then SIGKILL


@dataclass
class EmbeddedWorkers:
    process: subprocess.Popen
    folder: Path

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


def start() -> EmbeddedWorkers | None:
    """A worker host for the cluster this process is about to start, with this process's environment
    (the raylet's, and so its workers'); None where hosts are off (``DEEPYARD_JOB_HOST=0``) or
    cannot run (not Linux)."""
    if os.environ.get(job_client.ENABLED_ENV) == "0" or not job_client.SUPPORTED:
        return None
    base = Path(settings.home()) / "cluster" / "embedded"
    remove_stale(base)
    folder = base / str(os.getpid())
    shutil.rmtree(folder, ignore_errors=True)  # (an earlier process of this pid's, killed)
    folder.mkdir(parents=True, mode=0o700)
    with (folder / "workers.log").open("ab") as log:
        process = subprocess.Popen(job_client.host_command(str(folder / "workers.sock"), "worker", os.getpid()),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # (Ctrl-C reaches the driver, which stops Ray, then it)
    return EmbeddedWorkers(process, folder)


def remove_stale(base: Path) -> None:
    """The folders of drivers killed outright (their hosts saw them go, and exited)."""
    if not base.is_dir():
        return
    for folder in base.iterdir():
        if folder.name.isdigit() and not _alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
