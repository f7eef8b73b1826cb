"""The paths that standard clients call, in front of every deployed model: one Serve application at
``/`` (each model's own application keeps ``/models/<name>``, the longer prefix, which Serve
matches first). It answers server-level calls itself and hands model calls to the model's
deployment through a handle:

    Open Inference Protocol (KServe v2, Triton's HTTP API; ``serve/v2.py``)
    GET  /v2, /v2/health/live, /v2/health/ready
    GET  /v2/models/<name>[/versions/<v>], .../ready
    POST /v2/models/<name>[/versions/<v>]/infer
    KServe v1
    GET  /v1/models/<name>
    POST /v1/models/<name>:predict
    POST /v1/models/<name>:explain

Each model stays its own application (replaced or removed alone); this one needs no redeploy
when models come and go: it finds them by name when asked.
"""

# No `from __future__ import annotations`: FastAPI must see the handlers' real types (serve/app.py).
import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from deepyard.serve import v2
from deepyard.serve.app import EXPLAIN_BODY, PREDICT_BODY, reply
from deepyard.serve.options import EndpointOptions

APP_NAME = "deepyard-protocols"
MODEL_DEPLOYMENT = "ModelEndpoint"
app = FastAPI(title="deepyard protocols", description="KServe v1 and v2 (Open Inference Protocol) paths "
                                                      "for every model deployed by deepyard.")
LIMITS = EndpointOptions(model="-")  # the body limits of a model endpoint's defaults


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _token(request: Request) -> str | None:
    return request.headers.get("authorization")


def _no_model(name: str) -> JSONResponse:
    return _error(404, f"no model {name!r} is deployed here (`deepyard endpoints` lists them)")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256,
                  graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class Protocols:
    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def _model(self, name: str):
        """The deployed model's handle; None if no deepyard model of that name is deployed."""
        if name not in self._handles:
            status = serve.status().applications.get(name)
            if status is None or MODEL_DEPLOYMENT not in status.deployments:
                return None
            self._handles[name] = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=name)
        return self._handles[name]

    async def hand_over(self, name: str, method: str, *args: Any) -> Response:
        """The model's answer to ``method(*args)``, through its deployment's handle."""
        handle = await asyncio.to_thread(self._model, name) if name not in self._handles else self._handles[name]
        if handle is None:
            return _no_model(name)
        try:
            return reply(await getattr(handle, method).remote(*args))
        except Exception as error:  # undeployed since it was looked up: forget it, and say so
            if name not in (await asyncio.to_thread(serve.status)).applications:
                self._handles.pop(name, None)
                return _no_model(name)
            return _error(503, f"model {name!r} could not answer ({type(error).__name__}); try again")

    async def _body(self, request: Request) -> bytes | Response:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > LIMITS.max_body_bytes:
            return _error(413, f"request body of {declared} bytes is over the limit of {LIMITS.max_body_bytes}")
        try:
            return await asyncio.wait_for(request.body(), LIMITS.body_timeout_s)
        except asyncio.TimeoutError:
            return _error(408, f"the request body did not arrive within {LIMITS.body_timeout_s:g} s; send it whole")

    # Open Inference Protocol: the server

    @app.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        import deepyard

        return {"name": "deepyard", "version": deepyard.__version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(self) -> JSONResponse:
        """Ready when every deployed application is RUNNING (a model still loading is not)."""
        applications = (await asyncio.to_thread(serve.status)).applications
        waiting = sorted(name for name, status in applications.items()
                         if str(getattr(status.status, "value", status.status)) != "RUNNING")
        return JSONResponse({"ready": not waiting, **({"waiting_for": waiting} if waiting else {})},
                            status_code=503 if waiting else 200)

    # Open Inference Protocol: a model (the /versions/<v> forms answer 404 for another version).
    # The model's replicas check the bearer token (their own, however it changed since this
    # application was deployed): the header is handed over with the call.

    @app.get("/v2/models/{name}")
    async def v2_metadata(self, name: str, request: Request) -> Response:
        return await self.hand_over(name, "v2_metadata", None, _token(request))

    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_version_metadata(self, name: str, version: str, request: Request) -> Response:
        return await self.hand_over(name, "v2_metadata", version, _token(request))

    @app.get("/v2/models/{name}/ready")
    async def v2_ready(self, name: str) -> Response:
        return await self.hand_over(name, "v2_ready", None)

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_version_ready(self, name: str, version: str) -> Response:
        return await self.hand_over(name, "v2_ready", version)

    @app.post("/v2/models/{name}/infer", openapi_extra=v2.OPENAPI_BODY)
    async def v2_infer(self, name: str, request: Request) -> Response:
        return await self._infer(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=v2.OPENAPI_BODY)
    async def v2_version_infer(self, name: str, version: str, request: Request) -> Response:
        return await self._infer(name, version, request)

    async def _infer(self, name: str, version: str | None, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        return await self.hand_over(name, "v2_infer", body, request.headers.get(v2.HEADER_LENGTH), version,
                                    _token(request))

    # KServe v1

    @app.get("/v1/models/{name}")
    async def v1_status(self, name: str) -> Response:
        answer = await self.hand_over(name, "v2_ready", None)
        if answer.status_code != 200:
            return answer
        return JSONResponse({"name": name, "ready": True})

    @app.post("/v1/models/{name}:predict", openapi_extra=PREDICT_BODY)
    async def v1_predict(self, name: str, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        return await self.hand_over(name, "v1_predict", body, _token(request))

    @app.post("/v1/models/{name}:explain", openapi_extra=EXPLAIN_BODY)
    async def v1_explain(self, name: str, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        return await self.hand_over(name, "v1_explain", body, _token(request))

    # HAProxy sends /v2/models/<name>/... to /models/<name>/v2/... (serve/haproxy.py). What reaches
    # this application that way is a model deployed under another route_prefix, or none.
    @app.api_route("/models/{name}/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def rewritten(self, name: str, rest: str, request: Request) -> Response:
        if rest == "v1:predict":
            return await self.v1_predict(name, request)
        if rest == "v1:explain":
            return await self.v1_explain(name, request)
        if rest == "v1":
            return await self.v1_status(name)
        parts = rest.split("/")
        version = parts[2] if parts[:2] == ["v2", "versions"] and len(parts) >= 3 else None
        action = parts[3:] if version is not None else parts[1:]
        if parts[0] != "v2" or len(action) > 1:
            return _no_model(name)
        if action == ["infer"] and request.method == "POST":
            return await self._infer(name, version, request)
        if action == ["ready"]:
            return await self.hand_over(name, "v2_ready", version)
        if not action:
            return await self.hand_over(name, "v2_metadata", version, _token(request))
        return _no_model(name)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """``import_path: deepyard.serve.gateway:build_app`` in a Serve config (``route_prefix: /``)."""
    return Protocols.bind()
