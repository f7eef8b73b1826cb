"""Nodes whose raylet starts each Python worker through ``ray_worker`` instead of Ray's own
``setup_worker.py``: a worker forked by a worker host where it can be, Ray's way where not. For a node
of this machine's local cluster (``local_cluster``):

    python -m deepyard.ray_node start --block ...   (the arguments of `ray start`)

and for the node a driver starts with ``ray.init()`` (``embedded_workers``): ``forking_workers``; with
no dashboard wanted, ``lean``.

Ray's node takes the setup script's name from ``ray_constants.SETUP_WORKER_FILENAME``, joined to its
workers' folder; an absolute path replaces the folder. (A Ray that no longer reads that name starts
its workers its own way: slower, nothing else.)
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ray._private import ray_constants

from deepyard.job_client import RAY_SETUP_WORKER_ENV, WORKER_HOST_ENV


@contextmanager
def forking_workers(host_socket: str | None) -> Iterator[None]:
    """While a node starts in this process: its raylet runs ``ray_worker``, which asks the worker host
    listening at ``host_socket`` (the raylet keeps the environment it started with). None: Ray's own way."""
    if host_socket is None:
        yield
        return
    original = ray_constants.SETUP_WORKER_FILENAME
    before = {name: os.environ.get(name) for name in (RAY_SETUP_WORKER_ENV, WORKER_HOST_ENV)}
    os.environ[RAY_SETUP_WORKER_ENV] = str(Path(ray_constants.__file__).parent / "workers" / original)
    os.environ[WORKER_HOST_ENV] = host_socket
    ray_constants.SETUP_WORKER_FILENAME = str(Path(__file__).with_name("ray_worker.py"))
    try:
        yield
    finally:
        ray_constants.SETUP_WORKER_FILENAME = original
        for name, value in before.items():  # (this process's own children are not the node's)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def lean(log_monitor: bool) -> Iterator[None]:
    """While ``ray.init(include_dashboard=False)`` starts a local node for one job: none of the head's
    Python processes that such a job never asks anything of, each ~0.7-1.3 s of a core at the moment
    the job starts, on 2 cores:

    - the dashboard process Ray starts even then (its usage-stats module only: the state API is not
      loaded), which ray.init waits for before it starts the raylet: ~4 s -> ~2.8 s;
    - the autoscaler's monitor: a node of fixed size (KubeRay starts its heads so, `--no-monitor`);
    - unless ``log_monitor``, the log monitor, which streams the workers' output to a driver that
      does not show it (`--include-log-monitor=false`).

    (Ray's private names, for Ray 2.60, which pyproject pins: a Ray without ``Node.start_api_server``
    fails here, and one whose ``Node`` reads the two settings no more starts those processes as before.)"""
    from ray._private.node import Node

    original_init, original_api_server = Node.__init__, Node.start_api_server

    def init(self, ray_params, *args, **kwargs) -> None:
        ray_params.no_monitor = True
        if not log_monitor:
            ray_params.include_log_monitor = False
        original_init(self, ray_params, *args, **kwargs)

    def no_api_server(self, *args, **kwargs) -> None:
        self._webui_url = None  # (what a node without a dashboard reports)

    Node.__init__, Node.start_api_server = init, no_api_server
    try:
        yield
    finally:
        Node.__init__, Node.start_api_server = original_init, original_api_server


def main() -> None:
    from ray.scripts.scripts import main as ray_cli

    sys.argv[0] = "ray"
    with forking_workers(os.environ[WORKER_HOST_ENV]):
        ray_cli()


if __name__ == "__main__":
    main()
