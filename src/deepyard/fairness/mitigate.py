"""Mitigation by post-processing: fairlearn's ThresholdOptimizer fitted on the validation split's
probabilities, then baked into a servable module (``FairDecisions``) that applies its per-group
randomized thresholds. The groups come from the request, so the endpoint needs the sensitive
columns; the model itself is the trained one, unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn


class _Scores(ClassifierMixin, BaseEstimator):
    """A "prefit classifier" whose input is already its score: ThresholdOptimizer thresholds the
    served model's probability of the favourable class, computed once, not the features."""

    def __init__(self):
        self.classes_ = np.array([0, 1])  # (fitted: scikit-learn looks for an attribute ending in "_")

    def fit(self, x, y):
        return self

    def predict_proba(self, x) -> np.ndarray:
        score = np.asarray(x, dtype=float)[:, 0]
        return np.stack([1 - score, score], axis=1)


def fit_thresholds(scores: np.ndarray, favourable: np.ndarray, groups: np.ndarray, *, constraint: str,
                   objective: str):
    """A fitted ThresholdOptimizer on scores (probability of the favourable class) and 0/1 outcomes."""
    from fairlearn.postprocessing import ThresholdOptimizer

    optimizer = ThresholdOptimizer(estimator=_Scores(), constraints=constraint, objective=objective,
                                   prefit=True, predict_method="predict_proba")
    return optimizer.fit(scores[:, None], favourable, sensitive_features=groups)


def rules(optimizer, keys: list[str]) -> dict[str, list[float]]:
    """The optimizer's rule per group (in ``keys`` order) as arrays: with probability p0 decide by
    ``score op0 t0``, else by ``score op1 t1``; then, with probability p_ignore, the constant instead."""
    table: dict[str, list[float]] = {name: [] for name in ("p0", "t0", "above0", "p1", "t1", "above1",
                                                             "p_ignore", "constant")}
    for key in keys:
        rule = optimizer.interpolated_thresholder_.interpolation_dict[key]
        for i in (0, 1):
            operation = rule[f"operation{i}"]
            table[f"p{i}"].append(float(rule[f"p{i}"]))
            table[f"t{i}"].append(float(operation.threshold))
            table[f"above{i}"].append(float(operation.operator == ">"))
        table["p_ignore"].append(float(rule.get("p_ignore", 0.0)))
        table["constant"].append(float(rule.get("prediction_constant", 0.0)))
    return table


class FairDecisions(nn.Module):
    """Serving head of a mitigated version: features + a group code (last column) -> the
    probabilities of each decision under the group's thresholds ([unfavourable, favourable] in the
    class order). The endpoint draws each label from them (``Labels``), as ThresholdOptimizer does."""

    def __init__(self, serving: nn.Module, favourable: int, table: dict[str, list[float]]):
        super().__init__()
        self.serving, self.favourable = serving, favourable
        for name, values in table.items():  # float64: a threshold sits midway between two float32 scores
            self.register_buffer(name, torch.tensor(values, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.serving(x[:, :-1])[:, self.favourable].double()
        group = x[:, -1].long().clamp(0, len(self.p0) - 1)

        def decide(i: int) -> torch.Tensor:
            threshold, above = getattr(self, f"t{i}")[group], getattr(self, f"above{i}")[group]
            return torch.where(above > 0.5, score > threshold, score < threshold).float()

        chosen = self.p0[group] * decide(0) + self.p1[group] * decide(1)
        positive = self.p_ignore[group] * self.constant[group] + (1 - self.p_ignore[group]) * chosen
        columns = [1 - positive, positive] if self.favourable == 1 else [positive, 1 - positive]
        return torch.stack(columns, dim=1).float()


def draw_labels(probabilities: np.ndarray, instances: list[Any], favourable: int) -> np.ndarray:
    """Each instance's decision drawn from its probability, seeded by the instance itself: the same
    request gets the same answer, and over many people the rates are the optimizer's."""
    import hashlib
    import json

    labels = []
    for row, instance in zip(probabilities, instances):
        digest = hashlib.sha256(json.dumps(instance, sort_keys=True, default=str).encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        labels.append(favourable if draw < row[favourable] else 1 - favourable)
    return np.asarray(labels)
