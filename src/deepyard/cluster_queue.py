"""A queue on a shared cluster: a submitted job waits PENDING until the cluster has room for its workers.

Ray's job API admits a job once its entrypoint's resources are free. Declaring the workers' CPUs as
the entrypoint's would count them twice (the driver would hold them, and its workers would wait for
more: a cluster of exactly that size deadlocks). So the head node advertises the cluster's quota as
admission tokens (``deepyard_queue_cpu``, ``deepyard_queue_gpu``): a job's driver, which runs on
the head, holds its workers' share of tokens while it runs, and the workers use the real CPUs. The
quota is the cluster's CPUs and GPUs (``deepyard cluster up``), or its largest size when it
autoscales (``cluster/*.yaml``, ``k8s/``), as a Kueue ClusterQueue's nominal quota is. A cluster
whose head carries no tokens has no queue: jobs start at once, as before, and ``submit`` says so.
"""

from __future__ import annotations

from typing import Any

from deepyard.errors import BadInput

TOKENS = {"CPU": "deepyard_queue_cpu", "GPU": "deepyard_queue_gpu"}


def quota_resources(cpus: float, gpus: float = 0) -> dict[str, float]:
    """The tokens the head node advertises (``ray start --head --resources``): the cluster's quota."""
    return {token: amount for token, amount in ((TOKENS["CPU"], cpus), (TOKENS["GPU"], gpus)) if amount}


def capacity(jobs) -> dict[str, float]:
    """The cluster's tokens in all, from the dashboard's cluster status ({} if it has none)."""
    response = jobs._do_request("GET", "/api/cluster_status")  # the SDK's request: address, auth headers
    if response.status_code != 200:
        return {}
    report = response.json().get("data", {}).get("clusterStatus", {}).get("loadMetricsReport", {})
    totals: dict[str, float] = {}
    for resources, count in report.get("nodeTypes") or []:  # (its "usage" camel-cases the names)
        for token in TOKENS.values():
            if token in resources:
                totals[token] = totals.get(token, 0.0) + float(resources[token]) * count
    return totals


def admission(footprint: dict[str, float], capacity: dict[str, float], name: str) -> dict[str, float]:
    """The entrypoint resources a job waits for: its footprint in tokens. A job the whole cluster could
    never admit is refused (it would wait forever)."""
    if not capacity:
        return {}
    wanted = {TOKENS[kind]: amount for kind, amount in footprint.items() if amount > 0}
    for token, amount in wanted.items():
        if amount > capacity.get(token, 0):
            kind = next(k for k, t in TOKENS.items() if t == token)
            raise BadInput(f"{name} needs {amount:g} {kind}s for its workers, and this cluster has "
                           f"{capacity.get(token, 0):g} in all; lower scaling.num_workers (or the runners), "
                           "or add nodes")
    return wanted


def describe(resources: dict[str, Any]) -> str:
    return ", ".join(f"{amount:g} {kind}" for kind, token in TOKENS.items()
                     if (amount := resources.get(token)) is not None) or "nothing"
