"""Canary rollouts, kept in the MLflow registry: the alias ``@canary`` names the version on trial, and
the registered model's tag ``deepyard.canary_traffic`` the percent of requests it gets. An endpoint
that follows an alias polls both (``serve/app.py``), so a rollout needs no redeploy and every
replica, on every cluster, follows the same state; each answer says which version gave it.

Replicas watch both versions (``Watch``) and roll a canary back on their own when its share of
server errors, or its p99 latency, is worse than the stable version's by more than the endpoint
allows over its window. Every step is recorded on the canary's version as the tag
``deepyard.rollout``.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from deepyard import tracking
from deepyard.errors import BadInput

CANARY_ALIAS = "canary"
TRAFFIC_TAG = "deepyard.canary_traffic"
ALIAS_TAG = "deepyard.canary_for"  # the alias the endpoints follow: what a promotion moves
RECORD_TAG = "deepyard.rollout"


def state(name: str, uri: str | None = None) -> tuple[str | None, float]:
    """(the canary's version or None, its percent of the traffic)."""
    model = tracking.client(uri).get_registered_model(name)
    version = (model.aliases or {}).get(CANARY_ALIAS)
    if version is None:
        return None, 0.0
    try:
        percent = float((model.tags or {}).get(TRAFFIC_TAG, 0))
    except ValueError:
        percent = 0.0
    return str(version), min(max(percent, 0.0), 100.0)


def _percent(value: float) -> float:
    if not 0 <= value <= 100:
        raise BadInput(f"--traffic {value:g}: a percent from 0 to 100")
    return value


def start(name: str, ref: str, percent: float, alias: str = "champion") -> dict[str, Any]:
    """Put ``ref`` (a version, ``NAME:V`` or ``NAME@alias``) on trial with ``percent`` of the traffic,
    beside what ``alias`` points at (what the endpoints follow)."""
    from deepyard.serve.options import parse_model_ref

    ref_name, ref_alias, version = parse_model_ref(ref if (":" in ref or "@" in ref) else f"{name}:{ref}")
    if ref_name != name:
        raise BadInput(f"--canary {ref}: a version of {name} (VERSION, {name}:VERSION or {name}@alias)")
    found = tracking.model_version(name, alias=ref_alias, version=version)["version"]
    percent = _percent(percent)
    mlflow_client = tracking.client()
    mlflow_client.set_registered_model_tag(name, TRAFFIC_TAG, f"{percent:g}")
    mlflow_client.set_registered_model_tag(name, ALIAS_TAG, alias)
    mlflow_client.set_registered_model_alias(name, CANARY_ALIAS, found)
    _record(name, found, f"canary at {percent:g}%")
    return {"model": name, "canary": found, "traffic": percent}


def set_traffic(name: str, percent: float) -> dict[str, Any]:
    version, _ = _require_canary(name)
    tracking.client().set_registered_model_tag(name, TRAFFIC_TAG, f"{_percent(percent):g}")
    _record(name, version, f"canary at {percent:g}%")
    return {"model": name, "canary": version, "traffic": percent}


def promote(name: str, alias: str | None = None) -> dict[str, Any]:
    """The canary becomes ``@alias`` (default: the alias it was started beside): every request goes to it."""
    version, _ = _require_canary(name)
    mlflow_client = tracking.client()
    alias = alias or (mlflow_client.get_registered_model(name).tags or {}).get(ALIAS_TAG, "champion")
    mlflow_client.set_registered_model_alias(name, alias, version)
    _end_recorded(name, version, f"promoted to @{alias}")
    return {"model": name, "promoted": version, "alias": alias}


def rollback(name: str, reason: str = "rolled back by hand", expected: str | None = None) -> dict[str, Any]:
    """``expected``: only if that version is the canary still (a replica's rollback must not end a newer one)."""
    version, _ = _require_canary(name)
    if expected is not None and version != expected:
        return {"model": name, "rolled_back": None, "reason": f"version {expected} is no longer the canary"}
    _end_recorded(name, version, reason)
    return {"model": name, "rolled_back": version, "reason": reason}


def _require_canary(name: str) -> tuple[str, float]:
    tracking.latest_version(name)  # a clear error for a model that does not exist
    version, percent = state(name)
    if version is None:
        raise BadInput(f"model {name!r} has no canary; start one with `deepyard deploy {name} --canary VERSION "
                       "--traffic PERCENT`")
    return version, percent


def _end_recorded(name: str, version: str, what: str) -> None:
    """The record first, then the end: whoever finds no canary reads why on its version. (An end
    that fails says so there too: the canary is still on.)"""
    _record(name, version, what)
    try:
        _end(name)
    except Exception as error:
        _record(name, version, f"{what}: not done, the canary is still on ({type(error).__name__}: {error})")
        raise


def _end(name: str) -> None:
    mlflow_client = tracking.client()
    mlflow_client.delete_registered_model_alias(name, CANARY_ALIAS)
    mlflow_client.set_registered_model_tag(name, TRAFFIC_TAG, "0")


def _record(name: str, version: str, what: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tracking.client().set_model_version_tag(name, version, RECORD_TAG, f"{stamp} {what}")


class Watch:
    """Each version's answers over the last ``window_s``: (time, server error?, latency)."""

    def __init__(self, window_s: float, min_requests: int, error_margin: float, latency_ratio: float) -> None:
        self.window_s, self.min_requests = window_s, min_requests
        self.error_margin, self.latency_ratio = error_margin, latency_ratio
        self._answers: dict[str, deque] = {}

    def add(self, version: str, status: int, latency_s: float) -> None:
        answers = self._answers.setdefault(version, deque())
        now = time.monotonic()
        answers.append((now, status >= 500, latency_s))
        while answers and answers[0][0] < now - self.window_s:
            answers.popleft()

    def verdict(self, stable: str, canary: str) -> str | None:
        """Why the canary must go (None: it may stay). A p99 needs more answers than an error share
        (five times ``min_requests``): with 20, it was the second slowest, and two slow clients decided."""
        ours, theirs = self._answers.get(canary, ()), self._answers.get(stable, ())
        if len(ours) < self.min_requests:
            return None
        our_errors = sum(error for _, error, _ in ours) / len(ours)
        their_errors = sum(error for _, error, _ in theirs) / len(theirs) if theirs else 0.0
        if our_errors > their_errors + self.error_margin:
            return (f"rolled back automatically: server errors {our_errors:.0%} against {their_errors:.0%} of "
                    f"version {stable} over {self.window_s:g} s")
        if min(len(ours), len(theirs)) >= 5 * self.min_requests:
            ours_p99, theirs_p99 = _p99(ours), _p99(theirs)
            if ours_p99 > self.latency_ratio * theirs_p99:
                return (f"rolled back automatically: p99 {1000 * ours_p99:.1f} ms against {1000 * theirs_p99:.1f} ms "
                        f"of version {stable} over {self.window_s:g} s")
        return None

    def forget(self, version: str) -> None:
        self._answers.pop(version, None)


def _p99(answers) -> float:
    latencies = sorted(latency for _, _, latency in answers)
    return latencies[int(0.99 * (len(latencies) - 1))]
