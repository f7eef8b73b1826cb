"""`kind: deploy`: registered models served over HTTP by Ray Serve (`runners/deploy.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from deepyard.serve.options import EndpointOptions
from deepyard.spec.kinds import job_kind
from deepyard.spec.sections import JobBase, Section


class HttpSpec(Section):
    host: str = Field("127.0.0.1", description="0.0.0.0 listens beyond this machine")
    port: int = Field(8000, ge=1, le=65535)


@job_kind(runner="deepyard.runners.deploy")
class DeployJob(JobBase):
    """Registered models served over HTTP by Ray Serve, one application per model (`deepyard deploy`)."""

    kind: Literal["deploy"]
    models: list[EndpointOptions] = Field(
        min_length=1, description="one entry per model: model: NAME[@alias|:version], replicas, batching, limits...")
    http: HttpSpec = Field(default_factory=HttpSpec)
    detach: bool = Field(False, description="leave the endpoints on the running cluster (needs --address)")
    fast_proxy: bool = Field(True, description="local cluster: Serve's HAProxy high-throughput mode")
