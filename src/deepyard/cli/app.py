"""The `deepyard` Typer app and what every command shares: user-facing errors, exit codes, options.

Exit codes: 0 done, 1 the job failed, 2 bad input (spec, flags, missing data), 130 interrupted.
With --json, the last line of stdout is one JSON object; everything else goes to stderr.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from deepyard.errors import EXIT_INTERRUPTED, DeepyardError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative deep-learning jobs on Ray, tracked in MLflow.")
err = Console(stderr=True, soft_wrap=True)  # an error message stays one greppable line
out = Console()

SpecPath = Annotated[Path, typer.Argument(help="a job spec YAML, e.g. jobs/quickstart.yaml")]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", help="override a spec value: --set train.epochs=3 (repeatable; values parse as YAML)")]
Address = Annotated[Optional[str], typer.Option(help="Ray cluster address; default $RAY_ADDRESS")]
JsonOutput = Annotated[bool, typer.Option("--json", help="print one JSON object as the last stdout line")]


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
