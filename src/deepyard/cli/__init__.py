"""The `deepyard` command, one module per group of commands (``app.py``: what they share):

``jobs``     validate, run, data        ``models``   models list / show / promote, explain
``serving``  deploy, undeploy, endpoints, predict     ``rl``  rl eval
``cluster``  submit, jobs ..., cluster ...
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
import sys

from deepyard import stops
from deepyard.cli import cluster, jobs, models, rl, serving  # noqa: F401  (each registers its commands)
from deepyard.cli.app import app

__all__ = ["app", "exit_at_once", "main"]


def main() -> None:
    from deepyard import job_client

    job_client.COMMAND_ENV = dict(os.environ)  # (a job host this command starts gets the shell's, not ours)
    if sys.argv[1:2] == ["run"]:  # a job host beside the local cluster has the libraries loaded already
        if (code := job_client.run_there(sys.argv)) is not None:
            os._exit(_flushed(code) or 0)
    faulthandler.enable()  # a crash in native code (torch, Arrow, Ray's core) prints every thread's stack
    if hasattr(signal, "SIGUSR2"):  # and so does `kill -USR2 PID`: where a command that seems stuck waits
        stops.stacks_on(signal.SIGUSR2)  # (not USR1: Ray Tune takes it over)
    try:
        app()
    except SystemExit as stop:
        exit_at_once(stop.code)
    exit_at_once(0)


def exit_at_once(code: object) -> None:
    """End the process without the interpreter's teardown of every module and object: with torch,
    Ray and MLflow loaded it took ~3 s after a job had finished, for nothing. What that teardown is
    for is done first: a local cluster stopping behind the driver is waited for, every exit handler
    runs (Ray's shutdown, MLflow's and logging's flushes), the standard streams are flushed."""
    from deepyard.cluster import wait_stopped

    if code is not None and not isinstance(code, int):  # sys.exit("message"): the message, and status 1
        print(code, file=sys.stderr)
        code = 1
    status = [code]  # (what the watchdog exits with, if it must)
    _end_anyway_after(EXIT_HANDLERS_S, status)
    try:
        wait_stopped()
    except KeyboardInterrupt:  # Ctrl-C while it stops: Ray's exit handler below stops it at once
        status[0] = status[0] or 130
    atexit._run_exitfuncs()
    status[0] = _flushed(status[0])
    os._exit(status[0] or 0)


def _flushed(code: int | None) -> int | None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # the reader is gone (`| head`), or the stream closed
            pass
        except OSError:  # a full disk: the output is lost, as Python itself would say
            code = code or 120
    return code


EXIT_HANDLERS_S = 30.0  # what they take: ~1-2 s (Ray's, stopping a local cluster's processes)


def _end_anyway_after(seconds: float, status: list) -> None:
    """The job's outcome is recorded by now: if stopping the cluster or an exit handler hangs, the
    command still ends (its output flushed, its exit status ``status[0]``), with where each thread
    waited on stderr. (CI saw a stopped sweep's driver print "interrupted" and then not end.) A hang
    that holds the GIL, or a stream's lock, is ended by faulthandler."""
    import threading

    def end() -> None:
        code = _flushed(status[0])  # (a --json summary on stdout must not be lost)
        print(f"deepyard: the command's exit handlers did not end within {seconds:g} s; ending it. "
              "Where each thread waited:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(code or 0)  # (the job's own exit status: its outcome stands)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds + 15, exit=True)

