"""Regression (and forecasting, its windows of a series): mean squared error on standardized
targets; RMSE and MAE in the target's own units. A forecast is also scored against the naive
forecasts of the same test windows (persistence, seasonal naive).

Served: values in the target's units, a list per instance for a forecast of several steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepyard.serve.payloads import ArrayCodec
from deepyard.tasks.base import Supervised


class Rescale(nn.Module):
    """Serving head: predictions back in the target's units."""

    def __init__(self, pipeline: nn.Module, mean: float, std: float):
        super().__init__()
        self.pipeline = pipeline
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipeline(x).squeeze(-1) * self.std + self.mean


class Values(ArrayCodec):
    def encode(self, outputs: np.ndarray, metadata: dict[str, Any], body: dict, options: Any) -> list[Any]:
        values = np.asarray(outputs).reshape(len(outputs), -1)
        if values.shape[1] > 1:  # a forecast of several steps: one list per instance
            return [[float(v) for v in row] for row in values]
        return [float(value) for value in values[:, 0]]


class Regression(Supervised):
    name = "regression"
    directions = {"loss": "min", "rmse": "min", "mae": "min"}
    monitor = "val_rmse"
    shown = ("train_loss", "val_loss", "val_rmse", "val_mae")
    explains = "value"
    codec = Values()

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

    def outcome(self, serving: nn.Module, splits, final: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """Forecasting windows: RMSE and MAE of the naive forecasts on the same test windows, the
        model's ratio to each, and the test span plotted against the naive forecast."""
        if not splits.persistence:
            return {}, {}
        from deepyard import plots
        from deepyard.data.splits import persistence_forecast, seasonal_naive_forecast

        with torch.inference_mode():
            predicted = serving.eval()(torch.from_numpy(splits.x_test)).numpy()
        naive = persistence_forecast(splits)
        baselines = {"persistence": naive, "seasonal_naive": seasonal_naive_forecast(splits)}
        scores: dict[str, float] = {}
        for name, forecast in baselines.items():
            if forecast is None:
                continue
            error = forecast - splits.y_test
            scores[f"test_rmse_{name}"] = float(np.sqrt(np.mean(error**2)))
            scores[f"test_mae_{name}"] = float(np.mean(np.abs(error)))
            scores[f"test_rmse_vs_{name}"] = final["test"]["test_rmse"] / max(scores[f"test_rmse_{name}"], 1e-12)

        def first(values: np.ndarray) -> np.ndarray:  # the one-step-ahead forecasts
            return values[:, 0] if values.ndim == 2 else values

        figure = plots.forecast(first(splits.y_test), first(predicted), first(naive))
        return scores, {"plots/forecast.png": figure}

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return Rescale(pipeline, self.target_mean, self.target_std)
