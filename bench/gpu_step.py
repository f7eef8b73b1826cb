"""The zoo's training steps on CUDA with bf16 autocast, against a plain PyTorch loop of the same model.

    python bench/gpu_step.py [--steps 200] [--batch-size 256] [--rounds 5] [--device cuda]

Needs PyTorch only (no Ray, no MLflow): deepyard's step is ``runners.loop.train_step`` on the
``Pipeline`` (in-graph standardization) with the task's loss and metric sums, exactly as the
workers run it; the baseline is the bare network with ``F.cross_entropy`` and the same optimizer.
Prints one JSON object; without a GPU it says so and measures nothing (``--device cpu`` forces a
CPU run, useful only as a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import record
import torch
import torch.nn.functional as F

from deepyard.models import MODELS
from deepyard.models.pipeline import Pipeline
from deepyard.runners.loop import train_step
from deepyard.tasks import make_task

ZOO = {  # name -> (input shape, params): Fashion-MNIST-sized images, 10 classes
    "perceptron": ((1, 28, 28), {}),
    "mlp": ((1, 28, 28), {"hidden_sizes": [512, 256]}),
    "cnn": ((1, 28, 28), {"channels": [32, 64], "hidden_sizes": [128]}),
    "cnn_lenet": ((1, 28, 28), {}),
    "cnn_resnet_small": ((1, 28, 28), {"width": 32}),
}


def _time(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _compare(plain_step, deepyard_step, steps: int, rounds: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of each, timed in alternating rounds (clock ramps and noise hit both alike)."""
    for step in (plain_step, deepyard_step):
        for _ in range(10):  # warm-up: cuDNN autotuning, allocator
            step()
    plain, deepyard = [], []
    for index in range(rounds):
        order = [(plain_step, plain), (deepyard_step, deepyard)]
        for step, times in order if index % 2 == 0 else order[::-1]:
            times.append(_time(step, steps, device))
    return statistics.median(plain), statistics.median(deepyard)


def measure(name: str, device: torch.device, steps: int, batch_size: int, rounds: int) -> dict:
    in_shape, params = ZOO[name]
    inputs = (torch.rand(batch_size, *in_shape, device=device) * 255).round()  # raw pixel values
    targets = torch.randint(0, 10, (batch_size,), device=device)
    use_amp = device.type == "cuda"

    torch.manual_seed(0)
    net = MODELS.build(name, params, in_shape=in_shape, num_outputs=10)
    pipeline = Pipeline(net, (torch.full((1, 1, 1), 72.9).numpy(), torch.full((1, 1, 1), 90.0).numpy())).to(device)
    task = make_task("classification", num_classes=10)
    optimizer = torch.optim.Adam(pipeline.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sums = []

    def deepyard_step():
        sums.append(train_step(pipeline, task, optimizer, scheduler, inputs, targets, use_amp=use_amp, grad_clip=None))

    torch.manual_seed(0)
    plain_net = MODELS.build(name, params, in_shape=in_shape, num_outputs=10).to(device)
    plain_optimizer = torch.optim.Adam(plain_net.parameters(), lr=1e-3)
    plain_inputs = (inputs - 72.9) / 90.0

    def plain_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = F.cross_entropy(plain_net(plain_inputs), targets)
        plain_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        plain_optimizer.step()

    plain_s, deepyard_s = _compare(plain_step, deepyard_step, steps, rounds, device)
    return {"plain_images_per_s": steps * batch_size / plain_s,
            "deepyard_images_per_s": steps * batch_size / deepyard_s,
            "ratio": plain_s / deepyard_s}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds; medians are compared")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu_step", "gpu": False,
                          "message": "no CUDA device here: nothing measured (run it on a GPU machine, "
                                     "or pass --device cpu for a smoke test)"}))
        return 0
    device = torch.device(args.device)
    results = {name: measure(name, device, args.steps, args.batch_size, args.rounds) for name in ZOO}
    # one result per batch size (and the CPU smoke test apart): bench/results/gpu_step_b256.json
    name = record.variant("gpu_step", device.type != "cuda" and device.type, f"b{args.batch_size}")
    record.save(name, {"bench": "gpu_step", "gpu": device.type == "cuda",
                       "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "dtype": "bf16 autocast" if device.type == "cuda" else "fp32", "batch_size": args.batch_size,
                       "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__, "results": results,
                       "min_ratio": min(r["ratio"] for r in results.values())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
