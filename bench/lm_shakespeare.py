"""Character GPT on Shakespeare: validation loss within a time budget, and training throughput next
to a plain single-process PyTorch loop of the same model.

    .venv/bin/python bench/lm_shakespeare.py [--job jobs/shakespeare_gpt.yaml] [--plain-steps 150]

1. plain: the job's model, data, batch size, optimizer and thread count in a hand-written loop
   (random batches by index, no Ray, no DataLoader, no tracking); tokens/s over ``--plain-steps``
   steps after a warm-up.
2. deepyard: ``deepyard run`` of the job on a local Ray cluster (Ray Train, MLflow, checkpoints);
   tokens/s is each epoch's training throughput, and the wall time to the first epoch whose
   validation loss is at or below ``--target`` comes from the run's metric timestamps.

Prints one JSON object. Goals: validation loss <= 1.6 nats/char within 15 minutes; throughput
ratio deepyard/plain >= 0.9.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]


def plain_tokens_per_s(spec, steps: int, warmup: int = 10) -> float:
    import torch

    from deepyard.optim import OPTIMIZERS
    from deepyard.runners.setup import build, load_data

    torch.manual_seed(spec.train.seed)
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    splits = load_data(spec)
    model, task = build(spec, splits)
    optimizer = OPTIMIZERS.build(spec.optim.name, spec.optim.params, parameters=model.parameters(),
                                 lr=spec.optim.lr, weight_decay=spec.optim.weight_decay)
    x, y = torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train)
    size, tokens = spec.train.batch_size, 0
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            started, tokens = time.perf_counter(), 0
        index = torch.randint(len(x), (size,))
        tokens += int((y[index] != 0).sum())  # (targets that are not padding: every one of a text window's)
        loss = task.loss(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
        optimizer.step()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", default=str(ROOT / "jobs/shakespeare_gpt.yaml"))
    parser.add_argument("--plain-steps", type=int, default=150)
    parser.add_argument("--target", type=float, default=1.6, help="validation loss goal, nats per character")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deepyard-lm-bench-")
    os.environ["DEEPYARD_HOME"] = home
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    from deepyard import tracking
    from deepyard.runners.train import run
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import load_spec

    spec = load_spec(args.job)
    context = spec.data.params.get("context_length", 128)
    plain = plain_tokens_per_s(spec, args.plain_steps)

    started_ms = time.time() * 1000
    started = time.perf_counter()
    summary = run(spec, RunOptions()).to_json()
    wall = time.perf_counter() - started
    client = tracking.client()
    val_loss = client.get_metric_history(summary["run_id"], "val_loss")
    throughput = [m.value for m in client.get_metric_history(summary["run_id"], "tokens_per_s")]
    reached = [m for m in val_loss if m.value <= args.target]
    deepyard_tokens_per_s = sum(throughput) / len(throughput)
    job = Path(args.job).stem
    name = record.variant("lm_shakespeare", job != Path(parser.get_default("job")).stem and job,
                          args.target != parser.get_default("target") and f"target{args.target:g}")
    record.save(name, {
        "bench": "lm_shakespeare", "job": Path(args.job).name, "context_length": context,
        "batch_size": spec.train.batch_size, "cpus": spec.scaling.cpus_per_worker,
        "deepyard": {
            "wall_s": wall, "epochs": summary["epochs_run"],
            "val_loss_by_epoch": [m.value for m in val_loss],
            "best_val_loss_nats": min(m.value for m in val_loss),
            "best_val_bits_per_char": min(m.value for m in val_loss) / math.log(2),
            "test_loss_nats": summary["metrics"]["test_loss"],
            "test_bits_per_char": summary["metrics"]["test_bits_per_token"],
            "s_to_target": (reached[0].timestamp - started_ms) / 1000 if reached else None,
            "tokens_per_s_by_epoch": throughput, "tokens_per_s": deepyard_tokens_per_s,
            "timings": summary["timings"],
        },
        "plain_pytorch": {"tokens_per_s": plain, "steps": args.plain_steps},
        "tokens_per_s_ratio_deepyard_vs_plain": deepyard_tokens_per_s / plain,
        "target_val_loss_nats": args.target,
    })


if __name__ == "__main__":
    main()
