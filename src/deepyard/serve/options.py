"""How a model is served: the options of one endpoint (``deepyard deploy`` flags, ``kind: deploy``
entries and ``serving/*.yaml`` application args are all this model). No Ray import here."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _not_the_gateways(route_prefix: str | None) -> str | None:
    if route_prefix is not None and route_prefix.rstrip("/") == "":
        raise ValueError("/ is where the KServe v1/v2 paths of every model answer (serve/gateway.py); "
                         "give the model a path of its own, such as /models/NAME")
    return route_prefix


class EndpointOptions(BaseModel):
    """How one model is served; ``serving/*.yaml`` passes these as the application's args."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="registered model: NAME, NAME@alias or NAME:version (default alias: champion)")
    route_prefix: Annotated[str | None, AfterValidator(_not_the_gateways)] = Field(
        None, description="default: /models/NAME")
    tracking_uri: str | None = Field(None, description="MLflow; default: MLFLOW_TRACKING_URI or DEEPYARD_HOME's")
    replicas: int | None = Field(1, ge=1, description="fixed replica count (None: autoscale)")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16, gt=0, description="autoscaling: requests in flight per replica")
    max_ongoing_requests: int = Field(128, ge=1, description="per replica; Serve's default of 5 queues at the proxy")
    num_cpus: float = Field(1, gt=0, description="per replica; also its torch threads")
    max_batch_size: int = Field(32, ge=1, description="dynamic batching: requests (of numeric arrays, each of at "
                                                      "most this many instances) that share one forward pass "
                                                      "(1: off)")
    batch_wait_timeout_s: float = Field(0.0005, ge=0, description="dynamic batching: how long a batch waits "
                                                                  "to fill while more requests are in flight (a "
                                                                  "lone request never waits)")
    max_instances: int = Field(1024, ge=1, description="instances per request (more: HTTP 413)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="request body limit (more: HTTP 413)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's whole body must arrive within this (else "
                                                          "HTTP 408): a client that never finishes one holds a slot")
    max_waiting_bodies: int = Field(16, ge=1, description="requests per replica that may wait that long for their "
                                                          "bodies (at most a quarter of max_ongoing_requests); past "
                                                          "it a body must arrive within busy_body_grace_s, so slow "
                                                          "clients cannot fill every slot")
    busy_body_grace_s: float = Field(0.5, gt=0, description="the wait for a body while max_waiting_bodies already "
                                                            "wait: a small body arrives with its headers, but a "
                                                            "large upload over a slow link needs more; raise it "
                                                            "for endpoints that take those")
    follow_alias_s: float = Field(2.0, gt=0, description="how often an alias-following endpoint polls the registry")
    top_k: int = Field(3, ge=1, description="classification: labels in each prediction's top_k")
    max_explain_instances: int = Field(16, ge=1, description="instances per /explain request (more: HTTP 413): "
                                                             "each costs `steps` forward and backward passes")
    explain_timeout_s: float = Field(30.0, gt=0, description="an /explain request's limit, its wait for the "
                                                             "replica's one explanation at a time included "
                                                             "(past it: HTTP 503)")
    # A canary (serve/rollout.py) is rolled back on its own when, over the window, its share of
    # server errors exceeds the stable version's by the margin, or its p99 latency the stable p99
    # times the ratio; judged once it has min_requests answers in the window.
    rollback_window_s: float = Field(60.0, gt=0, description="canary: the window its answers are judged over")
    rollback_min_requests: int = Field(20, ge=1, description="canary: answers in the window before it is judged")
    rollback_error_margin: float = Field(0.05, ge=0, le=1, description="canary: server-error share above the "
                                                                       "stable version's that rolls it back")
    rollback_latency_ratio: float = Field(2.0, ge=1, description="canary: p99 over the stable p99 that rolls it back")


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``name`` | ``name@alias`` | ``name:version`` -> (name, alias, version); the default alias is champion."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if ":" in ref:
        name, version = ref.split(":", 1)
        return name, None, version
    return ref, "champion", None


