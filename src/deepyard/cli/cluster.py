"""`deepyard submit`, `deepyard jobs ...` and `deepyard cluster ...`: jobs on a real Ray cluster.

Registered on the main `deepyard` app (``cli/__init__.py``); same conventions (exit 2 on bad input, --json
puts one JSON object on the last stdout line).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from deepyard.cli.app import Overrides, SpecPath, app, err, out, user_errors

ApiAddress = Annotated[Optional[str], typer.Option(
    "--address", help="the cluster's job API, http://HEAD:8265; default $RAY_API_SERVER_ADDRESS, else "
                      "the cluster `deepyard cluster up` started")]
JsonOutput = Annotated[bool, typer.Option("--json", help="print one JSON object as the last stdout line")]
JobId = Annotated[str, typer.Argument(help="the submission id `deepyard submit` printed")]


@app.command()
@user_errors
def submit(
    spec: SpecPath,
    set_: Overrides = None,
    address: ApiAddress = None,
    submission_id: Annotated[Optional[str], typer.Option("--id", help="a submission id of your own: submitting "
                                                                      "the same id again changes nothing")] = None,
    ship_code: Annotated[bool, typer.Option("--ship-code/--no-ship-code", help="send this checkout's deepyard "
                                            "package (off: the cluster's image has it)")] = True,
    env: Annotated[Optional[list[str]], typer.Option(
        "--env", help="send an environment variable to the job: KEY (its value here) or KEY=VALUE; repeatable")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="stream the job's logs until it ends")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue the job's last stopped run on the "
                                                          "cluster from its newest checkpoint")] = False,
    json_output: JsonOutput = False,
) -> None:
    """Run a spec on a Ray cluster through its job API (validated here first; nothing is sent if it is bad)."""
    from deepyard import submit as submitting

    result = submitting.submit(spec, set_ or [], address=address, submission_id=submission_id, ship_code=ship_code,
                               env=env, resume=resume)
    job_id = result["submission_id"]
    verb = "already submitted" if result["already_submitted"] else "submitted"
    err.print(f"[green]{verb}[/] {result['name']} as job {job_id} ({result['status']}); "
              f"logs: deepyard jobs logs {job_id} --follow", highlight=False)
    if not result["already_submitted"]:
        from deepyard import cluster_queue

        err.print(f"  queued until the cluster has {cluster_queue.describe(result['waits_for'])} free for it"
                  if result["queue"] else "  this cluster has no queue (no deepyard_queue_cpu on its head): "
                  "it starts at once", highlight=False)
    if follow:
        jobs = submitting.client(address)
        submitting.follow(jobs, job_id, lambda text: err.out(text, end="", highlight=False))
        result = submitting.summary(jobs, job_id)
        err.print(f"job {job_id}: {result['status']}", highlight=False)
    if json_output:
        print(json.dumps(result, default=str))
    if result["status"] in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster: list them, their status, logs; stop one.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
@user_errors
def jobs_list(address: ApiAddress = None, json_output: JsonOutput = False) -> None:
    """Every job the cluster knows, oldest first: the queue is the PENDING ones, each waiting for its workers' share."""
    from deepyard import submit as submitting

    rows = submitting.list_jobs(submitting.client(address))
    if json_output:
        print(json.dumps(rows, default=str))
        return
    table = Table("id", "status", "name", "kind", "holds while running")
    for row in rows:
        table.add_row(row["submission_id"], row["status"], row["name"] or "-", row["kind"] or "-",
                      row["waits_for"] or "-")
    out.print(table if rows else "no jobs yet: `deepyard submit SPEC`")


@jobs_app.command("status")
@user_errors
def jobs_status(job_id: JobId, address: ApiAddress = None, json_output: JsonOutput = False) -> None:
    """A job's status; once it succeeded, its MLflow run and metrics."""
    from deepyard import submit as submitting

    result = submitting.summary(submitting.client(address), job_id)
    run = result.get("run") or {}
    err.print(f"job {job_id} ({result['name']}): {result['status']}"
              + (f"; run {run['run_id']} in experiment {run['experiment']!r}" if run.get("run_id") else "")
              + (f"; {result['message']}" if result["status"] != "SUCCEEDED" and result["message"] else ""),
              highlight=False)
    if json_output:
        print(json.dumps(result, default=str))


@jobs_app.command("logs")
@user_errors
def jobs_logs(job_id: JobId, address: ApiAddress = None,
              follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends")] = False,
              ) -> None:
    """A job's driver output."""
    from deepyard import submit as submitting

    jobs = submitting.client(address)
    submitting.require(jobs, job_id)  # an unknown id exits 2 with a hint
    if follow:
        submitting.follow(jobs, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    else:
        sys.stdout.write(jobs.get_job_logs(job_id))


@jobs_app.command("stop")
@user_errors
def jobs_stop(job_id: JobId, address: ApiAddress = None,
              wait_s: Annotated[float, typer.Option("--wait", help="seconds to wait for it to end")] = 60.0) -> None:
    """Stop a job: its driver gets SIGTERM, marks its MLflow run KILLED and stops its workers."""
    from deepyard import submit as submitting

    jobs = submitting.client(address)
    submitting.require(jobs, job_id)
    jobs.stop_job(job_id)
    err.print(f"job {job_id}: {submitting.wait(jobs, job_id, wait_s)}", highlight=False)


cluster_app = typer.Typer(no_args_is_help=True, help="A multi-node Ray cluster on this machine: up, status, down.")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
@user_errors
def cluster_up(
    workers: Annotated[int, typer.Option(min=0, help="worker nodes besides the head")] = 1,
    cpus_per_node: Annotated[Optional[int], typer.Option(min=1, help="default: this machine's CPUs shared out")] = None,
    head_cpus: Annotated[Optional[int], typer.Option(min=0, help="default: as a worker; 0 keeps training off "
                                                                 "the head")] = None,
    idle_stop: Annotated[Optional[float], typer.Option(min=1, help="seconds: take the cluster down once no job "
                                                                   "or endpoint has used it for this long")] = None,
    json_output: JsonOutput = False,
) -> None:
    """Start a head and N worker nodes on 127.0.0.1; `deepyard submit` and `deepyard run` then use it."""
    from deepyard import local_cluster

    state = local_cluster.up(workers, cpus_per_node, head_cpus, idle_stop_s=idle_stop)
    until = f"after {idle_stop:g} s idle or " if idle_stop else ""
    err.print(f"[green]up[/]: head + {workers} worker node(s), {state['cpus_per_node']} CPUs each; submit to "
              f"{state['address']}; `deepyard run` joins it until {until}`deepyard cluster down`", highlight=False)
    if json_output:
        print(json.dumps(state))


@cluster_app.command("status")
@user_errors
def cluster_status(json_output: JsonOutput = False) -> None:
    """The local cluster's live nodes and resources."""
    from deepyard import local_cluster

    status = local_cluster.status()
    if json_output:
        print(json.dumps(status))
        return
    idle = f"; stops after {status['idle_stop_s']:g} s idle" if status.get("idle_stop_s") else ""
    table = Table("node", "id", "CPU", title=f"{status['address']}: {status['alive_nodes']} live nodes{idle}")
    for node in status["nodes"]:
        table.add_row(node["name"] or "-", node["node_id"][:12], str(node["resources"].get("CPU", 0)))
    out.print(table)
    if host := status.get("job_host"):
        state = "serving `deepyard run`" if host["alive"] and host["listening"] else (
            "starting" if host["alive"] else "gone (jobs run in their own process)")
        out.print(f"job host: pid {host['pid']}, {state}; log {host['log']}", highlight=False)
    if host := status.get("worker_host"):
        state = "forking Ray workers" if host["alive"] and host["listening"] else (
            "starting" if host["alive"] else "gone (Ray starts its workers its own way)")
        out.print(f"worker host: pid {host['pid']}, {state}; log {host['log']}", highlight=False)


@cluster_app.command("down")
@user_errors
def cluster_down(json_output: JsonOutput = False) -> None:
    """Stop every node of the local cluster."""
    from deepyard import local_cluster

    result = local_cluster.down()
    err.print(f"[green]down[/]: {result['stopped_nodes']} node(s) stopped")
    if json_output:
        print(json.dumps(result))
