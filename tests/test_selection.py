"""Which epoch (and which trial) is best: ties on the monitored metric go to the lower validation loss."""

from __future__ import annotations

import math

from deepyard.runners.loop import EarlyStopping, Selection
from deepyard.runners.sweep import best_trial


def epochs(*rows):
    return [{"val_accuracy": accuracy, "val_loss": loss} for accuracy, loss in rows]


def pick(selection: Selection, history: list[dict]) -> int:
    best = {"value": None, "tie": None, "epoch": 0}
    for epoch, metrics in enumerate(history, 1):
        if selection.improved(metrics, best):
            best = {**selection.of(metrics), "epoch": epoch}
    return best["epoch"]


def test_a_saturated_accuracy_picks_the_epoch_with_the_lowest_loss():
    history = epochs((0.9, 0.8), (1.0, 0.5), (1.0, 0.2), (1.0, 0.3), (0.97, 0.1))
    assert pick(Selection("val_accuracy", "max", "val_loss"), history) == 3
    assert pick(Selection("val_accuracy", "max", None), history) == 2  # without a tie-breaker: the earliest


def test_nan_never_wins_and_a_loss_metric_is_its_own_tie_breaker():
    assert pick(Selection("val_accuracy", "max", "val_loss"), epochs((math.nan, 0.1), (0.5, 0.9))) == 2
    selection = Selection("val_loss", "min", "val_loss")
    assert selection.tie_breaker is None
    assert pick(selection, epochs((0.5, 0.4), (0.6, 0.3), (0.7, 0.3))) == 2


def test_the_checkpoint_score_orders_like_the_selection():
    selection = Selection("val_accuracy", "max", "val_loss")
    scores = [selection.epoch_report(m)[Selection.SCORE] for m in epochs((1.0, 0.5), (1.0, 0.2), (0.99, 0.0))]
    assert scores[1] > scores[0] > scores[2]
    minimizing = Selection("val_rmse", "min", "val_loss")
    low, high = (minimizing.score(2.0, loss) for loss in (0.1, 0.9))
    assert low < high < 2.0 + 1e-6


def test_early_stopping_counts_a_tie_with_a_lower_loss_as_progress():
    stopper = EarlyStopping("val_accuracy", "max", patience=2, min_delta=0.0, tie_breaker="val_loss")
    stops = [stopper.update(m) for m in epochs((1.0, 0.5), (1.0, 0.4), (1.0, 0.3), (1.0, 0.35), (1.0, 0.36))]
    assert stops == [False, False, False, False, True]
    plain = EarlyStopping("val_accuracy", "max", patience=2, min_delta=0.0)
    assert [plain.update(m) for m in epochs((1.0, 0.5), (1.0, 0.4), (1.0, 0.3))] == [False, False, True]


def test_a_sweep_breaks_ties_between_trials_by_the_loss_of_their_best_epoch():
    trials = [{"run_id": "a", "best": 1.0, "tie": 0.4}, {"run_id": "b", "best": 1.0, "tie": 0.1},
              {"run_id": "c", "best": 0.9, "tie": 0.0}, {"run_id": "d", "best": 1.0, "tie": None}]
    assert best_trial(trials, "max")["run_id"] == "b"
    assert best_trial([{"run_id": "x", "best": 2.0, "tie": None}, {"run_id": "y", "best": 1.0, "tie": 5.0}],
                 "min")["run_id"] == "y"
