"""`deepyard submit` and `deepyard jobs`: a spec run on a Ray cluster through Ray's Job Submission API.

The spec is validated here first (a bad one exits 2 and nothing is sent), then resolved (defaults
and --set filled in, a sweep's base inlined) and sent as the job's working directory, with this
checkout's `deepyard` package unless the cluster's image has it (``ship_code=False``). The driver
on the cluster runs `deepyard run spec.yaml --json`; which settings travel with it is
``passed_environment``'s rule. Ray's own token never does: the SDK reads it from the usual place
(``RAY_AUTH_TOKEN``, ``~/.ray/auth_token``) and sends it as a header.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from deepyard.errors import BadInput, DeepyardError

ENTRYPOINT = "python -m deepyard run spec.yaml --json"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PASSED_ON = ("MLFLOW_", "DEEPYARD_")


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else `deepyard cluster up`'s."""
    from deepyard import local_cluster

    ray_address = os.environ.get("RAY_ADDRESS", "")
    found = address or os.environ.get("RAY_API_SERVER_ADDRESS") or (ray_address if "://" in ray_address else None)
    if not found and (state := local_cluster.read_state()) is not None:
        found = state["address"]
    if not found:
        raise BadInput("no cluster to submit to: pass --address http://HEAD:8265, set RAY_API_SERVER_ADDRESS, "
                       "or start a local one with `deepyard cluster up`")
    return found if "://" in found else f"http://{found}"


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    from deepyard import local_cluster

    resolved = resolve_address(address)
    local_cluster.authenticate(resolved)
    try:
        return JobSubmissionClient(resolved)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise BadInput(f"cannot reach the Ray job API at {resolved} ({str(error).splitlines()[0]}); "
                       "is the cluster up and its dashboard on that port?") from None


def _machine_local(uri: str) -> bool:
    """A URI that means something on this machine only: a file, sqlite, or localhost."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    return parsed.scheme in ("", "file", "sqlite") or parsed.hostname in ("localhost", "127.0.0.1", "::1")


def passed_environment(to_local_cluster: bool, explicit: list[str]) -> dict[str, str]:
    """What the job's driver gets from here. To this machine's cluster: the MLFLOW_*/DEEPYARD_* settings
    (same disk, same paths). To a remote one, only what makes sense there: a tracking server and a
    storage URI that are not this machine's; the cluster's own settings stay otherwise. Credentials
    (*PASSWORD*, *TOKEN*, *SECRET*) never go implicitly: a job's runtime env is readable on the
    dashboard. ``explicit`` (`--env KEY` or `--env KEY=VALUE`) sends exactly what it names."""
    secret = ("PASSWORD", "TOKEN", "SECRET")
    passed = {key: value for key, value in os.environ.items()
              if key.startswith(PASSED_ON) and not any(word in key for word in secret)}
    if not to_local_cluster:
        passed = {key: value for key, value in passed.items()
                  if (key == "MLFLOW_TRACKING_URI" and not _machine_local(value))
                  or (key == "DEEPYARD_STORAGE" and "://" in value)}
    for item in explicit:
        key, sep, value = item.partition("=")
        if not sep and key not in os.environ:
            raise BadInput(f"--env {key}: not set here; give a value (--env {key}=VALUE)")
        passed[key] = value if sep else os.environ[key]
    return passed


def _existing(jobs, submission_id: str):
    try:
        return jobs.get_job_info(submission_id)
    except RuntimeError:  # the SDK's "not found"
        return None


def submit(spec_path: Path, overrides: list[str], *, address: str | None = None, submission_id: str | None = None,
           ship_code: bool = True, env: list[str] | None = None, resume: bool = False) -> dict[str, Any]:
    """Validate, then submit; the same ``submission_id`` twice returns the first job (idempotent).
    ``resume``: the driver runs ``deepyard run --resume``, which goes on with the job's last stopped run
    (its MLflow store and checkpoint storage are the cluster's)."""
    import deepyard
    from deepyard.spec import KINDS, load_spec, to_yaml

    from deepyard import cluster_queue, local_cluster

    spec = load_spec(spec_path, overrides)
    if resume and not KINDS[spec.kind].resumable:
        raise BadInput(f"--resume continues an interrupted job; a {spec.kind} job cannot resume")
    environment = passed_environment(local_cluster.is_local(resolve_address(address)), env or [])
    jobs = client(address)
    if submission_id and (info := _existing(jobs, submission_id)) is not None:
        return {"submission_id": submission_id, "status": str(info.status), "already_submitted": True,
                "name": (info.metadata or {}).get("deepyard.name")}
    # the cluster's queue: the job waits PENDING until its workers' CPUs and GPUs are free
    quota = cluster_queue.capacity(resolve_address(address))
    waits_for = cluster_queue.admission(spec.footprint(), quota, spec.name)
    with tempfile.TemporaryDirectory(prefix="deepyard-submit-") as folder:
        (Path(folder) / "spec.yaml").write_text(to_yaml(spec))
        runtime_env: dict[str, Any] = {"working_dir": folder,
                                       "env_vars": environment}
        if ship_code:
            runtime_env["py_modules"] = [str(Path(deepyard.__file__).parent)]
        job_id = jobs.submit_job(entrypoint=ENTRYPOINT + (" --resume" if resume else ""), runtime_env=runtime_env,
                                 submission_id=submission_id, entrypoint_resources=waits_for or None,
                                 metadata={"deepyard.name": spec.name, "deepyard.kind": spec.kind,
                                           "deepyard.spec": str(spec_path), "deepyard.resume": str(resume).lower(),
                                           "deepyard.waits_for": cluster_queue.describe(waits_for)})
    return {"submission_id": job_id, "status": "PENDING", "already_submitted": False, "name": spec.name,
            "queue": bool(quota), "waits_for": waits_for}


def follow(jobs, job_id: str, write: Callable[[str], Any]) -> None:
    """Stream the job's logs until it ends."""
    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())


def require(jobs, job_id: str):
    """The job's details, or BadInput naming where to look."""
    info = _existing(jobs, job_id)
    if info is None:
        raise BadInput(f"no job {job_id!r} on this cluster; `deepyard jobs list` shows them")
    return info


def summary(jobs, job_id: str) -> dict[str, Any]:
    """The job's status, timing and, once it succeeded, the run summary its driver printed last."""
    info = require(jobs, job_id)
    result = {"submission_id": job_id, "status": str(info.status), "message": info.message,
              "name": (info.metadata or {}).get("deepyard.name"), "entrypoint": info.entrypoint,
              "start_time": info.start_time, "end_time": info.end_time, "driver_exit_code": info.driver_exit_code}
    if str(info.status) == "SUCCEEDED":
        result["run"] = last_json_line(jobs.get_job_logs(job_id))
    return result


def last_json_line(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def list_jobs(jobs) -> list[dict[str, Any]]:
    """Every submitted job, oldest first; a PENDING one is in the queue, waiting for ``waits_for``."""
    return [{"submission_id": job.submission_id, "status": str(job.status),
             "name": (job.metadata or {}).get("deepyard.name"), "kind": (job.metadata or {}).get("deepyard.kind"),
             "waits_for": (job.metadata or {}).get("deepyard.waits_for"),
             "start_time": job.start_time, "end_time": job.end_time}
            for job in sorted(jobs.list_jobs(), key=lambda job: job.start_time or 0) if job.submission_id]


def wait(jobs, job_id: str, timeout_s: float) -> str:
    import time

    deadline = time.monotonic() + timeout_s
    while (status := str(jobs.get_job_status(job_id))) not in TERMINAL:
        if time.monotonic() > deadline:
            raise DeepyardError(f"job {job_id} is still {status} after {timeout_s:.0f} s")
        time.sleep(0.5)
    return status
