"""The `deepyard` command: validate, run, models, data.

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
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted sweep")] = False,
) -> None:
    """Run a job: train on Ray, track in MLflow, register the model."""
    from deepyard import progress
    from deepyard.runners import runner
    from deepyard.spec import load_spec

    job = load_spec(spec, set_ or [])
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


@app.command()
@user_errors
def models(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List registered models, their versions, aliases and test metrics."""
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


@app.command()
def data() -> None:
    """List the data sets and model builders a spec can name."""
    from deepyard.data import DATASETS
    from deepyard.models import MODELS
    from deepyard.optim import OPTIMIZERS

    for registry in (DATASETS, MODELS, OPTIMIZERS):
        out.print(f"[bold]{registry.what}s[/]: {', '.join(registry.names())}")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
