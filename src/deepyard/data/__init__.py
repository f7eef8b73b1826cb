"""Data sets, one file per source. Each builder returns a ``RawData``; ``make_splits`` turns it
into deterministic train/val/test splits. Nothing here touches the network, Ray or MLflow."""

from deepyard.data.registry import DATASETS
from deepyard.data.splits import RawData, Splits, make_splits
from deepyard.data import csv_file, idx, series, sklearn_sets, text  # noqa: F401  (registers the builders)

__all__ = ["DATASETS", "RawData", "Splits", "make_splits", "load_splits"]


def load_splits(name: str, params: dict, *, val_fraction: float, test_fraction: float,
                seed: int, max_train_samples: int | None = None) -> Splits:
    raw = DATASETS.build(name, params)
    return make_splits(raw, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                       max_train_samples=max_train_samples)
