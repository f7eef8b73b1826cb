"""Adversarial training against plain training, measured by deepyard's own robustness job.

    .venv/bin/python bench/robustness.py [--train-samples 12000] [--epochs 4] [--examples 1000]

A Fashion-MNIST CNN trained twice on the same data and seed: plainly, then with
``train.adversarial`` (PGD at epsilon 0.1 of the pixel range, 5 steps, 30% of each batch). Then a
``kind: robustness`` job attacks each version with FGSM and PGD (10 steps) at epsilon 0.05, 0.1 and
0.2 of the range (pixels are 0-255 here: 12.75, 25.5, 51) on the first ``--examples`` test images.
Prints one JSON object: the table (clean, FGSM and PGD accuracy per epsilon, before and after), the
PGD gain at 0.1 and the clean accuracy lost (goal: at least +30 points for at most 5 lost), the
gradient-masking checks, and the wall time of each training run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]
PIXELS = 255.0
EPSILONS = [0.05, 0.1, 0.2]

TRAIN = """
kind: train
name: fashion_robust_bench
data: {{name: fashion_mnist, val_fraction: 0.05, max_train_samples: {samples}}}
model: {{name: cnn, params: {{channels: [32, 64], hidden_sizes: [128], dropout: 0.3}}}}
optim: {{name: adamw, lr: 0.003, weight_decay: 0.0001, schedule: {{name: onecycle}}}}
train: {{epochs: {epochs}, batch_size: 128, seed: 0}}
register: {{model_name: fashion-robust-bench}}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--mix", type=float, default=0.3, help="share of each batch made adversarial")
    args = parser.parse_args()
    record.fresh_home("robust")
    from deepyard import cluster
    from deepyard.runners import robustness, train
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import parse_spec

    import yaml

    epsilon = 0.1 * PIXELS
    adversarial = {"method": "pgd", "epsilon": epsilon, "steps": 5, "mix": args.mix}
    results: dict = {"bench": "robustness", "model": "Fashion-MNIST CNN [32, 64]", "train_samples": args.train_samples,
                     "epochs": args.epochs, "examples": args.examples, "adversarial_training": adversarial,
                     "epsilons_of_range": EPSILONS, "pixel_max": PIXELS}
    with cluster.connected():
        for label, extra in (("plain", None), ("adversarial", adversarial)):
            document = yaml.safe_load(TRAIN.format(samples=args.train_samples, epochs=args.epochs))
            document["train"]["adversarial"] = extra
            started = time.perf_counter()
            summary = train.run(parse_spec(document), RunOptions()).to_json()
            results[f"{label}_train_s"] = time.perf_counter() - started
            attack = parse_spec({"kind": "robustness", "name": f"fashion_robust_bench_{label}",
                                 "model": f"fashion-robust-bench:{summary['model_version']}",
                                 "epsilons": [e * PIXELS for e in EPSILONS], "examples": args.examples,
                                 "pgd": {"steps": 10}})
            attacked = robustness.run(attack, RunOptions()).to_json()
            results[label] = {"clean": attacked["metrics"]["clean_accuracy"],
                              "test_accuracy": summary["metrics"]["test_accuracy"],
                              "fgsm": attacked["accuracy"]["fgsm"], "pgd": attacked["accuracy"]["pgd"],
                              "checks": attacked["checks"]}
    at = EPSILONS.index(0.1)
    results["pgd_gain_points_at_0.1"] = 100 * (results["adversarial"]["pgd"][at] - results["plain"]["pgd"][at])
    results["clean_lost_points"] = 100 * (results["plain"]["clean"] - results["adversarial"]["clean"])
    results["train_time_ratio"] = results["adversarial_train_s"] / results["plain_train_s"]
    record.save(record.variant("robustness", args.mix != 0.3 and f"mix{args.mix}"), results)


if __name__ == "__main__":
    main()
