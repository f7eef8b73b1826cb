"""How a Ray worker of this machine's local cluster starts: its raylet runs this file where Ray runs
its ``setup_worker.py`` (``ray_node``), with the same arguments. A Python worker whose runtime env is
only environment variables (a deepyard job's) is forked by the cluster's worker host (``job_host``,
kind "worker"), which has imported torch, Ray Tune and Ray Train once: a fresh process would spend
~3 s of CPU on 2 cores on them, on the critical path of every job's start. Any other worker (a
working_dir, pip, a container; Ray's client server), or no host, or one that refuses, starts as Ray
starts it: this process becomes Ray's ``setup_worker.py``.

This process stays, as the worker's stand-in for the raylet: the signals it gets go to the worker,
it exits with the worker's code, and the host kills the worker if this process is killed.
"""

import sys

if __name__ == "__main__":  # (run as a file: its folder, deepyard's, is first on the module path)
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

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
            code = job_client.hand_over(path, {"kind": "worker", "argv": rest,
                                               "identity": job_client.identity(sys.path)})
            if code is not None:
                sys.exit(code)
    os.execve(sys.executable, [sys.executable, original[job_client.RAY_SETUP_WORKER_ENV], *argv], original)


def _plain_env_vars(serialized: str | None) -> dict[str, str] | None:
    """The runtime env's environment variables, or None where it asks for anything else of a worker's
    start (a command before it, another Python, another entry point)."""
    context = json.loads(serialized or "{}")
    if context.get("command_prefix") or context.get("override_worker_entrypoint") or (
            context.get("py_executable") or sys.executable) != sys.executable:
        return None
    return context.get("env_vars") or {}


def _update_envs(env_vars: dict[str, str]) -> None:
    """As Ray's setup_worker.py sets them: ``${X}`` is X's value here, or empty."""
    import re

    for key, value in env_vars.items():
        os.environ[key] = re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(value))


if __name__ == "__main__":
    main(sys.argv[1:])
