"""How a Ray worker of this machine's local cluster starts: its raylet runs this file where Ray runs
its ``setup_worker.py`` (``ray_node``), with the same arguments. A Python worker whose runtime env is
only environment variables (a deepyard job's) is forked by the cluster's worker host (``job_host``,
kind "worker"), which has imported torch (and torch._dynamo) and the libraries Ray uses once: a
fresh process would spend ~3 s of CPU on 2 cores on them, on the critical path of every job's start. Any other worker (a
working_dir, pip, a container; Ray's client server), or no host, or one that refuses, starts as Ray
starts it: this process becomes Ray's ``setup_worker.py``.

This process stays, as the worker's stand-in for the raylet: the signals it gets go to the worker,
it exits with the worker's code, and the host kills the worker if this process is killed.
"""

import os
import sys

if __name__ == "__main__" and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # (run as a file: its folder, deepyard's, is not to shadow any other module)

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402

from deepyard import job_client  # noqa: E402


def main(argv: list[str]) -> None:
    options = argparse.ArgumentParser(add_help=False)  # (Ray's setup_worker.py's own options)
    options.add_argument("--serialized-runtime-env-context")
    options.add_argument("--language")
    known, rest = options.parse_known_args(argv)
    original = dict(os.environ)
    path = os.environ.get(job_client.WORKER_HOST_ENV)
    if path and known.language == "PYTHON" and rest and rest[0].endswith("default_worker.py"):
        env_vars = _plain_env_vars(known.serialized_runtime_env_context)
        if env_vars is not None:
            _update_envs(env_vars)
            code = job_client.hand_over(path, {"kind": "worker", "argv": rest, "oom_score_adj": _oom_score_adj(),
                                               "niceness": os.getpriority(os.PRIO_PROCESS, 0),
                                               "identity": job_client.identity(sys.path)})
            if code is not None:
                _exit_as(code)
    os.execve(sys.executable, [sys.executable, original[job_client.RAY_SETUP_WORKER_ENV], *argv], original)


def _plain_env_vars(serialized: str | None) -> dict[str, str] | None:
    """The runtime env's environment variables, or None where it asks for anything else of a worker's
    start (a command before it, another Python, another entry point)."""
    context = json.loads(serialized or "{}")
    if context.get("command_prefix") or context.get("override_worker_entrypoint") or (
            context.get("py_executable") or sys.executable) != sys.executable:
        return None
    return context.get("env_vars") or {}


def _oom_score_adj() -> int | None:
    """The score the raylet gave this process for the kernel's OOM killer: the worker's to take."""
    try:
        with open("/proc/self/oom_score_adj") as adj:
            return int(adj.read())
    except (OSError, ValueError):
        return None


def _exit_as(code: int) -> None:
    """Exit as the worker did: with its code, or killed by its signal (the host says 128 + N)."""
    if 128 < code < 128 + signal.NSIG:
        signum = code - 128
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)  # (one whose default is to be ignored leaves this process to exit)
    sys.exit(code)


def _update_envs(env_vars: dict[str, str]) -> None:
    """As Ray's setup_worker.py sets them: ``${X}`` is X's value here, or empty."""
    import re

    for key, value in env_vars.items():
        os.environ[key] = re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(value))


if __name__ == "__main__":
    main(sys.argv[1:])
