"""`deepyard deploy`, `undeploy`, `endpoints` and `predict`: registered models over HTTP (Ray Serve)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from deepyard.cli.app import Address, JsonOutput, app, err, out, user_errors
from deepyard.errors import BadInput


@app.command()
@user_errors
def deploy(
    models: Annotated[list[str], typer.Argument(
        help="NAME (its @champion), NAME@alias or NAME:version; several allowed")],
    host: Annotated[str, typer.Option(help="HTTP host; 0.0.0.0 to listen beyond this machine")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    replicas: Annotated[Optional[int], typer.Option(help="fixed replicas per model")] = None,
    min_replicas: Annotated[Optional[int], typer.Option(help="autoscaling lower bound")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="autoscaling upper bound")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(
        min=1, help="dynamic batching: requests that share one forward pass (default 32; 1: off)")] = None,
    address: Address = None,
    detach: Annotated[bool, typer.Option(help="leave the endpoints on the running cluster and return")] = False,
    fast_proxy: Annotated[bool, typer.Option(help="local cluster: Serve's HAProxy high-throughput mode "
                                                  "(--no-fast-proxy: Serve's Python proxy)")] = True,
    try_sample: Annotated[bool, typer.Option(help="send each model one real test input and print its answer")] = False,
    canary: Annotated[Optional[str], typer.Option(
        help="a version to try beside the one served (VERSION or NAME@alias); one model only")] = None,
    traffic: Annotated[float, typer.Option(help="--canary: the percent of requests it gets")] = 10.0,
    json_output: JsonOutput = False,
) -> None:
    """Serve registered models over HTTP (Ray Serve), one application per model under /models/NAME."""
    from deepyard.runners import deploy as deploying
    from deepyard.serve import rollout
    from deepyard.serve.options import EndpointOptions, parse_model_ref

    if canary is not None:
        name, alias, _ = parse_model_ref(models[0])
        if len(models) != 1 or alias is None:
            raise BadInput("--canary: deploy one model that follows an alias (NAME or NAME@alias), so that a "
                           "promotion can move the alias")
        started = rollout.start(name, canary, traffic, alias=alias)
        err.print(f"[green]canary[/] {name} version {started['canary']} at {traffic:g}% of the traffic",
                  highlight=False)
    scaling = ({"replicas": None, "min_replicas": min_replicas or 1, "max_replicas": max_replicas or 4}
               if (min_replicas or max_replicas) and not replicas else {"replicas": replicas or 1})
    batching = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
    endpoints = [EndpointOptions(model=ref, **batching, **scaling) for ref in models]

    ready = functools.partial(deploying.announce, console=err, try_sample=try_sample, json_output=json_output,
                              detach=detach)
    try:
        deploying.serve_until_interrupted(endpoints, host=host, port=port, address=address, detach=detach,
                                          on_ready=ready, fast_proxy=fast_proxy)
    except KeyboardInterrupt:
        err.print("[yellow]stopped[/]: the endpoints are down")
        raise  # exit 130


@app.command(name="rollout")
@user_errors
def rollout_(
    name: Annotated[str, typer.Argument(help="the deployed model with a canary")],
    traffic: Annotated[Optional[float], typer.Option(help="the canary's new percent of the requests")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="the canary becomes --alias: all requests go to it")
                       ] = False,
    rollback: Annotated[bool, typer.Option("--rollback", help="the canary goes: all requests to the stable version")
                        ] = False,
    alias: Annotated[Optional[str], typer.Option(
        help="--promote: the alias to move (default: the one the canary was started beside)")] = None,
    json_output: JsonOutput = False,
) -> None:
    """Move a canary rollout on: its share of the traffic, a promotion, or a rollback. Endpoints
    that follow the model's alias pick it up within seconds (the registry holds the rollout)."""
    from deepyard.serve import rollout

    if sum([traffic is not None, promote, rollback]) != 1:
        raise BadInput("rollout: give one of --traffic PERCENT, --promote or --rollback")
    if promote:
        result = rollout.promote(name, alias)
        err.print(f"[green]promoted[/] {name} version {result['promoted']} to @{result['alias']}", highlight=False)
    elif rollback:
        result = rollout.rollback(name)
        err.print(f"[yellow]rolled back[/] {name} version {result['rolled_back']}", highlight=False)
    else:
        result = rollout.set_traffic(name, traffic)
        err.print(f"[green]canary[/] {name} version {result['canary']} at {traffic:g}% of the traffic",
                  highlight=False)
    if json_output:
        print(json.dumps(result))


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
    table = Table("model", "status", "url", "replicas", "traffic")
    for row in rows:
        traffic = "\n".join(f"v{version}: {t['requests']} requests, {t['client_errors']} 4xx, "
                             f"{t['server_errors']} 5xx, mean {t['mean_ms']} ms"
                             for version, t in sorted(row["traffic"].items()))
        table.add_row(row["name"], row["status"], row["url"], str(row["replicas"]), traffic)
    out.print(table if rows else "nothing deployed: `deepyard deploy NAME`")


@app.command()
@user_errors
def predict(
    name: Annotated[str, typer.Argument(help="deployed model name")],
    input_: Annotated[Path, typer.Option(
        "--input", help='a JSON file ({"instances": [...]} or a list) or a PNG image')],
    url: Annotated[str, typer.Option(help="the Serve HTTP address")] = "http://127.0.0.1:8000",
) -> None:
    """Send inputs to a deployed model and print its answer."""
    from deepyard.serve.client import predict as send

    print(json.dumps(send(name, input_, url), indent=2))
