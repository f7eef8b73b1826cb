"""What a compressed version is tagged with, measured the same way for the parent beside it."""

from __future__ import annotations

import io
import statistics
import time
import zlib

import torch
from torch import nn


def parameters(module: nn.Module) -> int:
    """Weights and biases, counted in a float model (a quantized one packs its weights out of sight)."""
    return sum(p.numel() for p in module.parameters())


def nonzero_parameters(module: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in module.parameters())


def stored_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of the saved state dict, the same compressed with zlib): masked weights save no space
    until the file is compressed; removed units and int8 weights do."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    raw = buffer.getvalue()
    return len(raw), len(zlib.compress(raw, 1))


def latencies_ms(modules: list[nn.Module], example: torch.Tensor, batch: int, *, rounds: int = 15,
                 per_round: int = 3) -> list[float]:
    """Median milliseconds of one forward pass at ``batch`` on this CPU, per module, measured in
    alternating rounds after a warm-up, so that no module gets a quieter moment of the machine."""
    inputs = example[torch.arange(batch) % len(example)]
    samples: list[list[float]] = [[] for _ in modules]
    with torch.inference_mode():
        for module in modules:
            for _ in range(3):
                module(inputs)
        for _ in range(rounds):
            for timings, module in zip(samples, modules):
                for _ in range(per_round):
                    started = time.perf_counter()
                    module(inputs)
                    timings.append(1000 * (time.perf_counter() - started))
    return [statistics.median(timings) for timings in samples]


def profiles(modules: list[nn.Module], example: torch.Tensor,
             float_modules: list[nn.Module | None] | None = None) -> list[dict[str, float]]:
    """Size and CPU latency of each serving module, measured side by side; ``float_modules``: the
    float model a quantized one came from (its parameter count), None where it is the module itself."""
    float_modules = float_modules or [None] * len(modules)
    batch1, batch64 = latencies_ms(modules, example, 1), latencies_ms(modules, example, 64)
    rows = []
    for module, float_module, fast, batched in zip(modules, float_modules, batch1, batch64):
        counted = float_module if float_module is not None else module
        size, zipped = stored_bytes(module)
        rows.append({"parameters": parameters(counted), "nonzero_parameters": nonzero_parameters(counted),
                     "stored_bytes": size, "zipped_bytes": zipped,
                     "latency_ms_p50_batch1": fast, "latency_ms_p50_batch64": batched})
    return rows
