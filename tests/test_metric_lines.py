"""A whole-job trial's metric lines reach MLflow through the driver (``runners/edges.py``): real MLflow,
the callback Tune calls with each result, and the trial's side as the training loop uses it."""

from __future__ import annotations

import json
from concurrent.futures import Future

import pytest

from deepyard import tracking
from deepyard.runners.edges import TO_LOG, _ToDriver, driver_logs


def _run_id() -> str:
    client = tracking.client()
    experiment = client.get_experiment_by_name("metric_lines") or client.get_experiment(
        client.create_experiment("metric_lines"))
    return client.create_run(experiment.experiment_id).info.run_id


def _opened(run_id: str) -> Future:
    done: Future = Future()
    done.set_result(run_id)
    return done


@pytest.mark.slow  # ~2.3 s of a core (MLflow writes): make test-fast skips it
def test_each_epoch_is_logged_once_and_a_killed_drivers_gap_is_filled_from_the_checkpoint():
    run_id = _run_id()
    tracking.log_metrics(run_id, {"epoch": 1, "train_loss": 1.0}, 1)  # what the killed driver had written
    callback = driver_logs(_opened(run_id))  # the --resume driver's

    # The trial goes on from a checkpoint of epoch 2 that the killed driver never heard of.
    trial = _ToDriver()
    trial({"resumed_from_epoch": 2}, 2)
    assert trial.after_restore([[1, {"epoch": 1, "train_loss": 9.0}], [2, {"epoch": 2, "train_loss": 0.8}]]) == 0
    trial({"epoch": 3, "train_loss": 0.5}, 3)
    callback.on_trial_result(1, [], None, {"score": 0.5, TO_LOG: json.dumps(trial.take())})
    assert trial.take() == []  # handed over once
    # A restart after epoch 3 was reported redoes it: its first values stand. Then the test line.
    callback.on_trial_result(2, [], None, {TO_LOG: json.dumps([[3, {"epoch": 3, "train_loss": 0.4}],
                                                               [3, {"test_accuracy": 0.9, "best_epoch": 3}]])})
    callback.on_trial_result(3, [], None, {"score": 0.5})  # (a result without lines)

    history = {key: tracking.metric_history(run_id, key) for key in ("train_loss", "resumed_from_epoch",
                                                                        "test_accuracy")}
    assert sorted(history["train_loss"]) == [(1, 1.0), (2, 0.8), (3, 0.5)]
    assert history["resumed_from_epoch"] == [(2, 2.0)] and history["test_accuracy"] == [(3, 0.9)]
    assert callback.failed == 0


def test_a_write_that_fails_is_counted_and_said_and_a_later_copy_can_still_fill_it(capsys, monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_WAIT_S", 0.001)  # (its tries, without ~3 s of waits between)
    callback = driver_logs(_opened("no-such-run"))
    callback.on_trial_result(1, [], None, {TO_LOG: json.dumps([[1, {"epoch": 1, "train_loss": 1.0}]])})
    assert callback.failed == 1 and "could not log step 1's metrics" in capsys.readouterr().err
    assert callback.logged_up_to == 0  # (not written: a restart's copy from the checkpoint is not dropped)
