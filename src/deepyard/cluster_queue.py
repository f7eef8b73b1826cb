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
# Ray fails a job still PENDING after RAY_JOB_START_TIMEOUT_SECONDS (15 min by default); one queued
# behind a long training run waits longer. The head's environment sets this (a week).
JOB_START_TIMEOUT_S = "604800"


def quota_resources(cpus: float, gpus: float = 0) -> dict[str, float]:
    """The tokens the head node advertises (``ray start --head --resources``): the cluster's quota."""
    return {token: amount for token, amount in ((TOKENS["CPU"], cpus), (TOKENS["GPU"], gpus)) if amount}


def capacity(address: str) -> dict[str, float]:
    """The cluster's tokens in all ({} if its nodes advertise none), from Ray's state API at the
    dashboard ``address`` (the SDK sends the token, as the job client does)."""
    from ray.util.state import list_nodes

    totals: dict[str, float] = {}
    for node in list_nodes(address=address, filters=[("state", "=", "ALIVE")], limit=10000,
                           raise_on_missing_output=False):
        for token in TOKENS.values():
            if token in (node.resources_total or {}):
                totals[token] = totals.get(token, 0.0) + float(node.resources_total[token])
    return totals


def admission(footprint: dict[str, float], capacity: dict[str, float], name: str) -> dict[str, float]:
    """The entrypoint resources a job waits for: its footprint in the tokens the cluster has (a GPU
    job on a cluster with no GPU quota is queued by its CPUs). A job the whole quota could never
    admit is refused: it would wait forever."""
    wanted = {TOKENS[kind]: amount for kind, amount in footprint.items() if amount > 0 and TOKENS[kind] in capacity}
    for kind, token in TOKENS.items():
        if wanted.get(token, 0) > capacity.get(token, 0):
            raise BadInput(f"{name} needs {wanted[token]:g} {kind}s for its workers, and this cluster's queue has "
                           f"{capacity[token]:g} in all; make the job smaller (scaling.num_workers, "
                           "scaling.cpus_per_worker, env_runners.count) or give the cluster more "
                           f"({token} on its head node)")
    return wanted


def describe(resources: dict[str, Any]) -> str:
    return ", ".join(f"{amount:g} {kind}" for kind, token in TOKENS.items()
                     if (amount := resources.get(token)) is not None) or "nothing"
