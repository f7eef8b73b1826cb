"""Data sets bundled with scikit-learn: no download, ever.

scikit-learn is imported inside each builder: it costs ~0.7 s, paid only by jobs that use it.
"""

from __future__ import annotations

from deepyard.data.registry import DATASETS
from deepyard.data.splits import RawData, keep_classes
from deepyard.data.subsets import ClassList, LabelBudget


@DATASETS.register("digits")
def digits(classes: ClassList = None, labels_per_class: LabelBudget = None) -> RawData:
    """1,797 8x8 grey-scale handwritten digits, pixel values 0-16, as (1, 8, 8) images."""
    from sklearn import datasets

    bunch = datasets.load_digits()
    raw = RawData(bunch.images.reshape(-1, 1, 8, 8), bunch.target, "classification",
                  class_names=[str(d) for d in range(10)], labels_per_class=labels_per_class)
    return keep_classes(raw, classes)


@DATASETS.register("breast_cancer")
def breast_cancer() -> RawData:
    """569 tumours, 30 measurements each, malignant or benign."""
    from sklearn import datasets

    bunch = datasets.load_breast_cancer()
    return RawData(bunch.data, bunch.target, "classification",
                   class_names=[str(n) for n in bunch.target_names],  # plain str: numpy's do not serialize
                   feature_names=[str(n) for n in bunch.feature_names])


@DATASETS.register("wine")
def wine() -> RawData:
    """178 wines, 13 chemical measurements, 3 cultivars."""
    from sklearn import datasets

    bunch = datasets.load_wine()
    return RawData(bunch.data, bunch.target, "classification",
                   class_names=[str(n) for n in bunch.target_names],  # plain str: numpy's do not serialize
                   feature_names=[str(n) for n in bunch.feature_names])


@DATASETS.register("diabetes")
def diabetes() -> RawData:
    """442 patients, 10 baseline variables, disease progression after one year (regression)."""
    from sklearn import datasets

    bunch = datasets.load_diabetes(scaled=False)
    return RawData(bunch.data, bunch.target, "regression", feature_names=list(bunch.feature_names))
