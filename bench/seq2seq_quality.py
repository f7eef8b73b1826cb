"""Sequence to sequence: exact match on held-out dates and on SCAN's splits, and training throughput
next to a plain single-process PyTorch loop of the same model.

    .venv/bin/python bench/seq2seq_quality.py [--dates-epochs 12] [--scan-epochs 8] [--skip-scan]

1. plain: ``jobs/dates_t5.yaml``'s model, data, batch size and optimizer in a hand-written loop
   (random batches by index, no Ray, no tracking); target tokens/s after a warm-up.
2. deepyard: ``deepyard run jobs/dates_t5.yaml`` (a Tune trial, MLflow, checkpoints): test exact
   match on days never trained on, and each epoch's target tokens/s.
3. SCAN, simple and add_jump splits: the same model on word tokens; test exact match.

Goals (issue 17): dates >= 99% exact match, SCAN simple >= 99%; add_jump reported (plain seq2seq
models score about 1%); throughput deepyard/plain >= 0.9 (as the GPT's).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import record
from lm_shakespeare import plain_tokens_per_s
from train_overhead import deepyard_job

ROOT = Path(__file__).resolve().parents[1]
SCAN_JOB = """
kind: train
name: scan_{split}
data: {{name: scan, params: {{split: {split}}}, val_fraction: 0.05}}
model:
  name: transformer_seq2seq
  params: {{width: 128, layers: 2, heads: 4, dropout: 0.0, position_buckets: {buckets}}}
optim: {{name: adamw, lr: 0.002, weight_decay: 0.01, schedule: {{name: cosine, warmup_epochs: 0.2}}}}
train: {{epochs: {epochs}, batch_size: 64, grad_clip: 1.0}}
scaling: {{cpus_per_worker: 2}}
register: {{enabled: false}}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dates-epochs", type=int, default=12)
    parser.add_argument("--scan-epochs", type=int, default=8)
    parser.add_argument("--scan-buckets", type=int, default=128,
                        help="the SCAN model's position_buckets (32, T5's, tells apart only 16 offsets back)")
    parser.add_argument("--plain-steps", type=int, default=150)
    parser.add_argument("--skip-scan", action="store_true")
    parser.add_argument("--skip-dates", action="store_true")
    parser.add_argument("--scan-splits", nargs="+", default=["simple", "add_jump"])
    parser.add_argument("--tag", default="", help="saved as seq2seq_quality_<tag>.json (a partial run)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deepyard-seq2seq-"))
    saved_as, result = "seq2seq_quality" + (f"_{args.tag}" if args.tag else ""), {"bench": "seq2seq_quality"}
    if not args.skip_dates:
        from deepyard.spec.loading import load_spec

        dates_job = ROOT / "jobs/dates_t5.yaml"
        plain = plain_tokens_per_s(load_spec(dates_job), args.plain_steps)
        dates = deepyard_job(str(dates_job), str(work / "dates"), f"train.epochs={args.dates_epochs}",
                             "register.enabled=false")
        result["dates"] = {"epochs": args.dates_epochs, "wall_s": dates["wall_s"], "train_s": dates["train_s"],
                           **dates["test_metrics"]}
        result["tokens_per_s"] = {"plain": plain, "deepyard": dates.get("tokens_per_s"),
                                  "ratio": (dates.get("tokens_per_s") or 0.0) / plain}
        record.save(saved_as, result)  # (saved again as each part ends)
    if not args.skip_scan:
        for split in args.scan_splits:
            path = work / f"scan_{split}.yaml"
            path.write_text(SCAN_JOB.format(split=split, epochs=args.scan_epochs, buckets=args.scan_buckets))
            run = deepyard_job(str(path), str(work / split))
            result[f"scan_{split}"] = {"epochs": args.scan_epochs, "position_buckets": args.scan_buckets,
                                       "wall_s": run["wall_s"], **run["test_metrics"]}
            record.save(saved_as, result)


if __name__ == "__main__":
    main()
