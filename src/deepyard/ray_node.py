"""`ray start` for a node of this machine's local cluster (``local_cluster``), whose raylet starts
each Python worker through ``ray_worker`` instead of Ray's own ``setup_worker.py``: a worker forked
by the cluster's worker host where it can be, Ray's way where not.

    python -m deepyard.ray_node start --block ...   (the arguments of `ray start`)

Ray's node takes the setup script's name from ``ray_constants.SETUP_WORKER_FILENAME``, joined to its
workers' folder; an absolute path replaces the folder. (A Ray that no longer reads that name starts
its workers its own way: slower, nothing else.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ray._private import ray_constants

from deepyard.job_client import RAY_SETUP_WORKER_ENV


def main() -> None:
    from ray.scripts.scripts import main as ray_cli

    os.environ[RAY_SETUP_WORKER_ENV] = str(Path(ray_constants.__file__).parent / "workers" /
                                           ray_constants.SETUP_WORKER_FILENAME)
    ray_constants.SETUP_WORKER_FILENAME = str(Path(__file__).with_name("ray_worker.py"))
    sys.argv[0] = "ray"
    ray_cli()


if __name__ == "__main__":
    main()
