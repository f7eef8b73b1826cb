"""How good deepyard's explanations are, on the quickstart digits CNN as it is registered and served.

    .venv/bin/python bench/explain_quality.py [--images 100] [--epochs 10] [--requests 40]

Trains the quickstart job, then on the first ``--images`` test images:

- completeness of integrated gradients: |sum of attributions - (F(x) - F(baseline))| as a share of
  |F(x) - F(baseline)| (goal: at most 1%), from 50 steps (the default; an instance that misses 1%
  is redone with 4x the steps, up to 512), and the steps that took;
- deletion curves (Samek et al. 2017): the most-attributed pixels set to the baseline (0) first, the
  predicted class's probability after each 1/16 of the pixels; the area under that curve for each
  method against a random order of deletion (goal: below random);
- the model-randomization sanity check (Adebayo et al. 2018): every learned weight re-drawn at
  random (each tensor's own scale), the attributions again; Spearman rank correlation of |attributions|
  with the trained model's (goal: not above 0.5);
- served: /explain p50 for one image next to /predict's, one request at a time (HAProxy, one replica).

Prints one JSON object and records it (bench/record.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import record
import torch

ROOT = Path(__file__).resolve().parents[1]
# label -> (method, baseline); the default baseline (the training mean) beside the zero (black) one
METHODS = {"integrated_gradients": ("integrated_gradients", "auto"), "saliency": ("saliency", "auto"),
           "gradient_shap": ("gradient_shap", "auto"),
           "integrated_gradients_zero_baseline": ("integrated_gradients", "zeros")}


def deletion_auc(module, images: np.ndarray, attributions: np.ndarray, targets: list[int], points: int = 16) -> float:
    """Mean area under the target-probability curve as pixels go to 0, most-attributed first."""
    count = images[0].size
    areas = []
    for image, attribution, target in zip(images, attributions, targets):
        order = np.argsort(-attribution.reshape(-1), kind="stable")
        steps = [round(count * k / points) for k in range(points + 1)]
        batch = np.repeat(image.reshape(1, -1), len(steps), axis=0)
        for row, removed in enumerate(steps):
            batch[row, order[:removed]] = 0.0
        with torch.no_grad():
            curve = module(torch.from_numpy(batch.reshape(len(steps), *image.shape)))[:, target].numpy()
        areas.append(float(np.trapezoid(curve, dx=1 / points)))
    return float(np.mean(areas))


def randomized(module):
    """``module`` (a copy: exported programs do not deepcopy) with every learned weight re-drawn,
    each tensor at its own scale; the standardization buffers are kept."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            scale = float(parameter.std()) if parameter.numel() > 1 else 1.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (scale or 0.1))
    return module


def spearman(first: np.ndarray, second: np.ndarray, signed: bool = False) -> float:
    """Mean over images of the rank correlation of |attributions| (Adebayo et al.'s main measure), or
    of the signed attributions."""
    from scipy.stats import spearmanr

    shown = (lambda a: a) if signed else np.abs
    return float(np.mean([spearmanr(shown(a).reshape(-1), shown(b).reshape(-1)).statistic
                          for a, b in zip(first, second)]))


def served_latency(name: str, version: str, image: list, requests: int) -> dict:
    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions

    (info,) = deploy.start([EndpointOptions(model=f"{name}:{version}")], host="127.0.0.1", port=record.free_port())
    timings = {}
    with httpx.Client(timeout=60) as client:
        for route in ("predict", "explain", "predict", "explain"):  # (the second round is the one kept)
            samples = []
            for _ in range(requests):
                started = time.perf_counter()
                answer = client.post(f"{info['url']}/{route}", json={"instances": [image]})
                samples.append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text
            timings[route] = 1000 * statistics.median(samples)
    return {"predict_p50_ms": timings["predict"], "explain_p50_ms": timings["explain"],
            "explain_vs_predict_p50": timings["explain"] / timings["predict"]}




def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=40, help="per route and round, for the served p50")
    args = parser.parse_args()
    record.fresh_home("explain")
    from deepyard import cluster, tracking
    from deepyard.explain.attributions import Explainer
    from deepyard.explain.options import ExplainOptions
    from deepyard.runners.setup import load_data
    from deepyard.runners.summary import RunOptions
    from deepyard.runners.train import run
    from deepyard.spec import load_spec

    spec = load_spec(ROOT / "jobs/quickstart.yaml", [f"train.epochs={args.epochs}"])
    results: dict = {"bench": "explain_quality", "model": "quickstart (digits CNN, 8x8)", "images": args.images}
    with cluster.connected(local_env=cluster.serve_env()):
        summary = run(spec, RunOptions()).to_json()
        name, version = summary["model_name"], summary["model_version"]
        results["test_accuracy"] = summary["metrics"]["test_accuracy"]
        module = tracking.load_exported(name, version)
        metadata = tracking.model_metadata(name, version)
        images = load_data(spec).x_test[:args.images]
        explainer = Explainer(module, metadata, name)
        with torch.no_grad():
            targets = module(torch.from_numpy(images)).argmax(-1).tolist()

        def attributions(of: Explainer, label: str) -> tuple[np.ndarray, list[dict]]:
            method, baseline = METHODS[label]
            started = time.perf_counter()
            explained = of.explain(images, ExplainOptions(method=method, baseline=baseline))
            results.setdefault("explain_s_per_image", {})[label] = (time.perf_counter() - started) / len(images)
            return np.asarray([e["attributions"] for e in explained]), explained

        _, explained = attributions(explainer, "integrated_gradients")
        errors = np.asarray([abs(e["convergence_delta"]) / max(abs(e["output"] - e["baseline_output"]), 1e-12)
                             for e in explained])
        taken = np.asarray([e["n_steps"] for e in explained])
        results["completeness_error"] = {
            "mean": float(errors.mean()), "median": float(np.median(errors)), "max": float(errors.max()),
            "share_within_1pct": float(np.mean(errors <= 0.01)), "mean_steps": float(taken.mean()),
            "share_refined": float(np.mean(taken > 50)), "share_at_512_steps": float(np.mean(taken == 512))}

        rng = np.random.default_rng(0)
        random_auc = float(np.mean([deletion_auc(module, images, rng.random(images.shape), targets)
                                    for _ in range(5)]))
        results["deletion_auc"] = {"random_order": random_auc}
        trained = {}
        for method in METHODS:
            trained[method], _ = attributions(explainer, method)
            results["deletion_auc"][method] = deletion_auc(module, images, trained[method], targets)
        results["deletion_auc_ratio_ig_vs_random"] = results["deletion_auc"]["integrated_gradients"] / random_auc

        shuffled = Explainer(randomized(tracking.load_exported(name, version)), metadata, name)
        randomized_attributions = {method: attributions(shuffled, method)[0] for method in METHODS}
        results["randomization_spearman"] = {
            method: spearman(trained[method], randomized_attributions[method]) for method in METHODS}
        results["randomization_spearman_signed"] = {
            method: spearman(trained[method], randomized_attributions[method], signed=True) for method in METHODS}
        results["served"] = served_latency(name, version, images[0].reshape(-1).tolist(), args.requests)
    record.save("explain_quality", results)


if __name__ == "__main__":
    main()
