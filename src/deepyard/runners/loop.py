"""Pieces of the training loop that have no Ray in them: evaluation, all-reduce, early stopping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def reduce_sum(sums: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Sum per-worker metric sums over the worker group (a no-op on one worker)."""
    sums = torch.zeros(3, device=device) if sums is None else sums.to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return sums.cpu()


def train_step(model, task, optimizer, scheduler, inputs, targets, *, use_amp: bool,
               grad_clip: float | None) -> torch.Tensor:
    """One optimizer step (bf16 autocast on GPU when ``use_amp``); returns the batch's metric sums."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=use_amp):
        outputs = model(inputs)
        loss = task.loss(outputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # the global norm, against exploding gradients
    optimizer.step()
    scheduler.step()
    return task.batch_sums(outputs.detach(), targets, loss)  # stays on the device: no sync per step


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader, task, device: torch.device, confusion: bool = False):
    """(metric sums, confusion matrix or None) over ``loader``, in one pass."""
    model.eval()
    sums = matrix = None
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs).float()
        part = task.batch_sums(outputs, targets)
        sums = part if sums is None else sums + part
        if confusion:
            part = task.confusion(outputs, targets)
            matrix = part if matrix is None else matrix + part
    return (sums.cpu() if sums is not None else None), (matrix.cpu() if matrix is not None else None)


def improved(value: float, best: float | None, mode: str) -> bool:
    """Is ``value`` better than ``best``? NaN never is (a diverged epoch must not become the best)."""
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement of at least ``min_delta``."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def update(self, metrics: dict[str, float]) -> bool:
        value = metrics[self.metric]
        gain = (value - self.best if self.mode == "max" else self.best - value) if self.best is not None else None
        if gain is None or gain > self.min_delta:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
