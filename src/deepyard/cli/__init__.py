"""The `deepyard` command, one module per group of commands (``app.py``: what they share):

``jobs``     validate, run, data        ``models``   models list / show / promote
``serving``  deploy, undeploy, endpoints, predict     ``rl``  rl eval
``cluster``  submit, jobs ..., cluster ...
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from deepyard.cli import cluster, jobs, models, rl, serving  # noqa: F401  (each registers its commands)
from deepyard.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except SystemExit as stop:
        _exit_at_once(stop.code)
    _exit_at_once(0)


def _exit_at_once(code: int | str | None) -> None:
    """End the process without the interpreter's teardown of every module and object: with torch,
    Ray and MLflow loaded it took ~3 s after a job had finished, for nothing. What that teardown is
    for is done first: threads still working (a local cluster stopping behind the driver), every exit
    handler (Ray's shutdown, MLflow's and logging's flushes), the standard streams."""
    if isinstance(code, str):  # sys.exit("message"): the message, and status 1
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (`| head`), or a closed stream: nothing to lose
            pass
    os._exit(code or 0)
