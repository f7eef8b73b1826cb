"""`deepyard models`: registered models, their versions and aliases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from deepyard.cli.app import JsonOutput, app, err, out, user_errors

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


@app.command()
@user_errors
def explain(
    ref: Annotated[str, typer.Argument(help="NAME@alias (default @champion) or NAME:version")],
    input_: Annotated[Path, typer.Option(
        "--input", help='a JSON file ({"instances": [...]} or a list) or a PNG image, as `deepyard predict` takes')],
    method: Annotated[str, typer.Option(help="integrated_gradients | saliency | gradient_shap")] = (
        "integrated_gradients"),
    steps: Annotated[int, typer.Option(help="integrated gradients' path points; gradient SHAP's samples")] = 50,
    baseline: Annotated[str, typer.Option(help="auto | zeros | mean | unk (text)")] = "auto",
    target: Annotated[Optional[str], typer.Option(
        help="class name or index (default: the predicted one); a forecast's step")] = None,
    top: Annotated[int, typer.Option(help="the most-attributed inputs shown per instance")] = 5,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="where the pictures go")] = Path("explanations"),
    json_output: JsonOutput = False,
) -> None:
    """Why a registered model answers what it does: attributions of each input (Captum), printed,
    and drawn as pictures (heatmaps, or bars per feature, time step or token)."""
    import pydantic

    from deepyard.errors import BadInput
    from deepyard.explain.local import explain_version
    from deepyard.explain.options import ExplainOptions
    from deepyard.serve.options import parse_model_ref
    from deepyard.tracking import model_version

    try:
        options = ExplainOptions(method=method, steps=steps, baseline=baseline, top_attributions=top, target=target)
    except pydantic.ValidationError as error:
        raise BadInput("; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())) from None
    name, alias, version = parse_model_ref(ref)
    version = model_version(name, alias=alias, version=version)["version"]
    result = explain_version(name, version, input_, options, out_dir)
    if json_output:
        print(json.dumps(result))
        return
    for index, explanation in enumerate(result["explanations"]):
        table = Table(title=f"{name}:{version} instance {index}: target {explanation['target']}, "
                            f"output {explanation['output']:.4g} (baseline {explanation['baseline_output']:.4g})")
        table.add_column("input")
        table.add_column("value")
        table.add_column("attribution", justify="right")
        for entry in explanation["top"]:
            where = next(entry[key] for key in ("feature", "token", "step", "pixel") if key in entry)
            table.add_row(str(where), str(entry.get("value", "")), f"{entry['attribution']:+.4g}")
        out.print(table)
    for picture in result["pictures"]:
        err.print(f"wrote {picture}")
