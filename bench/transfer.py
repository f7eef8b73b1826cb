"""Transfer learning on Fashion-MNIST: classes 5-9 with 10 labels per class, from scratch against
starting from a CNN trained on classes 0-4 (jobs/fashion_source.yaml), frozen or fine-tuned.

    .venv/bin/python bench/transfer.py [--seeds 0 1 2]

Prints one JSON object: per variant the test accuracy of each seed (the seed draws the label budget
and the new layer's weights) and their mean, and the gains over scratch. The source is trained once,
in a throw-away DEEPYARD_HOME. Goal (the transfer issue): fine-tuning beats scratch by >= 1.5 points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import record

# One job (jobs/fashion_transfer.yaml) three ways: overrides on top of it.
VARIANTS = {
    "scratch": ["init=null", "optim.param_groups=[]"],
    "frozen_backbone": ["init.freeze=['^body\\.']", "optim.param_groups=[]"],
    "fine_tuned_discriminative": [],  # the job as shipped: the body learns 10x slower than the head
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    os.environ.setdefault("DEEPYARD_HOME", tempfile.mkdtemp(prefix="deepyard-bench-"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from deepyard import cluster
    from deepyard.runners.summary import RunOptions
    from deepyard.runners.train import run
    from deepyard.spec import load_spec

    with cluster.connected():
        started = time.perf_counter()
        source = run(load_spec("jobs/fashion_source.yaml"), RunOptions()).to_json()
        source_s = time.perf_counter() - started
        results = {}
        for variant, overrides in VARIANTS.items():
            runs = []
            for seed in args.seeds:
                spec = load_spec("jobs/fashion_transfer.yaml", [*overrides, f"train.seed={seed}"])
                started = time.perf_counter()
                summary = run(spec, RunOptions()).to_json()
                runs.append({"seed": seed, "test_accuracy": summary["metrics"]["test_accuracy"],
                             "best_epoch": summary["best_epoch"], "wall_s": round(time.perf_counter() - started, 1)})
                print(json.dumps({variant: runs[-1]}), file=sys.stderr)
            results[variant] = {"mean_test_accuracy": sum(r["test_accuracy"] for r in runs) / len(runs), "runs": runs}
    scratch = results["scratch"]["mean_test_accuracy"]
    gains = {f"{name}_minus_scratch_points": round(100 * (r["mean_test_accuracy"] - scratch), 2)
             for name, r in results.items() if name != "scratch"}
    record.save("transfer", {"bench": "transfer", "goal": "fine-tuned beats scratch by >= 1.5 points",
                             "source": {"test_accuracy": source["metrics"]["test_accuracy"],
                                        "wall_s": round(source_s, 1)},
                             "labels_per_class": 10, "results": results, **gains})


if __name__ == "__main__":
    main()
