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


def latency_ms(module: nn.Module, example: torch.Tensor, batch: int, *, repeats: int = 30,
               budget_s: float = 5.0) -> float:
    """Median milliseconds of one forward pass at ``batch`` on this CPU, after a warm-up."""
    inputs = example[torch.arange(batch) % len(example)]
    timings = []
    with torch.inference_mode():
        for _ in range(3):
            module(inputs)
        deadline = time.perf_counter() + budget_s
        while len(timings) < repeats and (len(timings) < 5 or time.perf_counter() < deadline):
            started = time.perf_counter()
            module(inputs)
            timings.append(1000 * (time.perf_counter() - started))
    return statistics.median(timings)


def profile(module: nn.Module, example: torch.Tensor, float_module: nn.Module | None = None) -> dict[str, float]:
    """Size and CPU latency of a serving module; ``float_module``: the float model a quantized one came
    from (its parameter count)."""
    counted = float_module if float_module is not None else module
    size, zipped = stored_bytes(module)
    return {"parameters": parameters(counted), "nonzero_parameters": nonzero_parameters(counted),
            "stored_bytes": size, "zipped_bytes": zipped,
            "latency_ms_p50_batch1": latency_ms(module, example, 1),
            "latency_ms_p50_batch64": latency_ms(module, example, 64)}
