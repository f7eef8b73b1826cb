"""The `deepyard` command: validate, run, models, deploy, undeploy, endpoints, predict, rl, data;
submit, jobs and cluster (``cli_cluster.py``).

Exit codes: 0 done, 1 the job failed, 2 bad input (spec, flags, missing data), 130 interrupted.
With --json, the last line of stdout is one JSON object; everything else goes to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deepyard.errors import EXIT_INTERRUPTED, DeepyardError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative deep-learning jobs on Ray, tracked in MLflow.")
err = Console(stderr=True, soft_wrap=True)  # an error message stays one greppable line
out = Console()

SpecPath = Annotated[Path, typer.Argument(help="a job spec YAML, e.g. jobs/quickstart.yaml")]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", help="override a spec value: --set train.epochs=3 (repeatable; values parse as YAML)")]


def _quiet_libraries() -> None:
    """MLflow's INFO lines (database set-up, "Created version") repeat what deepyard prints itself."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is (lazily) imported


def user_errors(command):
    """A DeepyardError becomes its message and exit code; Ctrl-C exits 130. No tracebacks for users."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return command(*args, **kwargs)
        except DeepyardError as error:
            err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


@app.command()
@user_errors
def validate(spec: SpecPath, set_: Overrides = None) -> None:
    """Check a spec (and that its data loads and fits the model) without starting anything."""
    from deepyard.runners import sweep
    from deepyard.runners.setup import preflight
    from deepyard.spec import load_spec

    job = load_spec(spec, set_ or [])
    if job.kind == "deploy":
        from deepyard.runners import deploy as deploying

        served = ", ".join(f"{r['name']} version {r['version']} at {r['route']}" for r in deploying.check(job.models))
        err.print(f"[green]ok[/] {spec}: kind=deploy name={job.name}: {served}")
        return
    if job.kind == "rl" or (job.kind == "sweep" and job.base.kind == "rl"):
        from deepyard.rl import algorithms
        from deepyard.runners import rl_trials

        agent = job.base if job.kind == "sweep" else job
        observations, actions = algorithms.check(agent)
        ranked = f" ranked by {rl_trials.check(job)[0]}" if job.kind == "sweep" else ""
        err.print(f"[green]ok[/] {spec}: kind={job.kind} name={job.name} algorithm={agent.algorithm} env={agent.env.id} "
                  f"(observations {observations.shape}, actions {actions}){ranked}")
        return
    train = job.base if job.kind == "sweep" else job
    splits = sweep.check(job)[0] if job.kind == "sweep" else preflight(job)[0]
    err.print(f"[green]ok[/] {spec}: kind={job.kind} name={job.name} data={train.data.name} "
              f"({len(splits.x_train)} train / {len(splits.x_val)} val / {len(splits.x_test)} test, "
              f"input {splits.in_shape}) model={train.model.name}")


@app.command()
@user_errors
def run(
    spec: SpecPath,
    set_: Overrides = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default $RAY_ADDRESS, else a local cluster")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object as the last stdout line")] = False,
    ray_logs: Annotated[bool, typer.Option("--ray-logs", help="stream Ray's worker logs to the terminal")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted sweep or rl job from its checkpoint")] = False,
) -> None:
    """Run a job: train on Ray, track in MLflow, register the model."""
    from deepyard import progress
    from deepyard.runners import runner
    from deepyard.spec import load_spec

    job = load_spec(spec, set_ or [])
    if job.kind == "deploy":
        ready = functools.partial(_print_endpoints, try_sample=False, json_output=json_output, detach=job.detach)
        runner("deploy")(job, address=address, ray_logs=ray_logs, resume=resume, on_ready=ready)
        if not job.detach:
            err.print("[yellow]stopped[/]: the endpoints are down")
        return
    watcher = progress.watch_sweep if job.kind == "sweep" else progress.watch
    summary = runner(job.kind)(job, address=address, ray_logs=ray_logs, resume=resume,
                              watch=functools.partial(watcher, console=err))
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items())
    err.print(f"[green]done[/] {job.name}: {metrics}")
    err.print(f"  run {summary['run_id']} in experiment {summary['experiment']!r}")
    if "best_config" in summary:
        err.print(f"  best trial {summary['best_trial_run_id']}: {json.dumps(summary['best_config'])} "
                  f"({summary['trials_finished']} of {summary['trials']} trials finished, "
                  f"{summary['trials_stopped_early']} stopped early)")
    if summary.get("model_version"):
        err.print(f"  registered {summary['model_name']} version {summary['model_version']}")
    if promotion := summary.get("promotion"):
        verdict = "moved to" if promotion["moved"] else "not moved to"
        err.print(f"  alias {promotion['alias']!r} {verdict} version {promotion['version']}: {promotion['reason']}")
    err.print("  browse runs: mlflow ui --backend-store-uri " + _tracking_uri())
    if json_output:
        print(json.dumps(summary, default=str))


def _tracking_uri() -> str:
    from deepyard.tracking import tracking_uri

    return tracking_uri()


models_app = typer.Typer(no_args_is_help=False, help="Registered models: list them, move an alias.")
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
@user_errors
def models(ctx: typer.Context, json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List registered models, their versions, aliases and test metrics."""
    if ctx.invoked_subcommand:
        return
    from deepyard.tracking import registered_models

    found = registered_models()
    if json_output:
        print(json.dumps(found))
        return
    table = Table("model", "version", "aliases", "test metrics", "run")
    for model in found:
        for version in model["versions"]:
            metrics = " ".join(f"{k}={v}" for k, v in sorted(version["metrics"].items()))
            table.add_row(model["name"], version["version"], ",".join(version["aliases"]), metrics,
                          version["run_id"] or "")
    out.print(table if found else "no registered models yet: run a job with `deepyard run SPEC`")


@models_app.command()
@user_errors
def show(ref: Annotated[str, typer.Argument(help="NAME@alias (default @champion) or NAME:version")]) -> None:
    """The version a reference points at, with its test metrics (exit 2 if there is none)."""
    from deepyard.serve.options import parse_model_ref
    from deepyard.tracking import model_version

    name, alias, version = parse_model_ref(ref)
    print(json.dumps(model_version(name, alias=alias, version=version)))


@models_app.command()
@user_errors
def promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="the version the alias should point at")],
    alias: Annotated[str, typer.Option(help="the alias to move")] = "champion",
) -> None:
    """Point an alias at a version. Endpoints that follow the alias switch to it within seconds."""
    from deepyard.tracking import set_alias

    set_alias(name, alias, version)
    err.print(f"[green]{name}@{alias}[/] -> version {version}; deployed endpoints following @{alias} "
              "switch to it without dropping requests")


def _print_endpoints(resolved: list[dict], *, try_sample: bool, json_output: bool, detach: bool) -> None:
    from deepyard import tracking
    from deepyard.runners import deploy as deploying
    from deepyard.serve.payloads import request_instance

    for info in resolved:
        alias = f"@{info['alias']}" if info["alias"] else ""
        err.print(f"[green]serving[/] {info['name']}{alias} version {info['version']} at {info['url']}/predict")
        sample = request_instance(tracking.input_example(info["name"], info["version"])[0],
                                  tracking.model_metadata(info["name"], info["version"]))
        err.print("  try: " + escape(deploying.curl_example(info, sample)), highlight=False)
        if try_sample:
            answer = deploying.ask(info, sample)
            first = answer["predictions"][0]
            shown = (first.get("top_k") or first.get("text") or f"{len(first.get('images', []))} PNG images"
                     if isinstance(first, dict) else first)
            err.print(f"  a real test input -> {escape(json.dumps(shown))} (version {answer['version']})")
    err.print("  docs: " + ", ".join(f"{info['url']}/docs" for info in resolved))
    if json_output:
        print(json.dumps({"endpoints": resolved}, default=str), flush=True)
    if not detach:
        err.print("[dim]serving until Ctrl-C[/]")


Address = Annotated[Optional[str], typer.Option(help="Ray cluster address; default $RAY_ADDRESS")]


@app.command()
@user_errors
def deploy(
    models: Annotated[list[str], typer.Argument(help="NAME (its @champion), NAME@alias or NAME:version; several allowed")],
    host: Annotated[str, typer.Option(help="HTTP host; 0.0.0.0 to listen beyond this machine")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    replicas: Annotated[Optional[int], typer.Option(help="fixed replicas per model")] = None,
    min_replicas: Annotated[Optional[int], typer.Option(help="autoscaling lower bound")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="autoscaling upper bound")] = None,
    max_batch_size: Annotated[int, typer.Option(help="dynamic batching across requests (1: off)")] = 1,
    address: Address = None,
    detach: Annotated[bool, typer.Option(help="leave the endpoints on the running cluster and return")] = False,
    fast_proxy: Annotated[bool, typer.Option(help="local cluster: Serve's HAProxy high-throughput mode "
                                                  "(--no-fast-proxy: Serve's Python proxy)")] = True,
    try_sample: Annotated[bool, typer.Option(help="send each model one real test input and print its answer")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object as the last stdout line")] = False,
) -> None:
    """Serve registered models over HTTP (Ray Serve), one application per model under /models/NAME."""
    from deepyard.runners import deploy as deploying
    from deepyard.serve.options import EndpointOptions

    scaling = ({"replicas": None, "min_replicas": min_replicas or 1, "max_replicas": max_replicas or 4}
               if (min_replicas or max_replicas) and not replicas else {"replicas": replicas or 1})
    endpoints = [EndpointOptions(model=ref, max_batch_size=max_batch_size, **scaling) for ref in models]

    ready = functools.partial(_print_endpoints, try_sample=try_sample, json_output=json_output, detach=detach)
    deploying.serve_until_interrupted(endpoints, host=host, port=port, address=address, detach=detach,
                                      on_ready=ready, fast_proxy=fast_proxy)
    if not detach:
        err.print("[yellow]stopped[/]: the endpoints are down")


@app.command()
@user_errors
def undeploy(names: Annotated[list[str], typer.Argument(help="model names to take down")],
             address: Address = None) -> None:
    """Remove deployed models from the running cluster."""
    from deepyard.runners import deploy as deploying

    for name in deploying.undeploy(names, address):
        err.print(f"[green]removed[/] {name}")


@app.command()
@user_errors
def endpoints(address: Address = None,
              json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What is deployed on the running cluster."""
    from deepyard.runners import deploy as deploying

    rows = deploying.endpoints(address)
    if json_output:
        print(json.dumps(rows))
        return
    table = Table("model", "status", "url", "replicas")
    for row in rows:
        table.add_row(row["name"], row["status"], row["url"], str(row["replicas"]))
    out.print(table if rows else "nothing deployed: `deepyard deploy NAME`")


@app.command()
@user_errors
def predict(
    name: Annotated[str, typer.Argument(help="deployed model name")],
    input_: Annotated[Path, typer.Option("--input", help='a JSON file ({"instances": [...]} or a list) or a PNG image')],
    url: Annotated[str, typer.Option(help="the Serve HTTP address")] = "http://127.0.0.1:8000",
) -> None:
    """Send inputs to a deployed model and print its answer."""
    from deepyard.serve.client import predict as send

    print(json.dumps(send(name, input_, url), indent=2))


rl_app = typer.Typer(no_args_is_help=True, help="Reinforcement-learning policies: evaluate a registered one.")
app.add_typer(rl_app, name="rl")


@rl_app.command("eval")
@user_errors
def rl_eval(
    model: Annotated[str, typer.Argument(help="registered policy: NAME (newest version), NAME:VERSION or NAME@ALIAS")],
    episodes: Annotated[int, typer.Option(min=1, help="greedy episodes to play")] = 10,
    render: Annotated[Optional[Path], typer.Option(help="write the first episode as a GIF here")] = None,
    seed: Annotated[int, typer.Option(help="seeds the episodes' resets")] = 0,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Play a registered policy in its environment; print the mean and std of the returns."""
    from deepyard.rl.evaluate import evaluate

    result = evaluate(model, episodes=episodes, seed=seed, render=render)
    err.print(f"{result['model']} version {result['version']} on {result['env_id']}: mean return "
              f"{result['mean_return']:.2f} ± {result['std_return']:.2f} over {episodes} episodes"
              + (f"; GIF: {render}" if render else ""))
    if json_output:
        print(json.dumps(result))


@app.command()
def data() -> None:
    """List the data sets and model builders a spec can name."""
    from deepyard.data import DATASETS
    from deepyard.models import MODELS
    from deepyard.optim import OPTIMIZERS

    for registry in (DATASETS, MODELS, OPTIMIZERS):
        out.print(f"[bold]{registry.what}s[/]: {', '.join(registry.names())}")


# submit, jobs and cluster: registered on `app` when imported (after everything they use from here)
from deepyard import cli_cluster  # noqa: E402,F401


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":  # `python -m deepyard.cli`: run the imported module, where every command is registered
    from deepyard.cli import main as registered_main

    registered_main()
