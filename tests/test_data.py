"""Data sets: deterministic disjoint splits, statistics from the training split only, local files only."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from deepyard.data import DATASETS, load_splits, make_splits
from deepyard.data.augment import random_affine
from deepyard.data.idx import read_idx
from deepyard.errors import DataError


def test_splits_are_deterministic_disjoint_and_stratified():
    a = load_splits("digits", {}, val_fraction=0.2, test_fraction=0.2, seed=3)
    b = load_splits("digits", {}, val_fraction=0.2, test_fraction=0.2, seed=3)
    c = load_splits("digits", {}, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert np.array_equal(a.x_val, b.x_val) and not np.array_equal(a.x_val, c.x_val)
    rows = lambda x: {r.tobytes() for r in x}  # noqa: E731
    assert len(a.x_train) + len(a.x_val) + len(a.x_test) == 1797
    assert not rows(a.x_test) & rows(a.x_val)
    assert set(np.unique(a.y_val)) == set(range(10))  # every class in every split
    assert a.in_shape == (1, 8, 8) and a.num_outputs == 10 and a.is_image


def test_input_statistics_come_from_the_training_split_only():
    splits = load_splits("wine", {}, val_fraction=0.2, test_fraction=0.2, seed=0)
    mean, std = splits.input_stats()
    assert np.allclose(mean, splits.x_train.mean(axis=0), rtol=1e-5)
    assert not np.allclose(mean, np.concatenate([splits.x_train, splits.x_test]).mean(axis=0), rtol=1e-5)
    assert std.shape == (13,) and (std > 0).all()


def test_splits_from_the_object_store_get_arrays_of_their_own():
    """A one-worker trial trains on the driver's splits, which Ray hands over as read-only views."""
    splits = load_splits("digits", {}, val_fraction=0.1, test_fraction=0.1, seed=0)
    splits.x_train.flags.writeable = False
    splits.groups = {"train": np.zeros(3)}
    splits.groups["train"].flags.writeable = False
    own = splits.writable()
    assert own.x_train.flags.writeable and own.groups["train"].flags.writeable
    assert np.array_equal(own.x_train, splits.x_train) and own.in_shape == splits.in_shape
    own.x_train[0] += 1
    assert not np.array_equal(own.x_train, splits.x_train)  # a copy: the store's memory is never written
    assert own.y_train is splits.y_train  # arrays that were writable already are not copied


def test_regression_targets_and_max_train_samples():
    splits = load_splits("diabetes", {}, val_fraction=0.1, test_fraction=0.1, seed=0, max_train_samples=50)
    assert splits.task == "regression" and splits.num_outputs == 1 and len(splits.x_train) == 50
    mean, std = splits.target_stats()
    assert 100 < mean < 200 and std > 10


def _write_idx(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def test_any_directory_of_idx_files_loads(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 6, 6)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 3)
    splits = load_splits("mnist_idx", {"path": str(tmp_path), "num_classes": 3}, val_fraction=0.25,
                         test_fraction=0.5, seed=0)
    assert splits.in_shape == (1, 6, 6) and len(splits.x_test) == 20 and len(splits.x_train) == 45
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz").tolist() == [i % 3 for i in range(20)]
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        DATASETS.build("mnist_idx", {"path": str(tmp_path)})


def test_csv_classification_and_regression(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("a,b,kind,price\n" + "".join(f"{i},{i * 2},{'xy'[i % 2]},{i * 1.5}\n" for i in range(40)))
    raw = DATASETS.build("csv", {"path": str(table), "target": "kind", "features": ["a", "b"]})
    splits = make_splits(raw, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert raw.class_names == ["x", "y"] and splits.in_shape == (2,) and splits.feature_names == ["a", "b"]
    raw = DATASETS.build("csv", {"path": str(table), "target": "price", "task": "regression"})
    splits = make_splits(raw, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert raw.task == "regression" and sorted(raw.y)[3] == pytest.approx(4.5)
    assert sorted(splits.feature_names) == ["a", "b", "kind=x", "kind=y"]  # a text column: a category
    with pytest.raises(DataError, match="regression target 'kind' must be numeric"):
        DATASETS.build("csv", {"path": str(table), "target": "kind", "task": "regression"})


def test_augmentation_keeps_shape_and_changes_pixels():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 8, 8)
    moved = random_affine(images, max_shift=0.2, max_rotation_deg=15)
    assert moved.shape == images.shape and not torch.allclose(moved, images)
    assert torch.allclose(random_affine(images, 0.0, 0.0), images, atol=1e-5)


def test_labels_beyond_the_class_count_and_truncated_files_are_data_errors(tmp_path):
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 4, 4)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 5)
    with pytest.raises(DataError, match="labels run from 0 to 4, but the data set has 3 classes"):
        load_splits("mnist_idx", {"path": str(tmp_path), "num_classes": 3}, val_fraction=0.2, test_fraction=0.2,
                    seed=0)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as stream:
        stream.write(bytes([0, 0, 8, 3]) + np.array([10, 4, 4], dtype=">u4").tobytes() + bytes(20))
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")


def test_forecasting_windows_stay_in_time_order():
    from deepyard.data import make_splits
    from deepyard.data.series import windows

    series = np.arange(100, dtype=np.float64)
    raw = windows(series, lookback=5)
    assert raw.x.shape == (95, 5, 1) and raw.ordered
    np.testing.assert_array_equal(raw.x[3, :, 0], [3, 4, 5, 6, 7])
    assert raw.y[3] == 8  # the value right after its window
    splits = make_splits(raw, val_fraction=0.2, test_fraction=0.2, seed=0)
    # train, then validation, then test: every test target comes after every validation target...
    assert splits.y_train.max() < splits.y_val.min() and splits.y_val.max() < splits.y_test.min()
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (57, 19, 19)
    recent = make_splits(raw, val_fraction=0.2, test_fraction=0.2, seed=0, max_train_samples=10)
    np.testing.assert_array_equal(recent.y_train, splits.y_train[-10:])  # ...and a cap keeps the most recent


def test_sunspots_loads_as_windows():
    from deepyard.data import DATASETS

    raw = DATASETS.build("sunspots", {"lookback": 11})
    assert raw.x.shape == (309 - 11, 11, 1) and raw.task == "regression"
    assert raw.y[0] == raw.x[1, -1, 0]  # the next window ends with this window's target


def test_co2_differenced_windows_are_weekly_changes():
    from deepyard.data import DATASETS

    levels = DATASETS.build("co2", {"lookback": 4, "difference": False})
    changes = DATASETS.build("co2", {"lookback": 4, "difference": True})
    assert not np.isnan(levels.x).any() and levels.x.shape == (2284 - 4, 4, 1)
    assert changes.x.shape == (2283 - 4, 4, 1)
    # the first change window holds the level differences of the first five weeks
    np.testing.assert_allclose(changes.x[0, :, 0], np.diff(np.append(levels.x[0, :, 0], levels.y[0])), atol=1e-4)


def test_seasonal_naive_forecast_repeats_the_value_one_season_back():
    from deepyard.data import make_splits
    from deepyard.data.series import windows
    from deepyard.data.splits import seasonal_naive_forecast

    series = np.tile([0.0, 1.0, 2.0, 3.0], 30)  # a season of 4 steps, repeated exactly
    splits = make_splits(windows(series, lookback=6, season=4), val_fraction=0.2, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(seasonal_naive_forecast(splits), splits.y_test)  # perfect on a pure cycle
    longer = make_splits(windows(series, lookback=3, season=4), val_fraction=0.2, test_fraction=0.2, seed=0)
    assert seasonal_naive_forecast(longer) is None  # the window does not reach one season back


def test_csv_series_sorts_by_time_and_fills_gaps(tmp_path):
    from deepyard.data import DATASETS
    from deepyard.errors import DataError

    path = tmp_path / "sales.csv"
    path.write_text("day,sales\n" + "\n".join(f"{day},{'' if day == 7 else day * 2}" for day in reversed(range(40))))
    raw = DATASETS.build("csv_series", {"path": str(path), "column": "sales", "lookback": 5, "time_column": "day"})
    assert raw.ordered and raw.x.shape == (35, 5, 1)
    np.testing.assert_allclose(raw.x[3, :, 0], [6, 8, 10, 12, 14])  # day 7 interpolated, in time order
    with pytest.raises(DataError, match="no column 'sale'; did you mean 'sales'"):
        DATASETS.build("csv_series", {"path": str(path), "column": "sale"})


def test_multi_step_windows_and_their_naive_forecasts():
    from deepyard.data import make_splits
    from deepyard.data.series import windows
    from deepyard.data.splits import persistence_forecast, seasonal_naive_forecast

    series = np.tile([0.0, 1.0, 2.0, 3.0], 30)
    raw = windows(series, lookback=6, season=4, horizon=3)
    assert raw.x.shape == (120 - 6 - 3 + 1, 6, 1) and raw.y.shape == (112, 3)
    np.testing.assert_array_equal(raw.y[0], series[6:9])  # the three values right after the window
    splits = make_splits(raw, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert splits.num_outputs == 3
    np.testing.assert_array_equal(seasonal_naive_forecast(splits), splits.y_test)  # exact on a pure cycle
    naive = persistence_forecast(splits)
    assert naive.shape == splits.y_test.shape and (naive == splits.x_test[:, -1:, 0]).all()
    assert seasonal_naive_forecast(make_splits(windows(series, lookback=6, season=4, horizon=5), val_fraction=0.2,
                                               test_fraction=0.2, seed=0)) is None  # horizon past a season


def test_multi_step_regression_scores_every_step_and_serves_lists():
    from deepyard.tasks import Regression

    task = Regression(target_mean=1.0, target_std=2.0)
    outputs, targets = torch.zeros(4, 3), torch.full((4, 3), 3.0)  # standardized error 1 everywhere
    metrics = task.metrics(task.batch_sums(outputs, targets), "test")
    assert metrics["test_rmse"] == pytest.approx(2.0) and metrics["test_mae"] == pytest.approx(2.0)
    served = Regression.codec.encode(np.array([[1.0, 2.0, 3.0]]), {"task": "regression"}, {}, None)
    assert served == [[1.0, 2.0, 3.0]]


@pytest.mark.slow  # two processes of their own
def test_scikit_learn_sets_load_from_the_homes_copy_without_importing_scikit_learn(tmp_path):
    """A training process reads the copies the first load kept: the same arrays, names and targets,
    without the seconds of importing scikit-learn."""
    import json
    import os
    import subprocess
    import sys

    load = ("import json, sys; from deepyard.data import DATASETS; "
            "raws = [DATASETS.get(name)() for name in ('digits', 'wine', 'breast_cancer', 'diabetes')]; "
            "print(json.dumps([[raw.x.tolist(), raw.y.tolist(), raw.class_names, raw.feature_names] for raw in raws]"
            " + ['sklearn' in sys.modules]))")
    env = {**os.environ, "DEEPYARD_HOME": str(tmp_path)}
    first, second = (json.loads(subprocess.run([sys.executable, "-c", load], env=env, check=True, text=True,
                                               capture_output=True).stdout) for _ in range(2))
    assert first[-1] and not second[-1]
    assert first[:-1] == second[:-1]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4
