"""The `deepyard` command, one module per group of commands (``app.py``: what they share):

``jobs``     validate, run, data        ``models``   models list / show / promote
``serving``  deploy, undeploy, endpoints, predict     ``rl``  rl eval
``cluster``  submit, jobs ..., cluster ...
"""

from __future__ import annotations

import sys

from deepyard.cli import cluster, jobs, models, rl, serving  # noqa: F401  (each registers its commands)
from deepyard.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    sys.exit(app())
