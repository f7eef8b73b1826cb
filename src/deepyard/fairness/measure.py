"""Per-group metrics and the disparities between groups, with bootstrap confidence intervals.

fairlearn's ``MetricFrame`` does the grouping; the disparities are its demographic parity
difference, equalized odds difference and demographic parity ratio (the disparate-impact ratio,
whose "four-fifths rule" threshold is 0.8). Rates are of the favourable outcome (``positive``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

DISPARITIES = ("demographic_parity_difference", "equalized_odds_difference", "disparate_impact_ratio")


@dataclass
class Report:
    overall: dict[str, float]
    by_group: dict[str, dict[str, float]]  # group -> metric -> value (count included)
    disparities: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # disparity -> (2.5%, 97.5%) over bootstrap resamples

    def flat(self, prefix: str) -> dict[str, float]:
        """MLflow metrics: ``<prefix>accuracy``, ``<prefix>equalized_odds_difference_ci_low``..."""
        out = {f"{prefix}{name}": value for name, value in {**self.overall, **self.disparities}.items()}
        for name, (low, high) in self.intervals.items():
            out.update({f"{prefix}{name}_ci_low": low, f"{prefix}{name}_ci_high": high})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"overall": self.overall, "by_group": self.by_group, "disparities": self.disparities,
                "intervals_95": {name: list(pair) for name, pair in self.intervals.items()}}


def report(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, positive: int | None, *,
           bootstrap: int, seed: int) -> Report:
    """Labels (class indices), each row's group, and the favourable class (None: accuracies only)."""
    from fairlearn.metrics import MetricFrame, count, false_positive_rate, selection_rate, true_positive_rate
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    metrics = {"count": count, "accuracy": accuracy_score, "balanced_accuracy": balanced_accuracy_score}
    truth, predicted = y_true, y_pred
    if positive is not None:  # rates of the favourable outcome: one against the rest
        metrics.update(selection_rate=selection_rate, true_positive_rate=true_positive_rate,
                       false_positive_rate=false_positive_rate)
        truth, predicted = (y_true == positive).astype(int), (y_pred == positive).astype(int)
    frame = MetricFrame(metrics={name: _on_labels(f, y_true, y_pred, truth, predicted, name)
                                 for name, f in metrics.items()},
                        y_true=np.arange(len(y_true)), y_pred=np.arange(len(y_true)), sensitive_features=groups)
    overall = {name: float(value) for name, value in frame.overall.items() if name != "count"}
    by_group = {str(group): {name: float(value) for name, value in row.items()}
                for group, row in frame.by_group.iterrows()}
    if positive is None:
        return Report(overall, by_group, {}, {})
    disparities = _disparities(truth, predicted, groups)
    intervals = {}
    if bootstrap:
        draws = resampled_disparities(truth, predicted, groups, bootstrap, seed)
        intervals = {name: tuple(float(q) for q in np.nanpercentile(draws[name], [2.5, 97.5])) for name in DISPARITIES}
    return Report(overall, by_group, disparities, intervals)


def resampled_disparities(truth: np.ndarray, predicted: np.ndarray, groups: np.ndarray, resamples: int,
                          seed: int) -> dict[str, np.ndarray]:
    """The disparities of ``resamples`` bootstrap resamples at once: each resample is a row of counts
    (how often each row was drawn), so a rate per group is a weighted mean. fairlearn's functions
    take ~25 ms a call, 15 s for 200 resamples; this takes milliseconds (the tests hold it to them)."""
    rng = np.random.default_rng(seed)
    chunks = [min(256, resamples - start) for start in range(0, resamples, 256)]  # (memory: chunk x rows)
    if len(chunks) > 1:
        parts = [resampled_disparities(truth, predicted, groups, size, int(rng.integers(2**32))) for size in chunks]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    weights = rng.multinomial(len(truth), np.full(len(truth), 1 / len(truth)), size=resamples).astype(float)
    names, codes = np.unique(groups.astype(str), return_inverse=True)
    member = np.eye(len(names))[codes]  # rows x groups
    predicted, truth = predicted.astype(float), truth.astype(float)

    def rate(hit: np.ndarray, among: np.ndarray) -> np.ndarray:  # resamples x groups
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights @ (member * (hit * among)[:, None])) / (weights @ (member * among[:, None]))

    selection = rate(predicted, np.ones_like(truth))
    tpr, fpr = rate(predicted, truth), rate(predicted, 1 - truth)

    def spread(values: np.ndarray) -> np.ndarray:
        return np.nanmax(values, axis=1) - np.nanmin(values, axis=1)

    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without one group's positives: NaN
        return {"demographic_parity_difference": spread(selection),
                "equalized_odds_difference": np.maximum(spread(tpr), spread(fpr)),
                "disparate_impact_ratio": np.nanmin(selection, axis=1) / np.nanmax(selection, axis=1)}


def _on_labels(metric, y_true, y_pred, truth, predicted, name: str):
    """A metric of row indices, so that one MetricFrame mixes label metrics and 0/1 rate metrics."""
    labels = name in ("accuracy", "balanced_accuracy", "count")
    actual, guessed = (y_true, y_pred) if labels else (truth, predicted)
    return lambda rows_true, rows_pred: metric(actual[rows_true], guessed[rows_pred])


def _disparities(truth: np.ndarray, predicted: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    from fairlearn.metrics import demographic_parity_difference, demographic_parity_ratio, equalized_odds_difference

    return {"demographic_parity_difference": float(demographic_parity_difference(truth, predicted,
                                                                                  sensitive_features=groups)),
            "equalized_odds_difference": float(equalized_odds_difference(truth, predicted, sensitive_features=groups)),
            "disparate_impact_ratio": float(demographic_parity_ratio(truth, predicted, sensitive_features=groups))}
