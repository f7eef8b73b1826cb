"""Data sets bundled with scikit-learn: no download, ever.

Importing scikit-learn takes 3-4 s on a small machine, and every training process would pay it for a
few hundred kilobytes of arrays: the first load on a machine keeps them in ``$DEEPYARD_HOME/cache``,
keyed by scikit-learn's version, and later loads (each job's worker) read that copy instead.
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from deepyard.data.registry import DATASETS
from deepyard.data.splits import RawData, keep_classes
from deepyard.data.subsets import ClassList, LabelBudget


def _bundled(loader: str, keys: tuple[str, ...], **kwargs) -> dict[str, np.ndarray]:
    """``sklearn.datasets.<loader>(**kwargs)``'s arrays named ``keys`` (names as str arrays)."""
    options = "".join(f"-{key}={value}" for key, value in sorted(kwargs.items()))
    cached = _cache_folder() / f"{loader}{options}-{metadata.version('scikit-learn')}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as saved:
                return {key: saved[key] for key in keys}
        except (OSError, KeyError, ValueError):  # unreadable: load it from scikit-learn again
            pass
    from sklearn import datasets

    bunch = getattr(datasets, loader)(**kwargs)
    arrays = {key: np.asarray(bunch[key], dtype=str if key.endswith("_names") else None) for key in keys}
    try:  # written whole, then renamed: a process reading it never sees half a file
        cached.parent.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".npz", delete=False) as file:
            np.savez(file, **arrays)
        os.replace(file.name, cached)
    except OSError:
        pass  # an unwritable home (refused before a job starts; `validate` still works): no copy
    return arrays


def _cache_folder() -> Path:
    from deepyard import settings
    from deepyard.errors import BadInput

    try:
        return settings.home() / "cache"
    except BadInput:
        return Path(os.environ.get("DEEPYARD_HOME", ".deepyard")) / "cache"  # unwritable: read, never written


@DATASETS.register("digits")
def digits(classes: ClassList = None, labels_per_class: LabelBudget = None) -> RawData:
    """1,797 8x8 grey-scale handwritten digits, pixel values 0-16, as (1, 8, 8) images."""
    bunch = _bundled("load_digits", ("images", "target"))
    raw = RawData(bunch["images"].reshape(-1, 1, 8, 8), bunch["target"], "classification",
                  class_names=[str(d) for d in range(10)], labels_per_class=labels_per_class)
    return keep_classes(raw, classes)


def _table(loader: str) -> dict[str, np.ndarray]:
    return _bundled(loader, ("data", "target", "target_names", "feature_names"))


@DATASETS.register("breast_cancer")
def breast_cancer() -> RawData:
    """569 tumours, 30 measurements each, malignant or benign."""
    bunch = _table("load_breast_cancer")
    return RawData(bunch["data"], bunch["target"], "classification",
                   class_names=[str(n) for n in bunch["target_names"]],  # plain str: numpy's do not serialize
                   feature_names=[str(n) for n in bunch["feature_names"]])


@DATASETS.register("wine")
def wine() -> RawData:
    """178 wines, 13 chemical measurements, 3 cultivars."""
    bunch = _table("load_wine")
    return RawData(bunch["data"], bunch["target"], "classification",
                   class_names=[str(n) for n in bunch["target_names"]],
                   feature_names=[str(n) for n in bunch["feature_names"]])


@DATASETS.register("diabetes")
def diabetes() -> RawData:
    """442 patients, 10 baseline variables, disease progression after one year (regression)."""
    bunch = _bundled("load_diabetes", ("data", "target", "feature_names"), scaled=False)
    return RawData(bunch["data"], bunch["target"], "regression", feature_names=[str(n) for n in bunch["feature_names"]])
