"""A canary rollout of the quickstart model under load: the share it gets, and how fast a failing one goes.

    .venv/bin/python bench/serve_canary.py [--requests 2000] [--traffic 10]

Registers three versions of the quickstart job (two healthy; one trained at a learning rate that
makes it diverge, so its weights are NaN and every answer it gives is a 500), deploys it following
@champion, then from 8 loopback clients:
- a healthy canary at --traffic percent over --requests requests: the share that reached it;
- the diverged canary at the same share: seconds until the replicas rolled it back on their own
  (the registry no longer names it), its failed requests, and the stable version's (the goal: 0).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import record

ROOT = Path(__file__).resolve().parents[1]


async def hammer(url: str, body: dict, requests: int | None, until=None, clients: int = 8) -> list[tuple]:
    """(version, status) of each answer: ``requests`` of them, or as many as come before ``until()``."""
    answers: list[tuple] = []
    remaining = requests

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while (remaining is None or remaining > 0) and not (until and until()):
            if remaining is not None:
                remaining -= 1
            response = await client.post(url, json=body)
            answers.append((response.headers.get("x-deepyard-version"), response.status_code))

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--traffic", type=float, default=10.0)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deepyard-canary-bench-")
    os.environ["DEEPYARD_HOME"] = home
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from deepyard import cluster, tracking
    from deepyard.runners import deploy
    from deepyard.runners.summary import RunOptions
    from deepyard.runners.train import run
    from deepyard.serve import rollout
    from deepyard.serve.options import EndpointOptions
    from deepyard.spec import load_spec

    results: dict = {"bench": "serve_canary", "cpus": os.cpu_count(), "model": "quickstart (digits CNN)",
                     "requests": args.requests, "traffic_percent": args.traffic}
    with cluster.connected(local_env=cluster.serve_env()):
        versions = [run(load_spec(ROOT / "jobs/quickstart.yaml", ["train.epochs=1", f"optim.lr={lr}"]),
                        RunOptions()).to_json() for lr in ("0.01", "0.003", "1e30")]
        name = versions[0]["model_name"]
        stable, healthy, diverged = (v["model_version"] for v in versions)
        tracking.set_alias(name, "champion", stable)
        body = {"instances": tracking.input_example(name, stable)[:1].tolist()}
        (info,) = deploy.start([EndpointOptions(model=name, follow_alias_s=0.5)], host="127.0.0.1",
                               port=record.free_port())
        url = f"{info['url']}/predict"

        rollout.start(name, healthy, args.traffic)
        time.sleep(2)  # the replicas poll the registry every 0.5 s here
        answers = asyncio.run(hammer(url, body, args.requests))
        share = 100 * sum(version == healthy for version, _ in answers) / len(answers)
        results["split"] = {"answers": len(answers), "canary_share_percent": share,
                            "off_by_points": abs(share - args.traffic),
                            "failed": sum(status != 200 for _, status in answers)}
        rollout.rollback(name)
        time.sleep(2)

        started, gone = time.monotonic(), threading.Event()

        def watch_registry() -> None:  # (off the load's event loop: each look is a sqlite read)
            while rollout.state(name)[0] is not None and time.monotonic() - started < 120:
                time.sleep(0.1)
            gone.set()

        rollout.start(name, diverged, args.traffic)
        threading.Thread(target=watch_registry, daemon=True).start()
        answers = asyncio.run(hammer(url, body, None, until=gone.is_set))
        rolled_back_s = time.monotonic() - started
        answers += asyncio.run(hammer(url, body, 200))  # after it: all from the stable version
        results["rollback"] = {
            "seconds_to_rollback": rolled_back_s, "rolled_back": rollout.state(name)[0] is None,
            "recorded": tracking.client().get_model_version(name, diverged).tags.get(rollout.RECORD_TAG),
            "window_s": EndpointOptions(model=name).rollback_window_s,
            "canary_failed": sum(v == diverged and s != 200 for v, s in answers),
            "stable_failed": sum(v != diverged and s != 200 for v, s in answers),
            "answers": len(answers)}
    record.save(record.variant("serve_canary"), results)


if __name__ == "__main__":
    main()
