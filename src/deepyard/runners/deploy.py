"""`deepyard deploy` and `kind: deploy`: registered models as Ray Serve applications.

Every model reference is checked against the registry before Ray starts (a wrong name or alias
exits with code 2). Each model is its own application under ``/models/<name>``, so one can be
replaced or removed without touching the others; one more application at ``/`` answers the
standard protocols' paths (KServe v1 and v2) for all of them (``serve/gateway.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import signal
import threading
import time
from typing import Any, Callable

from deepyard import tracking
from deepyard.errors import BadInput
from deepyard.runners.summary import RunOptions, RunSummary
from deepyard.serve.options import EndpointOptions, parse_model_ref
from deepyard.spec import DeployJob

# Serve's proxy and replicas log every request by default: at hundreds of requests per second
# that is most of the CPU a laptop has.
LOGGING = {"enable_access_log": False, "log_level": "WARNING"}


def resolve(endpoints: list[EndpointOptions]) -> list[dict[str, Any]]:
    """What each endpoint will serve now: the registry's answer, before anything starts."""
    resolved = []
    for options in endpoints:
        name, alias, version = parse_model_ref(options.model)
        resolved.append({**tracking.model_version(name, alias=alias, version=version), "route": route(options)})
    names = [r["name"] for r in resolved]
    if len(set(names)) != len(names):
        raise BadInput(f"each model can be deployed once per command; got {', '.join(names)}")
    return resolved


def route(options: EndpointOptions) -> str:
    return options.route_prefix or f"/models/{parse_model_ref(options.model)[0]}"


def start(endpoints: list[EndpointOptions], *, host: str, port: int,
          resolved: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Deploy onto the connected Ray cluster (Serve starts on ``host:port`` if it is not running).
    ``resolved``: what ``check`` answered already, if the caller asked before Ray started."""
    from ray import serve

    from deepyard.serve import gateway
    from deepyard.serve.app import build_app

    resolved = resolved or resolve(endpoints)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # deepyard prints what matters itself
    serve.start(http_options={"host": host, "port": port}, logging_config=LOGGING)
    targets = []
    for options, info in zip(endpoints, resolved):
        # replicas read the registry this command read, wherever they run
        options = options.model_copy(update={"tracking_uri": options.tracking_uri or tracking.tracking_uri()})
        targets.append(serve.RunTarget(build_app(options.model_dump()), name=info["name"], route_prefix=info["route"],
                                       logging_config=LOGGING))
        info["url"] = f"http://{_display_host(host)}:{port}{info['route']}"
    if gateway.APP_NAME not in serve.status().applications:  # (the v1/v2 paths of every model; deployed once)
        targets.append(serve.RunTarget(gateway.build_app(), name=gateway.APP_NAME, route_prefix="/",
                                       logging_config=LOGGING))
    serve.run_many(targets)  # one call: the models' replicas start side by side, and it waits for all of them
    return resolved


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def curl_example(info: dict[str, Any], instance: list) -> str:
    token = ' -H "Authorization: Bearer $DEEPYARD_API_TOKEN"' if os.environ.get("DEEPYARD_API_TOKEN") else ""
    body = json.dumps({"instances": [instance]}, separators=(",", ":"))
    return f"curl -s{token} -H 'Content-Type: application/json' -d {shlex.quote(body)} {info['url']}/predict"


def ask(info: dict[str, Any], instance: list) -> dict[str, Any]:
    """One request to a freshly deployed endpoint (the demo's proof that it answers)."""
    import httpx

    from deepyard.serve.client import auth_headers

    response = httpx.post(f"{info['url']}/predict", json={"instances": [instance]}, headers=auth_headers(),
                          timeout=30)
    response.raise_for_status()
    return response.json()


def serve_until_interrupted(endpoints: list[EndpointOptions], *, host: str, port: int, address: str | None,
                            detach: bool, on_ready: Callable[[list[dict[str, Any]]], None],
                            fast_proxy: bool = True) -> list[dict[str, Any]]:
    """Deploy; then, unless ``detach``, serve in the foreground until Ctrl-C and take it all down."""
    from ray import serve

    from deepyard import cluster

    resolved = resolve(endpoints)  # before Ray starts
    if detach and not (address or os.environ.get("RAY_ADDRESS")):
        raise BadInput("--detach leaves the endpoints on a running cluster, but none was given; start one "
                       "(`ray start --head`) and pass --address auto (or RAY_ADDRESS), or drop --detach")
    address = address or os.environ.get("RAY_ADDRESS")
    with cluster.connected(address, local_env=cluster.serve_env() if fast_proxy else None):
        try:
            resolved = start(endpoints, host=host, port=port, resolved=resolved)
            on_ready(resolved)
            if detach:
                return resolved
            _interrupt_on_ctrl_c()
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            # A local cluster goes down with Ray (a full Serve shutdown would wait ~30 s for HAProxy);
            # on a shared cluster, only this command's applications go. Then exit 130, as every
            # command does when stopped.
            if address:
                from ray.serve.exceptions import RayServeException

                try:
                    for info in resolved:
                        serve.delete(info["name"], _blocking=False)
                    _gateway_goes_with_the_last_model(leaving={info["name"] for info in resolved}, blocking=False)
                except RayServeException:  # stopped before Serve itself was up
                    pass
            raise
    return resolved


def _interrupt_on_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt even where the shell started us with SIGINT ignored
    (``make demo &``, some process managers); SIGTERM already does (``cluster.connected``)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def check(spec: DeployJob) -> str:
    """What `deepyard validate` prints: the version each model's reference points at now."""
    return "serving " + ", ".join(f"{r['name']} version {r['version']} at {r['route']}" for r in resolve(spec.models))


def announce(resolved: list[dict[str, Any]], *, console, try_sample: bool, json_output: bool, detach: bool) -> None:
    """The endpoints are up: where each one answers, a curl line that works, and (``try_sample``) a
    real test input's answer."""
    from rich.markup import escape

    from deepyard.tasks import codec

    for info in resolved:
        alias = f"@{info['alias']}" if info["alias"] else ""
        console.print(f"[green]serving[/] {info['name']}{alias} version {info['version']} at {info['url']}/predict")
        metadata = tracking.model_metadata(info["name"], info["version"])
        sample = codec(metadata.get("task")).example(tracking.input_example(info["name"], info["version"])[0],
                                                      metadata)
        console.print("  try: " + escape(curl_example(info, sample)), highlight=False)
        if try_sample:
            answer = ask(info, sample)
            first = answer["predictions"][0]
            shown = (first.get("top_k") or first.get("text") or f"{len(first.get('images', []))} PNG images"
                     if isinstance(first, dict) else first)
            console.print(f"  a real test input -> {escape(json.dumps(shown))} (version {answer['version']})")
    console.print("  docs: " + ", ".join(f"{info['url']}/docs" for info in resolved))
    if json_output:
        print(json.dumps({"endpoints": resolved}, default=str), flush=True)
    if not detach:
        console.print("[dim]serving until Ctrl-C[/]")


def run(spec: DeployJob, options: RunOptions) -> RunSummary:
    """``kind: deploy``: the spec's models, served like ``deepyard deploy`` serves them."""
    from rich.console import Console

    console = options.console or Console(stderr=True, quiet=True)
    ready = functools.partial(announce, console=console, try_sample=False, json_output=options.json_output,
                              detach=spec.detach)
    try:
        resolved = serve_until_interrupted(spec.models, host=spec.http.host, port=spec.http.port,
                                           address=options.address, detach=spec.detach, on_ready=ready,
                                           fast_proxy=spec.fast_proxy)
    except KeyboardInterrupt:
        console.print("[yellow]stopped[/]: the endpoints are down")
        raise
    return RunSummary(run_id=None, experiment=None, notes=[],
                      details={"endpoints": resolved, "detached": spec.detach})


def undeploy(names: list[str], address: str | None) -> list[str]:
    from ray import serve

    from deepyard import cluster

    with cluster.connected(address or "auto"):
        deployed = set(serve.status().applications)
        missing = [n for n in names if n not in deployed]
        if missing:
            raise BadInput(f"not deployed: {', '.join(missing)} (deployed: {', '.join(sorted(deployed)) or 'none'})")
        for name in names:
            serve.delete(name)
        _gateway_goes_with_the_last_model()
    return names


def _gateway_goes_with_the_last_model(leaving: set[str] = frozenset(), blocking: bool = True) -> None:
    """The protocols' paths go once no other application stays (``leaving``: being deleted now)."""
    from ray import serve

    from deepyard.serve import gateway

    if set(serve.status().applications) - set(leaving) == {gateway.APP_NAME}:
        serve.delete(gateway.APP_NAME, _blocking=blocking)


def endpoints(address: str | None) -> list[dict[str, Any]]:
    """What is deployed on the running cluster: application, status, URL, replicas, and what each
    version answered since its replicas started (``serve/metrics.py``; Ray exports every few seconds)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from deepyard import cluster

    from deepyard.serve import metrics

    with cluster.connected(address or "auto"):
        status = serve.status()
        # (the public status has no routes; the controller's details do, as `serve status` shows them)
        details = _get_global_client().get_serve_details()
        traffic = metrics.traffic(metrics.scrape_nodes())
        http = details.get("http_options") or {}
        base = f"http://{_display_host(http.get('host', '127.0.0.1'))}:{http.get('port', 8000)}"
        rows = []
        for name, app in status.applications.items():
            route_prefix = (details.get("applications", {}).get(name) or {}).get("route_prefix")
            replicas = sum(sum(d.replica_states.values()) for d in app.deployments.values())
            rows.append({"name": name, "status": str(getattr(app.status, "value", app.status)),
                         "route": route_prefix, "url": f"{base}{route_prefix or ''}", "replicas": replicas,
                         "traffic": traffic.get(name, {})})  # per version: requests, errors, mean latency
    return rows
