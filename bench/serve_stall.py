"""Healthy clients of an endpoint while hostile ones open requests and never finish their bodies.

    .venv/bin/python bench/serve_stall.py [--stalled 200] [--healthy 32] [--seconds 15]

Trains a tiny digits MLP and deploys it as `deepyard deploy` does (HAProxy in front). Then, for
each of three phases, ``--healthy`` clients send one real digit after another for ``--seconds``
(10 s timeout each): alone (the baseline), beside ``--stalled`` clients that send their headers and
the start of a body and then nothing (each reconnects as soon as it is cut off), with deepyard's
body deadlines (the defaults), and the same with the deadlines lifted (what the endpoint did before
them). Prints one JSON object: the healthy clients' error rate, p50/p99 latency and requests/s per
phase, the stalled clients' 408s, and the p99 ratios against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import record

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.max_train_samples=500", "train.epochs=1", "model.params.hidden_sizes=[16]", "register.model_name=stall"]


async def stall_forever(host: str, port: int, path: str, until: float, cut_off: list[int]) -> None:
    """A slowloris: headers and the start of a body, then silence; again as soon as it is answered."""
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               "Content-Length: 100000\r\n\r\n{\"instances\": [[").encode()
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(64), max(0.1, until - time.monotonic()))
            cut_off[0] += answer.startswith(b"HTTP/1.1 408")
            writer.close()
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)


async def healthy(url: str, body: dict, clients: int, seconds: float, stalled: int) -> dict:
    parsed = urlparse(url)
    latencies: list[float] = []
    errors, cut_off = 0, [0]
    until = time.monotonic() + seconds
    stallers = [asyncio.create_task(stall_forever(parsed.hostname, parsed.port, parsed.path, until + 1, cut_off))
                for _ in range(stalled)]
    await asyncio.sleep(1 if stalled else 0)  # they reach the replica first
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=clients)) as client:
        async def one_client() -> None:
            nonlocal errors
            while time.monotonic() < until:
                started = time.perf_counter()
                try:
                    ok = (await client.post(url, json=body)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
    for task in stallers:
        task.cancel()
    await asyncio.gather(*stallers, return_exceptions=True)
    latencies.sort()
    answered = len(latencies)
    return {"requests": answered + errors, "errors": errors, "error_rate": errors / max(1, answered + errors),
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p99_ms": 1000 * latencies[int(0.99 * (answered - 1))] if latencies else None,
            "requests_per_s": answered / wall, "stalled_clients": stalled, "stalled_cut_off_408": cut_off[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stalled", type=int, default=200)
    parser.add_argument("--healthy", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deepyard-stall-bench-")
    os.environ.update({"DEEPYARD_HOME": home, "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"})
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from deepyard import cluster, tracking
    from deepyard.runners import deploy
    from deepyard.runners.summary import RunOptions
    from deepyard.runners.train import run
    from deepyard.serve.options import EndpointOptions
    from deepyard.spec import load_spec

    spec = load_spec(ROOT / "jobs/digits_mlp.yaml", TINY)
    guarded = EndpointOptions(model="stall:1")
    results: dict = {"bench": "serve_stall", "cpus": os.cpu_count(), "proxy": "haproxy",
                     "max_ongoing_requests": guarded.max_ongoing_requests, "body_timeout_s": guarded.body_timeout_s,
                     "max_waiting_bodies": guarded.max_waiting_bodies, "busy_body_grace_s": guarded.busy_body_grace_s,
                     "healthy_clients": args.healthy, "seconds": args.seconds}
    # Before the deadlines, a replica waited as long as a client liked: an hour stands in for that.
    unguarded = guarded.model_copy(update={"body_timeout_s": 3600.0, "busy_body_grace_s": 3600.0})
    port = record.free_port()
    with cluster.connected(local_env=cluster.serve_env()):
        run(spec, RunOptions())
        body = {"instances": tracking.input_example("stall", "1")[:1].tolist()}
        for phase, options, stalled in (("alone", guarded, 0), ("stalled_guarded", guarded, args.stalled),
                                        ("stalled_unguarded", unguarded, args.stalled)):
            (info,) = deploy.start([options], host="127.0.0.1", port=port)  # a fresh replica per phase
            results[phase] = asyncio.run(healthy(f"{info['url']}/predict", body, args.healthy, args.seconds, stalled))
            print({phase: results[phase]}, flush=True)
    alone = results["alone"]["p99_ms"]
    for phase in ("stalled_guarded", "stalled_unguarded"):
        p99 = results[phase]["p99_ms"]
        results[f"{phase}_p99_ratio"] = p99 / alone if p99 else None
    record.save("serve_stall", results)


if __name__ == "__main__":
    main()
