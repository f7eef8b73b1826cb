"""Compression of a Fashion-MNIST CNN: pruning, int8 and distillation, each against its baseline in
the same run.

    .venv/bin/python bench/compress.py [--parts prune structured int8 distill] [--parent-epochs 3]

Trains the parent once (jobs/fashion_mnist_cnn.yaml, fewer epochs), in a throw-away DEEPYARD_HOME, then:

- prune: global magnitude pruning at 50/80/90/95% (jobs/fashion_cnn_prune.yaml), one fine-tuning
  epoch per stage; test accuracy, stored and zipped size, CPU latency per stage next to the parent.
- structured: 50% of the units removed (Torch-Pruning), fine-tuned; size and latency next to the parent.
- int8: static (jobs/fashion_cnn_int8.yaml) and dynamic int8; accuracy, size, and the served p50
  latency of the three versions, deployed side by side by Ray Serve, the same request to each.
- distill: an MLP student taught by the parent against the same MLP trained from scratch with the
  same epochs, over 3 seeds.
- distill_budget (not in the default parts): the same student taught by jobs/fashion_transfer.yaml's
  model (10 labels per class) on the training images without labels, against it trained on the 50
  labels alone.

Prints one JSON object; goals (the compression issue): <= 1 point lost at 80% sparsity; int8 <= 0.5
points lost and >= 3x smaller stored.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import httpx
import record

STUDENT = {"name": "mlp", "params": {"hidden_sizes": [64], "dropout": 0.0}}




def served_p50(url: str, body: dict, requests: int) -> float:
    """Median milliseconds of one request at a time (after a warm-up)."""
    latencies = []
    with httpx.Client(timeout=60) as client:
        for _ in range(10):
            client.post(url, json=body).raise_for_status()
        for _ in range(requests):
            started = time.perf_counter()
            client.post(url, json=body).raise_for_status()
            latencies.append(1000 * (time.perf_counter() - started))
    return statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["prune", "structured", "int8", "distill"])
    parser.add_argument("--parent-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--distill-epochs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("DEEPYARD_HOME", tempfile.mkdtemp(prefix="deepyard-bench-"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from deepyard import cluster
    from deepyard.runners import compress, train
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import load_spec

    def log(part: str, value) -> None:
        print(f"{part}: {value}", file=sys.stderr)

    result: dict = {"bench": "compress", "parts": args.parts}
    with cluster.connected():
        if set(args.parts) - {"distill_budget"}:  # the parts that compress the Fashion-MNIST CNN
            started = time.perf_counter()
            parent = train.run(load_spec("jobs/fashion_mnist_cnn.yaml", [f"train.epochs={args.parent_epochs}"]),
                               RunOptions())
            result["parent"] = {"test_accuracy": parent.metrics["test_accuracy"], "epochs": args.parent_epochs,
                                "wall_s": round(time.perf_counter() - started, 1)}
            log("parent", result["parent"])

        def compress_job(path: str, *overrides: str) -> dict:
            started = time.perf_counter()
            summary = compress.run(load_spec(path, list(overrides)), RunOptions()).to_json()
            rows = summary["versions"]
            parent_row = rows[0]
            return {"wall_s": round(time.perf_counter() - started, 1), "versions": [
                {**row, "accuracy_change_points": round(100 * (row["test_accuracy"] - parent_row["test_accuracy"]), 2),
                 "size_ratio": parent_row["stored_bytes"] / row["stored_bytes"],
                 "zipped_ratio": parent_row["zipped_bytes"] / row["zipped_bytes"],
                 "speedup_batch1": parent_row["latency_ms_p50_batch1"] / row["latency_ms_p50_batch1"],
                 "speedup_batch64": parent_row["latency_ms_p50_batch64"] / row["latency_ms_p50_batch64"]}
                for row in rows], "model": summary["model_name"], "version": summary["model_version"]}

        if "prune" in args.parts:
            result["prune"] = compress_job("jobs/fashion_cnn_prune.yaml")
            log("prune", result["prune"])
        if "structured" in args.parts:
            result["structured"] = compress_job("jobs/fashion_cnn_prune.yaml", "method.structured=true",
                                                "method.sparsities=[0.5]", "register.model_name=fashion-cnn-slim")
            log("structured", result["structured"])
        if "int8" in args.parts:
            result["int8"] = {"static": compress_job("jobs/fashion_cnn_int8.yaml"),
                              "dynamic": compress_job("jobs/fashion_cnn_int8.yaml", "method.mode=dynamic",
                                                      "register.model_name=fashion-cnn-int8-dynamic")}
            result["int8"]["served"] = serve_side_by_side(
                [f"fashion_mnist_cnn:{parent.details['model_version']}"]
                + [f"{r['model']}:{r['version']}" for r in (result["int8"]["static"], result["int8"]["dynamic"])],
                args.requests)
            log("int8", result["int8"])
        if "distill" in args.parts:
            result["distill"] = distill_against_scratch(args, parent)
            log("distill", result["distill"])
        if "distill_budget" in args.parts:
            result["distill_budget"] = distill_with_a_label_budget(args)
            log("distill_budget", result["distill_budget"])
    record.save(record.variant("compress", *(p for p in args.parts if args.parts != parser.get_default("parts"))),
                result)


def serve_side_by_side(models: list[str], requests: int) -> dict:
    """Both versions deployed at once, the same 28x28 image to each in turn."""
    import numpy as np
    from ray import serve

    from deepyard.data import load_splits
    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions

    image = load_splits("fashion_mnist", {}, val_fraction=0.08, test_fraction=0.0, seed=0).x_test[0]
    body = {"instances": [np.asarray(image).tolist()]}
    infos = deploy.start([EndpointOptions(model=model, num_cpus=0.5) for model in models], host="127.0.0.1",
                         port=record.free_port())
    try:
        served = {model: served_p50(info["url"] + "/predict", body, requests) for model, info in zip(models, infos)}
        # a second pass in the other order: neither gets the warmer machine
        for model, info in reversed(list(zip(models, infos))):
            served[model] = min(served[model], served_p50(info["url"] + "/predict", body, requests))
    finally:
        serve.shutdown()
    fp32 = served[models[0]]
    return {"p50_ms": served, "over_fp32": {m: served[m] / fp32 for m in models[1:]}, "requests_each": 2 * requests}


def distill_against_scratch(args, parent) -> dict:
    from deepyard.runners import compress, train
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import load_spec, parse_spec

    teacher = f"fashion_mnist_cnn:{parent.details['model_version']}"
    runs = {"distilled": [], "scratch": []}
    for seed in args.seeds:
        spec = parse_spec({"kind": "compress", "name": "fashion_distill", "model": teacher,
                           "method": {"name": "distill", "student": STUDENT, "temperature": 4.0, "alpha": 0.7},
                           "optim": {"name": "adam", "lr": 0.001},
                           "train": {"epochs": args.distill_epochs, "batch_size": 128, "seed": seed}})
        runs["distilled"].append(compress.run(spec, RunOptions()).metrics["test_accuracy"])
        scratch = load_spec("jobs/fashion_mnist_cnn.yaml", [
            "name=fashion_student_scratch", f"model.name={STUDENT['name']}",
            f"model.params={STUDENT['params']}".replace("'", '"'), "optim.name=adam", "optim.lr=0.001",
            "optim.weight_decay=0", "optim.schedule.name=constant", f"train.epochs={args.distill_epochs}",
            f"train.seed={seed}", "data.seed=0", "register.enabled=false", "promote=null", "data.augment=null"])
        runs["scratch"].append(train.run(scratch, RunOptions()).metrics["test_accuracy"])
        print(f"distill seed {seed}: {runs['distilled'][-1]:.4f} vs scratch {runs['scratch'][-1]:.4f}", file=sys.stderr)
    mean = {name: sum(values) / len(values) for name, values in runs.items()}
    return {"student": STUDENT, "epochs": args.distill_epochs, "temperature": 4.0, "alpha": 0.7,
            "test_accuracy": runs, "mean_test_accuracy": mean,
            "test_errors_of_10000": {name: round((1 - value) * 10000) for name, value in mean.items()},
            "distilled_minus_scratch_points": round(100 * (mean["distilled"] - mean["scratch"]), 2)}


def distill_with_a_label_budget(args) -> dict:
    """The regime where a teacher has more to give: 10 labels per class (jobs/fashion_transfer.yaml,
    whose champion learned from a source model) and 27,550 training images without labels. The
    student learns the teacher's outputs on all of them; from scratch it has the 50 labels alone
    (given that job's 30 epochs and early stopping, its best)."""
    from deepyard.runners import compress, train
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import load_spec, parse_spec

    train.run(load_spec("jobs/fashion_source.yaml"), RunOptions())
    teacher = train.run(load_spec("jobs/fashion_transfer.yaml"), RunOptions())
    runs = {"distilled": [], "scratch": []}
    for seed in args.seeds:
        spec = parse_spec({"kind": "compress", "name": "fashion_budget_distill",
                           "model": f"fashion_transfer:{teacher.details['model_version']}",
                           "method": {"name": "distill", "student": STUDENT, "temperature": 4.0, "alpha": 0.7,
                                      "unlabeled": True},
                           "optim": {"name": "adam", "lr": 0.001},
                           "train": {"epochs": args.distill_epochs, "batch_size": 128, "seed": seed}})
        runs["distilled"].append(compress.run(spec, RunOptions()).metrics["test_accuracy"])
        scratch = load_spec("jobs/fashion_transfer.yaml", [
            "name=fashion_budget_scratch", "init=null", "optim.param_groups=[]", f"model.name={STUDENT['name']}",
            f"model.params={STUDENT['params']}".replace("'", '"'), f"train.seed={seed}", "data.seed=0",
            "register.enabled=false"])
        runs["scratch"].append(train.run(scratch, RunOptions()).metrics["test_accuracy"])
        print(f"budget seed {seed}: {runs['distilled'][-1]:.4f} vs scratch {runs['scratch'][-1]:.4f}", file=sys.stderr)
    mean = {name: sum(values) / len(values) for name, values in runs.items()}
    return {"student": STUDENT, "teacher_test_accuracy": teacher.metrics["test_accuracy"], "labels_per_class": 10,
            "epochs": {"distilled": args.distill_epochs, "scratch": "30, early stopping"},
            "test_accuracy": runs, "mean_test_accuracy": mean,
            "distilled_minus_scratch_points": round(100 * (mean["distilled"] - mean["scratch"]), 2)}


if __name__ == "__main__":
    main()
