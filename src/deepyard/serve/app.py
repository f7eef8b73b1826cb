"""A registered model as a Ray Serve application: a typed FastAPI app under ``/models/<name>``.

    POST /models/<name>/predict   {"instances": [...]} -> {"predictions": [...], "model", "version"}
    POST /models/<name>/explain   the same, and how to explain it -> and {"explanations": [...]}
    GET  /models/<name>/          metadata: task, input shape, version, alias, test metrics
    GET  /models/<name>/healthz   200 once the model is loaded
    GET  /models/<name>/docs      OpenAPI docs (FastAPI)

Each replica loads its model once from the MLflow registry. An endpoint that follows an alias
(``name@champion``) polls the registry and swaps in the new version when the alias moves: the
swap is one reference assignment, so requests in flight finish on the version they started on and
none fail. ``build_app`` is the typed builder that ``serving/*.yaml`` (``serve deploy``, KubeRay's
RayService) imports.
"""

# No `from __future__ import annotations` here: FastAPI must see the real types of the handlers
# that Serve's ingress rebinds, or `request: Request` turns into a query parameter.
import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from deepyard.explain.options import ExplainOptions
from deepyard.serve.options import EndpointOptions, parse_model_ref
from deepyard.serve import rollout, v2
from deepyard.serve.explaining import Explanations
from deepyard.serve.metrics import EndpointMetrics
from deepyard.serve.payloads import BadRequest, parse_json, table_columns
from deepyard.tasks import Codec, codec

TOKEN_ENV = "DEEPYARD_API_TOKEN"
TOKEN_DIGEST_ENV = "DEEPYARD_API_TOKEN_DIGEST"
logger = logging.getLogger("deepyard.serve")


class PredictRequest(BaseModel):
    instances: list[Any] = Field(description="raw inputs in the data set's own units, each in the model's "
                                             "input shape (or flat); image models also take base64 PNG strings; "
                                             "text models take strings; language models take prompts")
    top_k: int | None = Field(None, ge=1, description="classification: how many labels in each top_k")


# The documented body of the routes that parse their own (size limit first, then messages that help)
PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": PredictRequest.model_json_schema()}}}}


class PredictResponse(BaseModel):
    predictions: list[Any]
    model: str
    version: str


class ExplainRequest(ExplainOptions, PredictRequest):
    """The predict body, and how to explain it."""


EXPLAIN_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": ExplainRequest.model_json_schema()}}}}


class ExplainResponse(PredictResponse):
    explanations: list[Any] = Field(description="per instance: the target explained, its attributions in the "
                                                "input's shape (or per feature, step or token), the most-"
                                                "attributed inputs (top), and the output at the input and at "
                                                "the baseline")


Answer = tuple[int, bytes, dict[str, str]]  # status, body, headers
VERSION_HEADER = "x-deepyard-version"  # which version answered (a canary, or the stable one)


class ModelFailed(Exception):
    """The model itself failed on a valid request (HTTP 500): counted against its version."""

    status = 500

    def __init__(self, version: str, error: BaseException):
        super().__init__(f"version {version} failed: {type(error).__name__}: {str(error)[:300]}")
        self.version = version


def _json(status: int, body: dict[str, Any]) -> Answer:
    return status, json.dumps(body).encode(), {"content-type": "application/json"}


def reply(answer: Answer) -> Response:
    status, content, headers = answer
    return Response(content=content, status_code=status, headers=headers)


@dataclass
class Loaded:
    module: Any
    version: str
    metadata: dict[str, Any]
    metrics: dict[str, float]
    codec: Codec  # the task's: what a request holds and how the outputs read


app = FastAPI(title="deepyard model endpoint",
              description="A registered deepyard model served by Ray Serve (KServe v1 style predict).")


class PredictFirst:
    """ASGI middleware: the prediction routes straight to their handlers, past FastAPI's routing and
    dependency resolution, which cost ~20% of a replica's CPU per request (profiled under load);
    every other request, and the OpenAPI docs of these, as before. Errors still end as 500s in
    Starlette's ServerErrorMiddleware, which wraps this."""

    # This process's ModelEndpoint (a Serve replica is a process of its own). A class attribute:
    # Serve ships the deployment class by value, with globals of its own, but this class by name.
    replica: Any = None
    HANDLERS = {"/predict": "predict", "/v1:predict": "v1_predict_here", "/v2/infer": "v2_infer_here"}  # (the routes')

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.replica is not None:
            path, root = scope["path"], scope.get("root_path", "")
            handler = self.HANDLERS.get(path[len(root):] if root and path.startswith(root) else path)
            if handler is not None:
                response = await getattr(self.replica, handler)(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


app.add_middleware(PredictFirst)


def _takes_numbers(loaded: Loaded) -> bool:
    """Its instances are arrays of numbers (not text, PNG strings only, or objects: a table's rows
    come to the v2 paths as BYTES elements, each a JSON object of the columns)."""
    return loaded.codec.batchable and not loaded.metadata.get("vocab") and not loaded.metadata.get("table")


def token_digest(token: str, salt: str | None = None) -> str:
    """``salt$sha256(salt + token)``: what replicas check a bearer token against. The token itself
    never reaches them: passed in their runtime environment, it was written in clear to Ray's
    world-readable runtime_env_agent.log, which outlives the deployment."""
    salt = salt if salt is not None else secrets.token_hex(16)
    return f"{salt}${hashlib.sha256((salt + token).encode()).hexdigest()}"


def _expected_digest() -> str | None:
    """This replica's: the deployer's digest, or a token set in the replica's own environment (a
    Kubernetes secret on the pod)."""
    if digest := os.environ.get(TOKEN_DIGEST_ENV):
        return digest
    token = os.environ.get(TOKEN_ENV)
    return token_digest(token, salt="") if token else None


TOKEN_REFUSED = "missing or wrong bearer token (header: Authorization: Bearer $DEEPYARD_API_TOKEN)"


def _token_accepted(authorization: str | None) -> bool:
    expected = _expected_digest()
    if not expected:
        return True
    scheme, _, given = (authorization or "").strip().partition(" ")
    salt = expected.split("$", 1)[0]
    # The scheme is case-insensitive (RFC 9110, 11.1): "bearer" is "Bearer".
    return scheme.lower() == "bearer" and hmac.compare_digest(token_digest(given.strip(), salt), expected)


async def _authorized(request: Request) -> None:  # async: a sync dependency costs a thread hop per request
    if not _token_accepted(request.headers.get("authorization")):
        raise HTTPException(401, TOKEN_REFUSED, headers={"WWW-Authenticate": "Bearer"})


def _refused() -> Answer:
    status, content, headers = _json(401, {"error": TOKEN_REFUSED})
    return status, content, {**headers, "WWW-Authenticate": "Bearer"}


# A replaced replica gets 5 s for requests in flight (ms each), not Serve's 20 s: behind HAProxy,
# idle keep-alive connections otherwise hold every redeploy for the full timeout.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128,
                  graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class ModelEndpoint:
    def __init__(self, options: dict[str, Any]):
        import torch

        from deepyard import tracking

        self.options = EndpointOptions.model_validate(options)
        self.name, self.alias, pinned = parse_model_ref(self.options.model)
        self.uri = self.options.tracking_uri or tracking.tracking_uri()
        torch.set_num_threads(max(1, int(self.options.num_cpus)))  # small models: threads cost more than they give
        version = pinned or tracking.model_version(self.name, alias=self.alias, uri=self.uri)["version"]
        self.current = self._load(version)
        PredictFirst.replica = self
        self.metrics = EndpointMetrics(self.name)
        self.explaining = Explanations(self.name, self.uri, self.options)
        # A canary (serve/rollout.py): only for an endpoint that follows an alias
        self.canary: Loaded | None = None
        self.canary_share = 0.0
        self._rolled_back: str | None = None  # the version this replica rolled back, until the registry agrees
        self.watch = rollout.Watch(self.options.rollback_window_s, self.options.rollback_min_requests,
                                   self.options.rollback_error_margin, self.options.rollback_latency_ratio)
        self._judged_at = 0.0
        if self.alias:
            try:
                self._follow_canary()
            except Exception:  # a canary that cannot load must not keep the stable version from serving
                logger.exception("could not load the canary of %s; serving without it", self.name)
        self._waiting_bodies = 0  # requests of this replica still receiving their bodies (one event loop)
        # past this many, a body gets only the short grace (at most a quarter of the request slots)
        self._patient_bodies = min(self.options.max_waiting_bodies, max(1, self.options.max_ongoing_requests // 4))
        self._predict_batched = serve.batch(max_batch_size=self.options.max_batch_size,
                                            batch_wait_timeout_s=self.options.batch_wait_timeout_s)(
            self._predict_many)
        self._batching = 0  # requests of this replica on their way into (or in) a dynamic batch
        self._follower = asyncio.get_event_loop().create_task(self._follow()) if self.alias else None

    def _load(self, version: str) -> Loaded:
        from deepyard import tracking

        module, metadata = tracking.load_model(self.name, version, self.uri)
        info = tracking.model_version(self.name, version=version, uri=self.uri)
        logger.info("loaded %s version %s", self.name, version)
        return Loaded(module, version, metadata, info["metrics"], codec(metadata.get("task")))

    async def _follow(self) -> None:
        """Swap in the version the alias points at, whenever it moves, and follow the canary's state."""
        from deepyard import tracking

        while True:
            await asyncio.sleep(self.options.follow_alias_s)
            try:
                info = await asyncio.to_thread(tracking.model_version, self.name, alias=self.alias, uri=self.uri)
                if info["version"] != self.current.version:
                    canary = self.canary  # (a promoted canary is loaded already)
                    self.current = (canary if canary is not None and canary.version == info["version"]
                                    else await asyncio.to_thread(self._load, info["version"]))
                await asyncio.to_thread(self._follow_canary)
            except Exception:  # the registry may be briefly unreachable: keep serving what is loaded
                logger.exception("could not follow %s@%s", self.name, self.alias)

    def _follow_canary(self) -> None:
        version, percent = rollout.state(self.name, self.uri)
        if version != self._rolled_back:
            self._rolled_back = None
        if version is None or version == self._rolled_back or version == self.current.version:
            self.canary, self.canary_share = None, 0.0
            return
        if self.canary is None or self.canary.version != version:
            loaded = self._load(version)
            if version == self._rolled_back:  # (rolled back while it loaded)
                return
            self.watch.forget(version)
            self.canary = loaded
        self.canary_share = percent / 100

    def _pick(self) -> Loaded:
        canary = self.canary
        if canary is not None and random.random() < self.canary_share:
            return canary
        return self.current

    def _answered(self, route: str, version: str, status: int, started: float, judged: bool = True) -> None:
        """Counted (serve/metrics.py), and watched: a canary worse than the stable version goes.
        (``judged=False``: a request that asked for its version, which the split did not choose.)"""
        self.metrics.record(route, version, status, started)
        canary = self.canary
        if canary is None or not judged:
            return
        self.watch.add(version, status, time.perf_counter() - started)
        now = time.monotonic()
        if version == canary.version and now - self._judged_at > 1.0:  # (at most once a second: it sums the window)
            self._judged_at = now
            if reason := self.watch.verdict(self.current.version, canary.version):
                self.canary, self.canary_share, self._rolled_back = None, 0.0, canary.version
                logger.warning("%s version %s: %s", self.name, canary.version, reason)
                asyncio.get_event_loop().create_task(self._record_rollback(canary.version, reason))

    async def _record_rollback(self, version: str, reason: str) -> None:
        try:  # (another replica may have done it first)
            if (await asyncio.to_thread(rollout.state, self.name, self.uri))[0] == version:
                await asyncio.to_thread(rollout.rollback, self.name, reason, version)
        except Exception:
            logger.exception("could not record the rollback of %s version %s", self.name, version)

    async def _batched(self, loaded: Loaded, decoded: np.ndarray) -> tuple[np.ndarray, Loaded]:
        """Dynamic batching: one forward pass for the requests that arrived together. Each first lets
        the others that came in the same read reach this point (one turn of the event loop); a lone
        request then runs at once (Serve's batch queue costs ~0.2 ms, so batching adds no latency at
        concurrency 1); with company it joins the batch."""
        self._batching += 1
        try:
            await asyncio.sleep(0)
            if self._batching == 1:
                return loaded.codec.run(loaded.module, decoded, loaded.metadata), loaded
            return await self._predict_batched((loaded, decoded)), loaded
        finally:
            self._batching -= 1

    async def _predict_many(self, requests: list[tuple[Loaded, np.ndarray]]) -> list[np.ndarray]:
        """The batch's outputs, each request's by the version that decoded it: one forward pass per
        version (the alias may move while requests wait; a text or table version encodes with its
        own vocabulary or schema)."""
        outputs: list[Any] = [None] * len(requests)
        by_version: dict[int, list[int]] = {}
        for index, (loaded, _) in enumerate(requests):
            by_version.setdefault(id(loaded), []).append(index)
        for indices in by_version.values():
            loaded = requests[indices[0]][0]
            parts = [requests[index][1] for index in indices]
            result = loaded.codec.run(loaded.module, np.concatenate(parts), loaded.metadata)
            for index, part in zip(indices, np.split(result, np.cumsum([len(p) for p in parts])[:-1])):
                outputs[index] = part
        return outputs

    # (the token is checked in _predict_route: a FastAPI dependency cost ~8% of a replica's CPU per request)
    @app.post("/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY,
              responses={400: {"description": "bad input: the message names the problem and the expected shape"},
                         401: {"description": "missing or wrong bearer token"},
                         413: {"description": "too many instances, or too large a body"}})
    async def predict(self, request: Request) -> JSONResponse:
        return await self._predict_route(request, "predict")

    async def _predict_route(self, request: Request, route: str) -> Response:
        if not _token_accepted(request.headers.get("authorization")):
            return reply(_refused())
        started = time.perf_counter()
        try:
            body = await self._body(request)
            started = time.perf_counter()  # (what a slow client's upload takes is not the model's time)
            status, content, headers = await self._predictions(body)
        except (BadRequest, ModelFailed) as error:
            version = self._blamed(error)
            self._answered(route, version, error.status, started)
            # (a client that never sent its whole body gets no second chance on this connection)
            return JSONResponse({"error": str(error), "model": self.name}, status_code=error.status,
                                headers={VERSION_HEADER: version, **({"Connection": "close"} if error.status == 408
                                                                      else {})})
        self._answered(route, headers[VERSION_HEADER], status, started)
        return Response(content, status, headers)

    async def _predictions(self, body: Any) -> Answer:
        outputs, loaded = await self._run(body)
        try:
            predictions = loaded.codec.encode(outputs, loaded.metadata, body, self.options)
            content = json.dumps({"predictions": predictions, "model": self.name, "version": loaded.version},
                                 allow_nan=False).encode()
        except BadRequest:
            raise
        except Exception as error:  # (a model that diverged answers NaN: not JSON)
            raise ModelFailed(loaded.version, error) from error
        return 200, content, {"content-type": "application/json", VERSION_HEADER: loaded.version}

    async def _run(self, body: Any, loaded: Loaded | None = None) -> tuple[Any, Loaded]:
        """The task's outputs for a parsed ``{"instances": [...]}`` body, and the version that gave
        them (``loaded``, or the stable version or the canary by the canary's share)."""
        loaded = loaded or self._pick()
        decoded = loaded.codec.decode(body, loaded.metadata, self.options.max_instances)
        try:
            if not loaded.codec.batchable:  # sampled step by step (text, images): off the event loop
                outputs = await asyncio.to_thread(loaded.codec.run, loaded.module, decoded, loaded.metadata)
            elif loaded is self.current and 1 < self.options.max_batch_size >= len(decoded):  # (not a canary)
                # (a request of more instances fills a pass of its own: a batch stays within
                # max_batch_size squared rows)
                outputs, loaded = await self._batched(loaded, decoded)
            else:
                outputs = loaded.codec.run(loaded.module, decoded, loaded.metadata)
        except Exception as error:
            raise ModelFailed(loaded.version, error) from error
        return outputs, loaded

    # The KServe v1 and v2 paths under this model's own prefix. In front of a local cluster HAProxy
    # rewrites /v2/models/<name>/... to /models/<name>/v2/... (and /v1/models/<name> likewise;
    # serve/haproxy.py), so they cost no more than /predict; elsewhere the gateway application
    # (serve/gateway.py) answers the standard paths and calls the methods below through a handle.

    @app.post("/v2/infer", openapi_extra=v2.OPENAPI_BODY)  # (the token is checked in v2_infer)
    async def v2_infer_here(self, request: Request) -> Response:
        return await self._infer_here(request, None)

    @app.post("/v2/versions/{version}/infer", openapi_extra=v2.OPENAPI_BODY)
    async def v2_version_infer_here(self, version: str, request: Request) -> Response:
        return await self._infer_here(request, version)

    async def _infer_here(self, request: Request, version: str | None) -> Response:
        try:
            raw = await self._raw_body(request)
        except BadRequest as error:
            return reply(_json(error.status, {"error": str(error)}))
        return reply(await self.v2_infer(raw, request.headers.get(v2.HEADER_LENGTH), version,
                                         request.headers.get("authorization")))

    @app.get("/v2")
    async def v2_metadata_here(self, request: Request) -> Response:
        return reply(await self.v2_metadata(None, request.headers.get("authorization")))

    @app.get("/v2/versions/{version}")
    async def v2_version_metadata_here(self, version: str, request: Request) -> Response:
        return reply(await self.v2_metadata(version, request.headers.get("authorization")))

    @app.get("/v2/ready")
    async def v2_ready_here(self) -> Response:
        return reply(await self.v2_ready(None))

    @app.get("/v2/versions/{version}/ready")
    async def v2_version_ready_here(self, version: str) -> Response:
        return reply(await self.v2_ready(version))

    @app.get("/v1")
    async def v1_status_here(self) -> dict[str, Any]:
        return {"name": self.name, "ready": True}

    @app.post("/v1:predict", openapi_extra=PREDICT_BODY)
    async def v1_predict_here(self, request: Request) -> Response:
        return await self._predict_route(request, "v1")

    @app.post("/explain", response_model=ExplainResponse, dependencies=[Depends(_authorized)],
              openapi_extra=EXPLAIN_BODY,
              responses={400: {"description": "bad input, or an option this model cannot take"},
                         401: {"description": "missing or wrong bearer token"},
                         413: {"description": "too many instances, or too large a body"},
                         503: {"description": "not finished within the endpoint's explain_timeout_s"}})
    async def explain(self, request: Request) -> Response:
        return await self._explain_route(request, "explain")

    @app.post("/v1:explain", dependencies=[Depends(_authorized)], openapi_extra=EXPLAIN_BODY)
    async def v1_explain_here(self, request: Request) -> Response:
        return await self._explain_route(request, "v1_explain")

    async def _explain_route(self, request: Request, route: str) -> Response:
        try:
            body = await self._body(request)
        except BadRequest as error:
            return reply(self._failed(route, error, time.perf_counter(), judged=False))
        return reply(await self._explanations(body, route))

    async def _explanations(self, body: Any, route: str) -> Answer:
        """Explained by the version the split picks, never judged as a canary's answer: an
        explanation takes hundreds of predictions' time."""
        started = time.perf_counter()
        loaded = self._pick()
        try:
            try:
                explanations = await self.explaining.explain(loaded, body)
                # (not through dynamic batching: that serves whichever version is current by then)
                decoded = loaded.codec.decode(body, loaded.metadata, self.options.max_explain_instances)
                outputs = loaded.codec.run(loaded.module, decoded, loaded.metadata)
                content = json.dumps({"explanations": explanations, "model": self.name, "version": loaded.version,
                                      "predictions": loaded.codec.encode(outputs, loaded.metadata, body, self.options)},
                                     allow_nan=False).encode()
            except (BadRequest, ModelFailed):
                raise
            except Exception as error:  # (a model that diverged: NaN attributions)
                raise ModelFailed(loaded.version, error) from error
        except (BadRequest, ModelFailed) as error:
            return self._failed(route, error, started, judged=False)
        self._answered(route, loaded.version, 200, started, judged=False)
        return 200, content, {"content-type": "application/json", VERSION_HEADER: loaded.version}

    # What the protocols' gateway (serve/gateway.py) calls through a handle: (status, body, headers).

    async def v1_explain(self, raw: bytes, authorization: str | None = None) -> Answer:
        """KServe v1: ``POST /v1/models/<name>:explain``, the body /explain takes."""
        if not _token_accepted(authorization):
            return _refused()
        try:
            body = self._parsed(raw, 'send {"instances": [...]}')
        except BadRequest as error:
            return self._failed("v1_explain", error, time.perf_counter(), judged=False)
        return await self._explanations(body, "v1_explain")

    async def v1_predict(self, raw: bytes, authorization: str | None = None) -> Answer:
        """KServe v1: ``POST /v1/models/<name>:predict``, the body /predict takes."""
        if not _token_accepted(authorization):
            return _refused()
        started = time.perf_counter()
        try:
            answer = await self._predictions(self._parsed(raw, 'send {"instances": [...]}'))
        except (BadRequest, ModelFailed) as error:
            return self._failed("v1", error, started)
        self._answered("v1", answer[2][VERSION_HEADER], 200, started)
        return answer

    async def v2_infer(self, raw: bytes, header_length: str | None, version: str | None,
                       authorization: str | None = None) -> Answer:
        if not _token_accepted(authorization):
            return _refused()
        started = time.perf_counter()
        try:
            loaded = self._serving(version) if version is not None else self._pick()
            request = v2.parse(self._parsed(raw), header_length, loaded.metadata, _takes_numbers(loaded))
            outputs, loaded = await self._run({**request.parameters, "instances": request.instances}, loaded)
            try:
                content, headers = v2.response(self.name, loaded.version, request,
                                               loaded.codec.named_outputs(outputs, loaded.metadata))
            except BadRequest:
                raise
            except Exception as error:
                raise ModelFailed(loaded.version, error) from error
        except (BadRequest, ModelFailed) as error:
            return self._failed("v2", error, started, judged=version is None)
        self._answered("v2", loaded.version, 200, started, judged=version is None)
        return 200, content, {**headers, VERSION_HEADER: loaded.version}

    def _blamed(self, error: BaseException) -> str:
        """The version an error counts against: the one that failed, else (bad input) the stable one."""
        return getattr(error, "version", None) or self.current.version

    def _failed(self, route: str, error: BadRequest | ModelFailed, started: float, judged: bool = True) -> Answer:
        version = self._blamed(error)
        self._answered(route, version, error.status, started, judged)
        status, content, headers = _json(error.status, {"error": str(error)})
        return status, content, {**headers, VERSION_HEADER: version}

    async def v2_metadata(self, version: str | None, authorization: str | None = None) -> Answer:
        if not _token_accepted(authorization):
            return _refused()
        try:
            loaded = self._serving(version)
        except BadRequest as error:
            return _json(error.status, {"error": str(error)})
        return _json(200, v2.model_metadata(self.name, loaded.version, loaded.metadata, _takes_numbers(loaded),
                                            loaded.codec.output_tensors(loaded.metadata)))

    async def v2_ready(self, version: str | None) -> Answer:
        try:
            return _json(200, {"name": self.name, "version": self._serving(version).version, "ready": True})
        except BadRequest as error:
            return _json(error.status, {"error": str(error)})

    def _serving(self, version: str | None) -> Loaded:
        loaded, canary = self.current, self.canary
        if canary is not None and version == canary.version:
            return canary
        if version is not None and version != loaded.version:
            raise BadRequest(f"model {self.name!r} version {version!r} is not served here; it serves version "
                             f"{loaded.version} (drop /versions/... to use it)", status=404)
        return loaded

    def _parsed(self, raw: bytes, expected: str | None = None) -> Any:
        """The gateway's body: the same size limit as /predict. (``expected``: parse it as JSON too.)"""
        if len(raw) > self.options.max_body_bytes:
            raise BadRequest(f"request body is over the limit of {self.options.max_body_bytes} bytes", status=413)
        return raw if expected is None else parse_json(raw, expected)

    async def _body(self, request: Request) -> Any:
        return parse_json(await self._raw_body(request), 'send {"instances": [...]}')

    async def _raw_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.options.max_body_bytes:
            raise BadRequest(f"request body of {declared} bytes is over the limit of "
                             f"{self.options.max_body_bytes}", status=413)
        raw = await self._receive_body(request)
        if len(raw) > self.options.max_body_bytes:
            raise BadRequest(f"request body is over the limit of {self.options.max_body_bytes} bytes", status=413)
        return raw

    async def _receive_body(self, request: Request) -> bytes:
        """The whole body, within a deadline. A request waiting on its body holds one of the replica's
        max_ongoing_requests slots: enough clients that never finish theirs would leave none for
        anyone else. Only max_waiting_bodies may wait the full body_timeout_s at once."""
        busy = self._waiting_bodies >= self._patient_bodies
        deadline = self.options.busy_body_grace_s if busy else self.options.body_timeout_s
        self._waiting_bodies += 1
        try:
            async with asyncio.timeout(deadline):  # (wait_for would start a task per request)
                return await request.body()
        except TimeoutError:
            raise BadRequest(f"the request body did not arrive within {deadline:g} s"
                             f"{' (the endpoint is waiting on many slow clients)' if busy else ''}; send it whole",
                             status=408) from None
        finally:
            self._waiting_bodies -= 1

    @app.get("/", dependencies=[Depends(_authorized)])
    async def metadata(self) -> dict[str, Any]:
        loaded = self.current
        return {"model": self.name, "version": loaded.version, "alias": self.alias, "task": loaded.metadata.get("task"),
                "input_shape": loaded.metadata.get("input_shape"), "class_names": loaded.metadata.get("class_names"),
                "feature_names": loaded.metadata.get("feature_names"), "metrics": loaded.metrics,
                "request": loaded.codec.expected(loaded.metadata), "max_instances": self.options.max_instances,
                **table_columns(loaded.metadata)}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "version": self.current.version}

    def check_health(self) -> None:  # Serve's own probe: a replica whose follower died is restarted
        if self._follower is not None and self._follower.done():
            raise RuntimeError("the alias follower stopped")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The typed application builder: ``import_path: deepyard.serve.app:build_app`` in a Serve config."""
    options = EndpointOptions.model_validate(args)
    autoscaling = None if options.replicas else {
        "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
        "target_ongoing_requests": options.target_ongoing_requests}
    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus}
    if token := os.environ.get(TOKEN_ENV):  # whoever deploys sets it; replicas get only its digest
        actor_options["runtime_env"] = {"env_vars": {TOKEN_DIGEST_ENV: token_digest(token)}}
    return ModelEndpoint.options(
        num_replicas=options.replicas if options.replicas else None,
        autoscaling_config=autoscaling,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(options.model_dump())
