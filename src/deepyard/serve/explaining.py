"""``POST /models/<name>/explain`` (and KServe v1's ``:explain``): the predictions of a request and
why, per instance, from the same version.

An explanation costs ``steps`` forward and backward passes per instance, hundreds of predictions'
worth: a replica computes one at a time, off its event loop (predictions keep being answered
meanwhile), and a request that cannot finish within ``explain_timeout_s``, its wait included, is
answered 503 instead of holding the replica. Each version's explainer is made on the first request
that needs it: on the module the replica serves, or for text on the exported program unflattened.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pydantic

from deepyard.explain.attributions import Explainer, ExplainTimeout, explainable_module, explained_output
from deepyard.explain.options import ExplainOptions
from deepyard.serve.options import EndpointOptions
from deepyard.serve.payloads import BadRequest

# Body fields that are the predict route's, not the explanation's
PREDICT_FIELDS = ("instances", "top_k")


def explain_options(body: Any) -> ExplainOptions:
    if not isinstance(body, dict):
        raise BadRequest(f'a JSON {type(body).__name__}; send {{"instances": [...]}} and how to explain them')
    fields = {key: value for key, value in body.items() if key not in PREDICT_FIELDS}
    try:
        return ExplainOptions.model_validate(fields)
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
        raise BadRequest(f"{problems} (explain takes instances, top_k and {', '.join(ExplainOptions.model_fields)})"
                         ) from None


class Explanations:
    """One replica's explainers, by version, and its one-at-a-time turn."""

    def __init__(self, name: str, uri: str, options: EndpointOptions):
        self.name, self.uri, self.options = name, uri, options
        self._explainers: dict[str, Explainer] = {}
        self._turn = asyncio.Semaphore(1)

    async def explain(self, loaded, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The explanations of ``body``'s instances by ``loaded`` (app.Loaded). Raises BadRequest
        (4xx), or with status 503 past the time limit."""
        explained_output(loaded.metadata, self.name)
        options = explain_options(body)
        inputs = loaded.codec.decode(body, loaded.metadata, self.options.max_explain_instances)
        limit = self.options.explain_timeout_s
        deadline = time.monotonic() + limit
        await self._take_turn(limit)
        work = asyncio.ensure_future(self._run(loaded, inputs, options, deadline))
        work.add_done_callback(lambda _: self._turn.release())  # (a late one still holds the turn till it ends)
        try:
            # (the thread checks the deadline between instances; past it, answer now and let it finish)
            return await asyncio.wait_for(asyncio.shield(work), max(0.0, deadline - time.monotonic()) + 1.0)
        except (asyncio.TimeoutError, ExplainTimeout):
            raise self._late("explaining") from None

    async def _take_turn(self, limit: float) -> None:
        """The replica's one explanation at a time, within ``limit`` seconds. (Not wait_for around
        acquire: cancelled as it succeeds, it keeps the turn forever; CPython gh-86296.)"""
        acquiring = asyncio.ensure_future(self._turn.acquire())
        try:
            done, _ = await asyncio.wait({acquiring}, timeout=limit)
        except asyncio.CancelledError:  # (the client went away while it waited)
            self._give_up(acquiring)
            raise
        if not done:
            self._give_up(acquiring)
            raise self._late("waiting for the explanations before it")

    def _give_up(self, acquiring: asyncio.Future) -> None:
        acquiring.cancel()  # (too late if it got the turn meanwhile: then it is given back)
        acquiring.add_done_callback(lambda done: done.cancelled() or self._turn.release())

    async def _run(self, loaded, inputs, options: ExplainOptions, deadline: float) -> list[dict[str, Any]]:
        explainer = self._explainers.get(loaded.version) or await asyncio.to_thread(self._explainer, loaded)
        return await asyncio.to_thread(explainer.explain, inputs, options, deadline)

    def _explainer(self, loaded) -> Explainer:
        module = explainable_module(self.name, loaded.version, loaded.metadata, loaded.module, self.uri)
        explainer = self._explainers[loaded.version] = Explainer(module, loaded.metadata, self.name)
        while len(self._explainers) > 2:  # (the stable version's and a canary's)
            self._explainers.pop(next(iter(self._explainers)))
        return explainer

    def _late(self, doing: str) -> BadRequest:
        return BadRequest(f"the explanation did not finish within explain_timeout_s "
                          f"({self.options.explain_timeout_s:g} s) while {doing}; ask for fewer steps or "
                          "instances, or retry", status=503)
