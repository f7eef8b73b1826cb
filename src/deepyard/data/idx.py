"""MNIST-format IDX files: MNIST, Fashion-MNIST, KMNIST... read with numpy from a local directory."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from deepyard.data.registry import DATASETS
from deepyard.data.splits import RawData, keep_classes
from deepyard.data.subsets import ClassList, LabelBudget
from deepyard.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array: 2 zero bytes, a type code (0x08 = uint8), the rank, then big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path} cannot be read: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4].hex()})")
    rank = data[3]
    try:
        dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)
    except ValueError:
        raise DataError(f"{path} is truncated or corrupt: its header and its size disagree") from None


def _find(directory: Path, stem: str, how_to_get: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"{directory}: no {stem}[.gz] here. {how_to_get}")


def load_idx_dir(path: str, class_names: list[str], how_to_get: str, classes: list[int] | None = None,
                 labels_per_class: int | None = None) -> RawData:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist. {how_to_get}")
    arrays = {key: read_idx(_find(directory, stem, how_to_get)) for key, stem in _FILES.items()}
    as_images = lambda a: a.reshape(len(a), 1, *a.shape[1:])  # noqa: E731  (N, H, W) -> (N, 1, H, W)
    raw = RawData(as_images(arrays["train_images"]), arrays["train_labels"], "classification",
                  class_names=class_names, labels_per_class=labels_per_class,
                  x_test=as_images(arrays["test_images"]), y_test=arrays["test_labels"])
    return keep_classes(raw, classes)


@DATASETS.register("fashion_mnist")
def fashion_mnist(path: str = FASHION_MNIST_DIR, classes: ClassList = None,
                  labels_per_class: LabelBudget = None) -> RawData:
    """70,000 28x28 grey-scale clothing images in 10 classes, with the official 10,000-image test split."""
    return load_idx_dir(path, FASHION_MNIST_CLASSES,
                        "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
                        "or set data.params.path to a directory holding the four IDX files.",
                        classes, labels_per_class)


@DATASETS.register("mnist_idx")
def mnist_idx(path: str, num_classes: int = 10, classes: ClassList = None,
              labels_per_class: LabelBudget = None) -> RawData:
    """Any directory of MNIST-format IDX files (MNIST, KMNIST, Fashion-MNIST)."""
    return load_idx_dir(path, [str(c) for c in range(num_classes)],
                        "Point data.params.path at a directory with train-images-idx3-ubyte, "
                        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz).",
                        classes, labels_per_class)
