"""The quickstart model served by deepyard (Ray Serve) and by a plain FastAPI + uvicorn process.

    .venv/bin/python bench/serve_latency.py [--requests 400] [--epochs 1]

Trains the quickstart job (a few epochs: accuracy does not matter here), deploys it with
deepyard's defaults, starts the baseline (bench/serve_plain.py, one uvicorn process, the same
model and payloads), then sends the same real digit from a loopback load generator at
concurrency 1 and 32, to each in turn (3 interleaved rounds), and to deepyard's Open Inference
Protocol path (v2 infer) as well. Prints one JSON object: p50/p99 latency (ms) and requests/s per
server and concurrency, the ratios deepyard/baseline and v2/predict, and start-up seconds.

Two load generators, side by side: the Python one below (httpx, in a process of its own: it takes
about one of the machine's cores itself, so on 2 cores it caps what either server shows), and, where `wrk`
is installed (`apt-get install wrk`), wrk (C, a few percent of a core: what the servers themselves
can do). Their figures are keyed ``..._c32`` and ``wrk_..._c32``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import record
import shutil

ROOT = Path(__file__).resolve().parents[1]




async def load(url: str, body: dict, concurrency: int, requests: int) -> tuple[list[float], float, int]:
    """Latencies (s), wall seconds and failures of ``requests`` requests, ``concurrency`` at a time."""
    latencies: list[float] = []
    failures = 0
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        for _ in range(max(5, concurrency)):  # warm-up: connections, first-request paths
            await client.post(url, json=body)

        async def worker() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                response = await client.post(url, json=body)
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started, failures


def load_elsewhere(url: str, body: dict, concurrency: int, requests: int) -> tuple[list[float], float, int]:
    """``load`` in a process of its own: this one is a Ray driver, whose threads would share its GIL."""
    done = subprocess.run([sys.executable, __file__, "--load", json.dumps([url, body, concurrency, requests])],
                          capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout))


WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
"""


def wrk_load(url: str, body: dict, concurrency: int, seconds: float) -> dict:
    """wrk for ``seconds`` at ``concurrency`` connections (one thread): its latency percentiles,
    requests/s and non-200 answers."""
    import re

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % json.dumps(body))
    done = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", script.name, url],
                          capture_output=True, text=True, check=True)
    os.unlink(script.name)
    text = done.stdout
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}

    def percentile(p: int) -> float:
        value, unit = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M).groups()
        return float(value) * scale[unit]

    requests = int(re.search(r"(\d+) requests in", text).group(1))
    failures = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", text)) else 0
    errors = re.search(r"Socket errors: (.*)", text)
    return {"p50_ms": percentile(50), "p99_ms": percentile(99), "requests": requests, "failures": failures,
            "socket_errors": errors.group(1) if errors else None,
            "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}


def summarize(runs: list[tuple[list[float], float, int]]) -> dict:
    latencies = sorted(latency for run in runs for latency in run[0])
    return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "requests_per_s": len(latencies) / sum(run[1] for run in runs), "requests": len(latencies),
            "failures": sum(run[2] for run in runs)}


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    if sys.argv[1:2] == ["--load"]:  # (load_elsewhere's process)
        print(json.dumps(asyncio.run(load(*json.loads(sys.argv[2])))))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400, help="per concurrency level")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency level")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, help="dynamic batching (1: off; default: deploy's)")
    parser.add_argument("--wrk-seconds", type=float, default=5, help="each wrk round's length")
    parser.add_argument("--no-fast-proxy", action="store_true", help="Serve's Python proxy instead of HAProxy")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deepyard-serve-bench-")
    os.environ["DEEPYARD_HOME"] = home
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from deepyard import cluster, tracking
    from deepyard.runners import deploy
    from deepyard.runners.train import run
    from deepyard.runners.summary import RunOptions
    from deepyard.serve.options import EndpointOptions
    from deepyard.spec import load_spec

    spec = load_spec(ROOT / "jobs/quickstart.yaml", [f"train.epochs={args.epochs}"])
    results: dict = {"bench": "serve_latency", "cpus": os.cpu_count(), "model": "quickstart (digits CNN)",
                     "proxy": "python" if args.no_fast_proxy else "haproxy", "replicas": args.replicas,
                     "max_batch_size": args.max_batch_size}
    # deepyard deploy's default on a local cluster: Serve's HAProxy high-throughput mode
    with cluster.connected(local_env=None if args.no_fast_proxy else cluster.serve_env()):
        summary = run(spec, RunOptions()).to_json()
        name, version = summary["model_name"], summary["model_version"]
        sample = tracking.input_example(name, version)[:1].tolist()
        body = {"instances": sample}

        started = time.perf_counter()
        port = record.free_port()
        batching = {} if args.max_batch_size is None else {"max_batch_size": args.max_batch_size}
        options = EndpointOptions(model=f"{name}:{version}", replicas=args.replicas, **batching)
        results["max_batch_size"] = options.max_batch_size
        (info,) = deploy.start([options], host="127.0.0.1", port=port)
        results["deepyard_start_s"] = time.perf_counter() - started
        deepyard_url = f"{info['url']}/predict"
        # The same instance through the Open Inference Protocol's path (the gateway, then the model)
        v2_url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
        example = tracking.input_example(name, version)[:1]
        v2_body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(example.shape),
                               "data": example.reshape(-1).tolist()}]}

        started = time.perf_counter()
        plain_port = record.free_port()
        env = {**os.environ, "MODEL_URI": f"models:/{name}/{version}", "PYTHONPATH": str(ROOT)}
        plain = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.serve_plain:app", "--port", str(plain_port),
                                  "--log-level", "warning", "--no-access-log"], env=env, cwd=ROOT)
        try:
            wait_ready(f"http://127.0.0.1:{plain_port}/docs")
            results["plain_start_s"] = time.perf_counter() - started
            plain_url = f"http://127.0.0.1:{plain_port}/predict"
            servers = [("plain", plain_url, body), ("deepyard", deepyard_url, body), ("deepyard_v2", v2_url, v2_body)]
            for concurrency in (1, 32):
                requests = (args.requests if concurrency == 1 else 2 * args.requests) // args.rounds
                runs: dict[str, list] = {server: [] for server, _, _ in servers}
                for round_ in range(args.rounds):  # interleaved, each round in another order: drift hits all alike
                    for server, url, payload in servers[round_ % 3:] + servers[:round_ % 3]:
                        runs[server].append(load_elsewhere(url, payload, concurrency, requests))
                for server in runs:
                    key = f"{server}_c{concurrency}"
                    results[key] = summarize(runs[server])
                    print(json.dumps({key: results[key]}), file=sys.stderr)
            if shutil.which("wrk"):
                for concurrency in (1, 32):
                    wrk_runs: dict[str, list] = {server: [] for server, _, _ in servers}
                    for round_ in range(args.rounds):
                        for server, url, payload in servers[round_ % 3:] + servers[:round_ % 3]:
                            wrk_runs[server].append(wrk_load(url, payload, concurrency, args.wrk_seconds))
                    for server, done in wrk_runs.items():
                        key = f"wrk_{server}_c{concurrency}"
                        # medians over the rounds; requests and failures summed
                        results[key] = {"p50_ms": statistics.median(r["p50_ms"] for r in done),
                                        "p99_ms": statistics.median(r["p99_ms"] for r in done),
                                        "requests_per_s": statistics.median(r["requests_per_s"] for r in done),
                                        "requests": sum(r["requests"] for r in done),
                                        "failures": sum(r["failures"] for r in done),
                                        "socket_errors": [r["socket_errors"] for r in done if r["socket_errors"]]}
                        print(json.dumps({key: results[key]}), file=sys.stderr)
            else:
                print("wrk is not installed (apt-get install wrk): the httpx load generator only", file=sys.stderr)
        finally:
            plain.terminate()
            plain.wait()
    for prefix, concurrency in ((p, c) for p in ("", "wrk_") for c in (1, 32)):
        if f"{prefix}plain_c{concurrency}" not in results:
            continue
        ours, theirs = results[f"{prefix}deepyard_c{concurrency}"], results[f"{prefix}plain_c{concurrency}"]
        results[f"{prefix}c{concurrency}_p50_ratio"] = ours["p50_ms"] / theirs["p50_ms"]
        results[f"{prefix}c{concurrency}_throughput_ratio"] = ours["requests_per_s"] / theirs["requests_per_s"]
        v2 = results[f"{prefix}deepyard_v2_c{concurrency}"]  # the v2 path against deepyard's own predict
        results[f"{prefix}c{concurrency}_v2_vs_predict_p50_ratio"] = v2["p50_ms"] / ours["p50_ms"]
        results[f"{prefix}c{concurrency}_v2_vs_predict_throughput_ratio"] = (v2["requests_per_s"]
                                                                             / ours["requests_per_s"])
    name = record.variant("serve_latency", args.replicas != 1 and f"replicas{args.replicas}",
                          args.max_batch_size is not None and f"batch{args.max_batch_size}",
                          args.no_fast_proxy and "python_proxy")
    record.save(name, results)


if __name__ == "__main__":
    main()
