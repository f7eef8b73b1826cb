"""`deepyard models`: registered models, their versions and aliases."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from deepyard.cli.app import app, err, out, user_errors

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
