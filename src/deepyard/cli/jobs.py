"""`deepyard validate`, `deepyard run` and `deepyard data`: a job spec, checked or run, whatever its kind."""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer

from deepyard import settings, stops
from deepyard.cli.app import JsonOutput, Overrides, SpecPath, app, err, out, user_errors
from deepyard.errors import BadInput, DeepyardError


@app.command()
@user_errors
def validate(spec: SpecPath, set_: Overrides = None) -> None:
    """Check a spec (and that its data loads and fits the model) without starting anything."""
    from deepyard.spec import KINDS, load_spec

    job = load_spec(spec, set_ or [])
    checked = KINDS[job.kind].runner_module().check(job)
    err.print(f"[green]ok[/] {spec}: kind={job.kind} name={job.name} {checked}", highlight=False)


@app.command()
@user_errors
def run(
    spec: SpecPath,
    set_: Overrides = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default $RAY_ADDRESS, else the "
                                                        "cluster `deepyard cluster up` started, else a local "
                                                        "cluster of the job's own (always: local)")] = None,
    json_output: JsonOutput = False,
    ray_logs: Annotated[bool, typer.Option("--ray-logs", help="stream Ray's worker logs to the terminal")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue the job's last interrupted run (Ctrl-C, "
                                                          "a killed driver, a failure) from its newest "
                                                          "checkpoint")] = False,
    keep_cluster: Annotated[Optional[float], typer.Option(
        "--keep-cluster", min=1, envvar="DEEPYARD_KEEP_CLUSTER",
        help="seconds: with no cluster up, start the local one (`deepyard cluster up --workers 0`) for this "
             "job and leave it up for the next ones until it has been idle this long")] = None,
) -> None:
    """Run a job: train on Ray, track in MLflow, register the model."""
    from deepyard import cluster, embedded_workers
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import KINDS, load_spec
    from deepyard.tracking import tracking_uri

    job = load_spec(spec, set_ or [])
    kind = KINDS[job.kind]
    if resume and not kind.resumable:
        resumable = " or ".join(name for name, k in KINDS.items() if k.resumable)
        raise BadInput(f"--resume continues an interrupted {resumable} job; a {job.kind} job cannot resume")
    settings.check_writable(job)
    address = address or os.environ.get("RAY_ADDRESS") or _running_local_cluster(job, keep_cluster)
    address = None if address == "local" else address  # (Ray's word for a cluster of the job's own)
    cluster.check_reachable(address)  # before a run is opened for the job
    options = RunOptions(address=address, ray_logs=ray_logs, resume=resume, console=err, json_output=json_output)
    # (a cluster of the job's own, for workers: their host starts now, while the job is checked)
    with stops.signals_stop_the_job(), embedded_workers.ahead(address is None and any(job.footprint().values())):
        summary = kind.runner_module().run(job, options)
    lines = summary.lines()
    if lines:
        err.print(f"[green]done[/] {job.name}: {lines[0]}", highlight=False)
        for line in lines[1:]:
            err.print(f"  {line}", highlight=False)
    if summary.run_id:
        err.print("  browse runs: mlflow ui --backend-store-uri " + tracking_uri(), highlight=False)
    if json_output:
        print(json.dumps(summary.to_json(), default=str))


def _running_local_cluster(job, keep_s: float | None) -> str | None:
    """The cluster `deepyard cluster up` started, when it is up and can take the job: joining it
    skips Ray's start (~4 s of a small job's ~15 s on 2 cores). With ``keep_s`` and none up, one is
    started for the job and stays for the next ones until idle that long. A deploy job serves on a
    cluster of its own, which starts with Serve's fast-proxy settings."""
    from deepyard import local_cluster

    if job.kind == "deploy":
        return None
    worker_cpus = getattr(getattr(job, "scaling", None), "cpus_per_worker", 0.0)
    address, why_not = local_cluster.joinable(job.footprint(), worker_cpus)
    if address:
        err.print(f"on the local cluster at {address} (`deepyard cluster up`; --address local: a cluster of "
                  "the job's own)", highlight=False)
    elif why_not:
        err.print(f"[yellow]note:[/] {why_not}; the job starts a cluster of its own", highlight=False)
    elif keep_s is not None and local_cluster.fits_here(job.footprint()):
        try:
            with stops.signals_stop_the_job():  # (SIGTERM while it starts: its nodes are stopped, not left)
                address = local_cluster.up(workers=0, cpus_per_node=os.cpu_count() or 1, idle_stop_s=keep_s,
                                           wait_for_host=False)["gcs_address"]  # (it serves the next jobs)
            local_cluster.record_join()
        except DeepyardError as error:  # (one started by another command meanwhile is joined)
            address = local_cluster.joinable(job.footprint())[0]
            if not address:
                err.print(f"[yellow]note:[/] the local cluster did not start ({error}); the job starts a cluster "
                          "of its own", highlight=False)
            return address
        err.print(f"started the local cluster at {address}: it stays for the next jobs until {keep_s:g} s idle "
                  "(`deepyard cluster status`, `deepyard cluster down`)", highlight=False)
    return address


@app.command()
def data() -> None:
    """List the data sets, model builders and optimizers a spec can name."""
    from deepyard.data import DATASETS
    from deepyard.models import MODELS
    from deepyard.optim import OPTIMIZERS

    for registry in (DATASETS, MODELS, OPTIMIZERS):
        out.print(f"[bold]{registry.what}s[/]: {', '.join(registry.names())}")
