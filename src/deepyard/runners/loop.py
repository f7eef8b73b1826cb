"""Pieces of the training loop that have no Ray in them: a step, all-reduce, which epoch is best,
early stopping. (Evaluation is ``tasks.base.evaluate_sums``: the tasks score their test split with it.)"""

from __future__ import annotations

import math
from typing import Any

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


def _tied(value: float, best: float) -> bool:
    return math.isclose(value, best, rel_tol=1e-9, abs_tol=1e-12)


class Selection:
    """Which epoch is best: the monitored validation metric, and among epochs that tie on it (accuracy
    saturates at 1.0 on a small validation split), the lower ``tie_breaker`` (the validation loss):
    a later epoch with the same accuracy and a far lower loss is the better model. NaN never wins.

    Ray ranks the checkpoints it keeps by ``SCORE``, the same order as one number: the metric, moved
    by less than a billionth of its size towards the better tie-breaker."""

    SCORE = "selection_score"

    def __init__(self, metric: str, mode: str, tie_breaker: str | None):
        self.metric, self.mode = metric, mode
        self.tie_breaker = tie_breaker if tie_breaker != metric else None
        self.worst = -math.inf if mode == "max" else math.inf

    def of(self, metrics: dict[str, float]) -> dict[str, float | None]:
        return {"value": metrics[self.metric],
                "tie": metrics.get(self.tie_breaker) if self.tie_breaker else None}

    def better(self, value: float, tie: float | None, best_value: float | None, best_tie: float | None) -> bool:
        if math.isnan(value):
            return False
        if best_value is None or math.isnan(best_value):
            return True
        if not _tied(value, best_value):
            return value > best_value if self.mode == "max" else value < best_value
        return tie is not None and not math.isnan(tie) and (best_tie is None or tie < best_tie)

    def improved(self, metrics: dict[str, float], best: dict[str, Any]) -> bool:
        candidate = self.of(metrics)
        return self.better(candidate["value"], candidate["tie"], best["value"], best.get("tie"))

    def score(self, value: float, tie: float | None) -> float:
        if math.isnan(value) or not math.isfinite(value):
            return self.worst
        nudge = 0.0 if tie is None or not math.isfinite(tie) else 1e-9 * max(1.0, abs(value)) * tie / (1 + abs(tie))
        return value - nudge if self.mode == "max" else value + nudge

    def epoch_report(self, metrics: dict[str, float]) -> dict[str, float]:
        """What an epoch reports to Ray: its metrics and their selection score."""
        candidate = self.of(metrics)
        return {**metrics, self.SCORE: self.score(candidate["value"], candidate["tie"])}

    def final_report(self, best_value: float, best_tie: float | None, epoch: int) -> dict[str, float]:
        """The last report: the best epoch's value (what a sweep ranks the trial by) and its tie-breaker."""
        report = {self.metric: best_value, "final": 1, "epoch": epoch, self.SCORE: self.score(best_value, best_tie)}
        return report | ({"tie_breaker": best_tie} if best_tie is not None else {})


class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement of at least ``min_delta``; an epoch
    that ties the best value with a lower ``tie_breaker`` (validation loss) improves too."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float, tie_breaker: str | None = None):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.selection = Selection(metric, mode, tie_breaker)  # the same tie rule as the best epoch's
        self.best: float | None = None
        self.best_tie: float | None = None
        self.bad_epochs = 0

    def update(self, metrics: dict[str, float]) -> bool:
        candidate = self.selection.of(metrics)
        value, tie = candidate["value"], candidate["tie"]
        gain = (value - self.best if self.mode == "max" else self.best - value) if self.best is not None else None
        tie_won = (gain is not None and _tied(value, self.best)
                   and self.selection.better(value, tie, self.best, self.best_tie))
        if gain is None or gain > self.min_delta or tie_won:
            self.best, self.best_tie, self.bad_epochs = value, tie, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_tie": self.best_tie, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        self.best_tie = state.get("best_tie")
