"""Streamed tables (Ray Data) against the in-memory path, and memory as the table grows.

    .venv/bin/python bench/table_scale.py [--rows 400000] [--grow 10] [--repeats 2] [--epochs 3] [--dir DIR]
    .venv/bin/python bench/table_scale.py --only-fashion --before OLD/src [--repeats 3] --tag fashion

A synthetic table (32 numeric features, 10 classes from a noisy linear rule), written once as
Parquet in 8 parts at 1x rows and at ``--grow``x rows (the larger one bigger than the 1x job's
whole worker: see ``sizes``). Each repeat runs, one after another, the same MLP as a one-worker job on:
- the 1x table as one file read into memory, the worker holding both CPUs (the baseline);
- the same, one CPU (the CPUs the streaming job's worker gets);
- the 1x table streamed by Ray Data (``data.stream``), one CPU for the worker and one for Ray Data.
Then the streamed job once on the grown table: the worker's peak RSS at 10x against 1x. Last,
Fashion-MNIST's IDX in memory against the same pixels as a Parquet table streamed (784 columns,
its official test split as ``test_path``): accuracy and time per epoch. With ``--before``, each
streamed job also on another checkout's src (``PYTHONPATH``), interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

import record
from train_overhead import deepyard_job, medians

JOB = """
kind: train
name: table_scale
data: {{name: {data}, params: {params}, val_fraction: 0.05, test_fraction: 0.05{stream}}}
model: {{name: mlp, params: {{hidden_sizes: [{hidden}], dropout: 0.0}}}}
optim: {{name: adam, lr: 0.001}}
train: {{epochs: {epochs}, batch_size: 256, seed: 0}}
scaling: {{num_workers: 1, cpus_per_worker: {cpus}}}
register: {{enabled: false}}
"""
FEATURES, CLASSES, PARTS = 32, 10, 8


def write_table(folder: Path, rows: int) -> Path:
    """``rows`` rows in ``PARTS`` Parquet files (written once), and the same as one file."""
    done = folder / ".complete"
    if done.exists():
        return folder
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.random.default_rng(0).normal(size=(FEATURES, CLASSES))
    rng = np.random.default_rng(rows)
    for part in range(PARTS):
        x = rng.normal(size=(rows // PARTS, FEATURES)).astype(np.float32)
        y = (x @ weights + rng.gumbel(size=(len(x), CLASSES))).argmax(axis=1)
        columns = {f"f{index}": x[:, index] for index in range(FEATURES)}
        pq.write_table(pa.table({**columns, "label": y}), folder / f"part-{part}.parquet")
    done.touch()
    return folder


def write_fashion(folder: Path) -> Path:
    """Fashion-MNIST's pixels as Parquet tables (784 columns and the class name), train and test."""
    done = folder / ".complete"
    if done.exists():
        return folder
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepyard.data.idx import FASHION_MNIST_CLASSES, fashion_mnist

    raw = fashion_mnist()
    for split, images, labels in (("train", raw.x, raw.y), ("test", raw.x_test, raw.y_test)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        pixels = images.reshape(len(images), -1).astype(np.uint8)
        columns = {f"p{index}": pixels[:, index] for index in range(pixels.shape[1])}
        names = np.array(FASHION_MNIST_CLASSES)[labels]
        pq.write_table(pa.table({**columns, "item": names}), folder / split / "part-0.parquet")
    done.touch()
    return folder


def one_file(folder: Path) -> Path:
    """The parts as one Parquet file: what the in-memory path reads."""
    whole = folder.parent / f"{folder.name}.parquet"
    if not whole.exists():
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(folder), whole)
    return whole


def size_mb(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*.parquet")) / 2 ** 20


def synthetic(args, spec, work: Path, saved_as: str) -> dict:
    """The synthetic table: in memory against streamed at 1x, then the worker's memory at ``--grow``x."""
    small, grown = write_table(Path(args.dir) / f"rows{args.rows}", args.rows), None
    specs = {"in_memory_2cpu": spec("in_memory_2cpu", "parquet", f"{{path: {one_file(small)}, target: label}}", 2,
                                    False),
             "in_memory_1cpu": spec("in_memory_1cpu", "parquet", f"{{path: {one_file(small)}, target: label}}", 1,
                                    False),
             "streamed_1cpu": spec("streamed_1cpu", "parquet", f"{{path: {small}, target: label}}", 1, True)}
    envs = {variant: None for variant in specs}
    if args.before:  # the streamed job on another checkout too
        specs["streamed_1cpu_before"] = specs["streamed_1cpu"]
        envs["streamed_1cpu_before"] = {"PYTHONPATH": args.before}
    runs: dict[str, list[dict]] = {variant: [] for variant in specs}
    for repeat in range(args.repeats):
        for variant, path in specs.items():
            runs[variant].append(deepyard_job(str(path), str(work / f"{variant}{repeat}"), env=envs[variant]))
        print(json.dumps({"repeat": repeat, **{name: round(done[-1]["wall_s"], 1) for name, done in runs.items()}}),
              file=sys.stderr)

    def ratio(of: str, to: str) -> float:
        return statistics.median(a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs[of], runs[to]))

    result = {
        "bench": "table_scale",
        "setup": {"table": f"{FEATURES} float32 features, {CLASSES} classes, {PARTS} Parquet parts",
                  "rows_1x": args.rows, "grow": args.grow, "epochs": args.epochs, "model": "mlp 64",
                  "batch_size": 256, "cpus": os.cpu_count(), "repeats": args.repeats},
        "medians": {name: medians(done) for name, done in runs.items()},
        "ratio_samples_per_s_streamed_vs_in_memory_2cpu": ratio("streamed_1cpu", "in_memory_2cpu"),
        "ratio_samples_per_s_streamed_vs_in_memory_1cpu": ratio("streamed_1cpu", "in_memory_1cpu"),
        "test_accuracy": {name: [round(run["test_accuracy"], 4) for run in done] for name, done in runs.items()},
    }
    if args.before:
        result["ratio_samples_per_s_streamed_vs_before"] = ratio("streamed_1cpu", "streamed_1cpu_before")
        result["before"] = args.before
    record.save(saved_as, result)  # (saved again as each part ends: a later part's failure keeps these)
    if args.grow > 1:  # the worker's memory as the table grows
        grown = write_table(Path(args.dir) / f"rows{args.rows * args.grow}", args.rows * args.grow)
        grown_spec = str(spec("streamed_grown", "parquet", f"{{path: {grown}, target: label}}", 1, True))
        large = deepyard_job(grown_spec, str(work / "grown"), "train.epochs=1")
        at_1x = statistics.median(run["worker_peak_rss_mb"] for run in runs["streamed_1cpu"])
        in_memory_1x = statistics.median(run["worker_peak_rss_mb"] for run in runs["in_memory_1cpu"])
        result["memory"] = {
            "parquet_mb_1x": size_mb(small), "parquet_mb_grown": size_mb(grown),
            "float32_features_mb_grown": args.rows * args.grow * FEATURES * 4 / 2 ** 20,
            "worker_peak_rss_mb_streamed_1x": at_1x, "worker_peak_rss_mb_streamed_grown": large["worker_peak_rss_mb"],
            "ratio_peak_rss_grown_vs_1x": large["worker_peak_rss_mb"] / at_1x,
            "worker_peak_rss_mb_in_memory_1x": in_memory_1x,
            "samples_per_s_streamed_grown": large["samples_per_s"], "test_accuracy_grown": large["test_accuracy"],
            "stats_pass_s_grown": large["breakdown_s"].get("data_stats"),
        }
        if args.before:
            before = deepyard_job(grown_spec, str(work / "grown_before"), "train.epochs=1",
                                  env={"PYTHONPATH": args.before})
            at_1x_before = statistics.median(run["worker_peak_rss_mb"] for run in runs["streamed_1cpu_before"])
            result["memory"]["before"] = {
                "worker_peak_rss_mb_streamed_1x": at_1x_before,
                "worker_peak_rss_mb_streamed_grown": before["worker_peak_rss_mb"],
                "ratio_peak_rss_grown_vs_1x": before["worker_peak_rss_mb"] / at_1x_before,
                "samples_per_s_streamed_grown": before["samples_per_s"]}
        record.save(saved_as, result)
    return result


def fashion_runs(args, spec, work: Path, base: Path) -> dict:
    """Fashion's IDX in memory against its pixels as Parquet streamed (and streamed on ``--before``'s src)."""
    fashion = write_fashion(base / "fashion")
    pairs = {"idx_in_memory_1cpu": spec("fashion_idx", "fashion_mnist", "{}", 1, False, hidden=128),
             "parquet_streamed_1cpu": spec("fashion_parquet", "parquet", f"{{path: {fashion}/train, target: item, "
                                                                         f"test_path: {fashion}/test}}", 1, True,
                                           hidden=128)}
    variants = {name: (path, None) for name, path in pairs.items()}
    if args.before:
        variants["parquet_streamed_1cpu_before"] = (pairs["parquet_streamed_1cpu"], {"PYTHONPATH": args.before})
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats if args.before else 1):
        for name, (path, env) in variants.items():
            runs[name].append(deepyard_job(str(path), str(work / f"{name}{repeat}"), "train.epochs=5", env=env))
        print(json.dumps({"fashion repeat": repeat, **{name: round(done[-1]["wall_s"], 1)
                                                      for name, done in runs.items()}}), file=sys.stderr)
    keys = ("samples_per_s", "test_accuracy", "wall_s", "fixed_cost_s")
    out = {name: {**{key: statistics.median(run[key] for run in done) for key in keys},
                  "stats_pass_s": statistics.median(run["breakdown_s"].get("data_stats", 0.0) for run in done),
                  "repeats": len(done)} for name, done in runs.items()}

    def ratio(of: str, to: str, key: str) -> float:
        return statistics.median(a[key] / b[key] for a, b in zip(runs[of], runs[to]))

    out["ratio_samples_per_s_streamed_vs_idx"] = ratio("parquet_streamed_1cpu", "idx_in_memory_1cpu", "samples_per_s")
    if args.before:
        out["ratio_samples_per_s_streamed_vs_before"] = ratio("parquet_streamed_1cpu", "parquet_streamed_1cpu_before",
                                                              "samples_per_s")
        out["ratio_wall_s_streamed_vs_before"] = ratio("parquet_streamed_1cpu", "parquet_streamed_1cpu_before",
                                                       "wall_s")
        out["before"] = args.before
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400_000, help="rows of the 1x table")
    parser.add_argument("--grow", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "deepyard-table-scale"))
    parser.add_argument("--skip-fashion", action="store_true")
    parser.add_argument("--only-fashion", action="store_true", help="the Fashion comparison alone")
    parser.add_argument("--before", help="another checkout's src: its streamed jobs beside today's")
    parser.add_argument("--tag", default="", help="saved as table_scale_<tag>.json (a partial run beside the full one)")
    args = parser.parse_args()
    base, saved_as = Path(args.dir), "table_scale" + (f"_{args.tag}" if args.tag else "")
    work = Path(tempfile.mkdtemp(prefix="deepyard-table-scale-"))

    def spec(name: str, data: str, params: str, cpus: float, stream: bool, hidden: int = 64) -> Path:
        path = work / f"{name}.yaml"
        path.write_text(JOB.format(data=data, params=params, epochs=args.epochs, cpus=cpus, hidden=hidden,
                                   stream=", stream: {}" if stream else ""))
        return path

    result = {"bench": "table_scale"}
    if not args.only_fashion:
        result = synthetic(args, spec, work, saved_as)
    if not args.skip_fashion:
        result["fashion"] = fashion_runs(args, spec, work, base)
    record.save(saved_as, result)


if __name__ == "__main__":
    main()
