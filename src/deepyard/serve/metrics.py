"""What each model's endpoint answered, per version: requests by route and status, and latency.

Replicas record them as Ray metrics (``ray.serve.metrics``, which adds the application, deployment
and replica), so they appear in Prometheus text on every node's metrics port beside Serve's own
(``k8s/`` has the scrape annotations), summed over replicas by whoever scrapes. ``deepyard
endpoints`` scrapes the nodes itself (``traffic``). Ray exports them every few seconds.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

REQUESTS = "deepyard_requests"
LATENCY = "deepyard_request_latency_ms"
BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


class EndpointMetrics:
    def __init__(self, model: str) -> None:
        from ray.serve import metrics

        self.model = model
        self._requests = metrics.Counter(REQUESTS, description="requests a deepyard model answered",
                                         tag_keys=("model", "version", "route", "status"))
        self._latency = metrics.Histogram(LATENCY, description="time to answer, once the request reached the replica",
                                          boundaries=BOUNDARIES_MS, tag_keys=("model", "version", "route"))

    def record(self, route: str, version: str, status: int, started: float) -> None:
        tags = {"model": self.model, "version": version, "route": route}
        self._requests.inc(tags={**tags, "status": str(status)})
        self._latency.observe(1000 * (time.perf_counter() - started), tags=tags)


def traffic(pages: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Prometheus pages (one per node) -> {model: {version: {requests, client_errors, server_errors,
    mean_ms}}}, summed over replicas and routes."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict = defaultdict(lambda: {"requests": 0, "client_errors": 0, "server_errors": 0,
                                        "_latency_sum": 0.0, "_latency_count": 0})
    for page in pages:
        for family in text_string_to_metric_families(page):
            if family.name.removesuffix("_total").endswith(REQUESTS):
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        row = counts[sample.labels["model"], sample.labels["version"]]
                        status, value = int(sample.labels["status"]), int(sample.value)
                        row["requests"] += value
                        if 400 <= status < 500:
                            row["client_errors"] += value
                        elif status >= 500:
                            row["server_errors"] += value
            elif family.name.endswith(LATENCY):
                for sample in family.samples:
                    row = counts[sample.labels["model"], sample.labels["version"]]
                    if sample.name.endswith("_sum"):
                        row["_latency_sum"] += sample.value
                    elif sample.name.endswith("_count"):
                        row["_latency_count"] += int(sample.value)
    result: dict = defaultdict(dict)
    for (model, version), row in counts.items():
        count = row.pop("_latency_count")
        total = row.pop("_latency_sum")
        result[model][version] = {**row, "mean_ms": round(total / count, 2) if count else None}
    return dict(result)


def scrape_nodes(timeout_s: float = 5.0) -> list[str]:
    """Each alive node's metrics page (Ray's metrics agent); nodes that do not answer are skipped."""
    import httpx
    import ray

    pages = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        try:
            pages.append(httpx.get(f"http://{node['NodeManagerAddress']}:{port}/metrics", timeout=timeout_s).text)
        except httpx.HTTPError:
            continue
    return pages
