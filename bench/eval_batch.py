"""Scoring on a CPU: seconds to score a job's validation split (up to 4,096 samples, untrained
model) in batches of 32 to 1024, the fastest of 3 interleaved rounds per size; and each size against
``CPU_EVAL_BATCH``, the size validation and test scoring use on a CPU.

    .venv/bin/python bench/eval_batch.py [JOB ...]   (names in jobs/, default: the CNN, the BERT-like
                                                      encoder and the char GPT)
"""

from __future__ import annotations

import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import record
from deepyard.runners.setup import CPU_EVAL_BATCH, build, load_data
from deepyard.spec import load_spec
from deepyard.tasks.base import evaluate_sums

SIZES = (32, 64, 128, 256, 1024)
ROUNDS = 3


def seconds_per_size(job: str) -> dict:
    spec = load_spec(record.ROOT / "jobs" / f"{job}.yaml")
    splits = load_data(spec)
    model, task = build(spec, splits)
    count = min(len(splits.x_val), 4096)
    samples = TensorDataset(torch.from_numpy(splits.x_val[:count]), torch.from_numpy(splits.y_val[:count]))
    times: dict[int, list[float]] = {size: [] for size in SIZES}
    for _ in range(ROUNDS):
        for size in SIZES:
            started = time.perf_counter()
            evaluate_sums(model, DataLoader(samples, batch_size=size), task, torch.device("cpu"))
            times[size].append(time.perf_counter() - started)
    fastest = {size: min(values) for size, values in times.items()}
    return {"samples": count, "seconds": {str(size): round(value, 3) for size, value in fastest.items()},
            "ratio_vs_default": {str(size): round(value / fastest[CPU_EVAL_BATCH], 3)
                                 for size, value in fastest.items()}}


def main() -> None:
    torch.set_num_threads(2)  # (as a 2-CPU worker runs)
    jobs = sys.argv[1:] or ["fashion_mnist_cnn", "rotten_tomatoes_bert", "shakespeare_gpt"]
    record.save("eval_batch", {"bench": "eval_batch", "default_batch": CPU_EVAL_BATCH, "rounds": ROUNDS,
                               "threads": 2, "jobs": {job: seconds_per_size(job) for job in jobs}})


if __name__ == "__main__":
    main()
