"""The T5-like model's tied output layer: unscaled (today's, as GPT-2 and BERT tie theirs) against T5's
width^-0.5 scale (the design replaced), same data, same seed, same batches, in one process.

    .venv/bin/python bench/seq2seq_head.py [--data dates scan] [--steps 360 600]

T5 scales its tied head because its embedding starts at std 1; deepyard's starts at 0.02 (GPT-2's),
and with the scale the first logits were ~0.02 apart. Each run trains width 128, 2+2 layers, AdamW
2e-3, batches of 64, one thread, and scores 1,000 validation pairs every sixth of its steps (teacher
forced: loss in nats per target token, token accuracy, exact match of whole targets).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import record

SPEC = """
kind: train
name: seq2seq_head
data: {{name: {data}{params}}}
model: {{name: transformer_seq2seq, params: {{width: 128, layers: 2, heads: 4, dropout: 0.0}}}}
optim: {{name: adamw, lr: 0.002, weight_decay: 0.01}}
train: {{epochs: 1, batch_size: 64, grad_clip: 1.0, seed: 0}}
"""
PARAMS = {"dates": ", params: {samples: 20000}"}


def train(data: str, head: str, steps: int, home: str) -> dict:
    import torch

    from deepyard.optim import OPTIMIZERS
    from deepyard.runners.setup import build, load_data
    from deepyard.spec import load_spec

    path = Path(home) / f"{data}.yaml"
    path.write_text(SPEC.format(data=data, params=PARAMS.get(data, "")))
    spec = load_spec(str(path))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    splits = load_data(spec)
    model, task = build(spec, splits)
    if head == "t5_scaled":  # the replaced design's output layer, on this instance only
        net, unscaled = model.net, model.net.decode
        net.decode = lambda *args: unscaled(*args) * net.width ** -0.5
    optimizer = OPTIMIZERS.build("adamw", {}, parameters=model.parameters(), lr=2e-3, weight_decay=0.01)
    x, y = torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train)
    x_val, y_val = torch.from_numpy(splits.x_val[:1000]), torch.from_numpy(splits.y_val[:1000])
    batches = torch.Generator().manual_seed(0)
    curve, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(len(x), (64,), generator=batches)
        loss = task.loss(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % max(1, steps // 6) == 0:
            model.eval()
            with torch.no_grad():  # (the task's own scores: loss per target token, token accuracy, exact match)
                scores = task.metrics(task.batch_sums(model(x_val), y_val), "val")
            curve.append({"step": step, "val_loss": round(scores["val_loss"], 4),
                          "token_accuracy": round(scores["val_token_accuracy"], 4),
                          "exact_match": round(scores["val_exact_match"], 4)})
            model.train()
    return {"curve": curve, "train_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", nargs="+", default=["dates", "scan"])
    parser.add_argument("--steps", nargs="+", type=int, default=[360, 600], help="one per data set")
    args = parser.parse_args()
    home = record.fresh_home("seq2seq-head")
    result = {"setup": {"model": "transformer_seq2seq width 128, 2+2 layers", "batch_size": 64, "lr": 2e-3,
                        "threads": 1, "validation_pairs": 1000}, "runs": {}}
    for data, steps in zip(args.data, args.steps):
        runs = {head: train(data, head, steps, home) for head in ("unscaled", "t5_scaled")}
        last = {head: run["curve"][-1] for head, run in runs.items()}
        result["runs"][data] = {"steps": steps, **runs,
                                "val_loss_ratio_unscaled_vs_t5_scaled": round(
                                    last["unscaled"]["val_loss"] / last["t5_scaled"]["val_loss"], 3)}
    record.save("seq2seq_head", result)


if __name__ == "__main__":
    main()
