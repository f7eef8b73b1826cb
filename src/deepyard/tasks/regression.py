"""Regression: mean squared error on standardized targets; RMSE and MAE in the target's own units."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Rescale(nn.Module):
    """Serving head: predictions back in the target's units."""

    def __init__(self, pipeline: nn.Module, mean: float, std: float):
        super().__init__()
        self.pipeline = pipeline
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipeline(x).squeeze(-1) * self.std + self.mean


class Regression:
    name = "regression"
    monitor, monitor_mode = "val_rmse", "min"
    metric_names = ("loss", "rmse", "mae")

    def __init__(self, target_mean: float = 0.0, target_std: float = 1.0, **_: object):
        self.target_mean, self.target_std = target_mean, target_std

    def _standardized(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets - self.target_mean) / self.target_std

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs.squeeze(-1), self._standardized(targets))

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
        """[summed squared error, summed absolute error (standardized units), values predicted]."""
        error = (outputs.squeeze(-1).float() - self._standardized(targets)).detach()
        count = torch.full((), float(targets.numel()), device=outputs.device)  # every step ahead counts
        return torch.stack([(error**2).sum(), error.abs().sum(), count])

    def metrics(self, sums: torch.Tensor, prefix: str) -> dict[str, float]:
        squared, absolute, count = sums.tolist()
        count = max(count, 1.0)
        return {
            f"{prefix}_loss": squared / count,
            f"{prefix}_rmse": (squared / count) ** 0.5 * self.target_std,
            f"{prefix}_mae": absolute / count * self.target_std,
        }

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return Rescale(pipeline, self.target_mean, self.target_std)
