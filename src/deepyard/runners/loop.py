"""Pieces of the training loop that have no Ray in them: evaluation, all-reduce, early stopping."""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_sum(sums: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Sum per-worker metric sums over the worker group (a no-op on one worker)."""
    sums = torch.zeros(3) if sums is None else sums
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
    return sums.cpu()


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader, task, device: torch.device, confusion: bool = False):
    """Metric sums over ``loader`` (or the confusion matrix, for classification)."""
    model.eval()
    total = None
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs).float()
        part = task.confusion(outputs, targets) if confusion else task.batch_sums(outputs, targets)
        part = part.cpu()
        total = part if total is None else total + part
    return total


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
