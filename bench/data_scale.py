"""Streaming (Ray Data) against the in-memory path, on the same images.

    .venv/bin/python bench/data_scale.py [--repeats 2] [--epochs 3] [--samples 20000] [--folder DIR]

Fashion-MNIST is written once as an image folder (``DIR/train/<class>/*.png`` and ``DIR/test/...``,
70,000 PNGs; the official test split is ``test_path``). Each repeat runs, one after another, the
same CNN as a one-worker job on:
- the IDX files in memory, the worker holding both CPUs (what a user gets today: the baseline);
- the same, one CPU (the CPUs the streaming job's worker gets: the data path's own cost);
- the image folder streamed by Ray Data, one CPU for the worker and one for decoding.
Reports the median steady-state samples/s (epochs after the first), wall time per epoch and test
accuracy on the same 10,000 test images, and the ratios streaming / in memory. Then each one-CPU
variant once more on every training image (~57,000): the worker's peak RSS against ``--samples``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import record
from train_overhead import deepyard_job, medians

JOB = """
kind: train
name: data_scale
data: {{name: {data}, params: {params}, max_train_samples: {samples}, val_fraction: 0.05}}
model: {{name: cnn, params: {{channels: [16, 32], hidden_sizes: [64], dropout: 0.0}}}}
optim: {{name: adam, lr: 0.001}}
train: {{epochs: {epochs}, batch_size: 128, seed: 0}}
scaling: {{num_workers: 1, cpus_per_worker: {cpus}}}
register: {{enabled: false}}
"""


def write_fashion_folder(folder: Path) -> Path:
    """Fashion-MNIST's IDX arrays as PNG files, one folder per class name (written once)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    from PIL import Image

    from deepyard.data.idx import FASHION_MNIST_CLASSES, fashion_mnist

    raw = fashion_mnist()
    names = [name.replace("/", "-") for name in FASHION_MNIST_CLASSES]

    def write(split: str, images: np.ndarray, labels: np.ndarray) -> None:
        for name in names:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda item: Image.fromarray(item[1][0]).save(
                folder / split / names[labels[item[0]]] / f"{item[0]:05d}.png"), enumerate(images), chunksize=512))

    write("train", raw.x, raw.y)
    write("test", raw.x_test, raw.y_test)
    done.touch()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20000, help="training samples (both paths)")
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "deepyard-fashion-folder"))
    args = parser.parse_args()
    folder = write_fashion_folder(Path(args.folder))
    work = Path(tempfile.mkdtemp(prefix="deepyard-data-scale-"))
    specs = {}
    for variant, data, params, cpus in (
            ("in_memory_2cpu", "fashion_mnist", "{}", 2),
            ("in_memory_1cpu", "fashion_mnist", "{}", 1),
            ("streamed_1cpu", "image_folder", f"{{path: {folder}/train, test_path: {folder}/test}}", 1)):
        specs[variant] = work / f"{variant}.yaml"
        specs[variant].write_text(JOB.format(data=data, params=params, samples=args.samples, epochs=args.epochs,
                                             cpus=cpus))
    runs: dict[str, list[dict]] = {variant: [] for variant in specs}
    for repeat in range(args.repeats):
        for variant, spec in specs.items():
            runs[variant].append(deepyard_job(str(spec), str(work / f"{variant}{repeat}")))
        print(json.dumps({"repeat": repeat, **{name: round(done[-1]["wall_s"], 1) for name, done in runs.items()}}),
              file=sys.stderr)
    median = {name: medians(done) for name, done in runs.items()}

    # Memory as the data grows: the worker's peak RSS with every training image (~57,000: 5.7x) against 10,000.
    scale = {}
    for variant in ("in_memory_1cpu", "streamed_1cpu"):
        grown = work / f"{variant}_all.yaml"
        grown.write_text(specs[variant].read_text().replace(f"max_train_samples: {args.samples}",
                                                            "max_train_samples: 60000"))
        small = statistics.median(run["worker_peak_rss_mb"] for run in runs[variant])
        large = deepyard_job(str(grown), str(work / f"{variant}_all"))
        scale[variant] = {"peak_rss_mb_small": small, "peak_rss_mb_all": large["worker_peak_rss_mb"],
                          "ratio": large["worker_peak_rss_mb"] / small, "samples_per_s_all": large["samples_per_s"],
                          "test_accuracy_all": large["test_accuracy"]}

    def ratio(of: str, to: str) -> float:
        return statistics.median(a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs[of], runs[to]))

    record.save("data_scale", {
        "bench": "data_scale",
        "setup": {"data": "fashion_mnist: IDX in memory vs the same PNGs as an image folder (official test split "
                          "both ways)", "train_samples": args.samples, "epochs": args.epochs,
                  "model": "cnn [16, 32] + 64", "batch_size": 128, "cpus": os.cpu_count(), "repeats": args.repeats},
        "medians": median,
        "ratio_samples_per_s_streamed_vs_in_memory_2cpu": ratio("streamed_1cpu", "in_memory_2cpu"),
        "ratio_samples_per_s_streamed_vs_in_memory_1cpu": ratio("streamed_1cpu", "in_memory_1cpu"),
        "test_accuracy": {name: [round(run["test_accuracy"], 4) for run in done] for name, done in runs.items()},
        "peak_rss_all_training_images_vs_samples": scale,
    })


if __name__ == "__main__":
    main()
