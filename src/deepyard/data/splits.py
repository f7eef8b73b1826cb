"""Deterministic splits and the shape metadata a model builder needs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from deepyard.errors import DataError

if TYPE_CHECKING:
    from deepyard.data.tables import TablePlan

Task = Literal["classification", "regression", "language_model", "seq2seq", "masked_language_model"]
TOKEN_TARGETS = ("language_model", "seq2seq", "masked_language_model")  # tasks whose targets are token ids

PAD, UNK = 0, 1  # token ids every vocabulary starts with
MASK, MASK_ID = "<mask>", 2  # a masked language model's hidden token, third in any vocabulary that has it


@dataclass
class RawData:
    """What a data set builder returns: features in their own units, and what they mean."""

    x: np.ndarray
    y: np.ndarray
    task: Task
    class_names: list[str] | None = None
    # A data set with an official test split (Fashion-MNIST) keeps it; others get one carved out.
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    feature_names: list[str] | None = None
    # Samples in time order (forecasting windows): split by position, the test span last.
    ordered: bool = False
    # Forecasting windows: what "nothing changes" predicts for a window ("last": its last value;
    # "zero": no change, on a differenced series). The baseline a forecast must beat.
    persistence: Literal["last", "zero"] | None = None
    season: int | None = None  # steps per season: the seasonal naive forecast repeats the value one season back
    # Ordered windows whose targets overlap the next ones' (a language model's stride < context):
    # this many are dropped at the end of the train and validation spans, so no target is in two splits.
    split_gap: int = 0
    # Text: ``x`` holds codes into this symbol table (the corpus's own encoding, 0 = padding). The
    # vocabulary the model sees is fitted later on the training split only (``fit_vocabulary``).
    symbols: list[str] | None = None
    min_count: int = 1  # a symbol seen fewer times in training becomes <unk>
    max_vocab: int | None = None
    join_with: str = ""  # how decoded tokens join back into text ("" for characters, " " for words)
    # A label budget: keep this many labelled training samples per class (seeded, stratified); the
    # rest of the training inputs stay as ``Splits.x_unlabeled`` (a distillation job may use them).
    labels_per_class: int | None = None
    # A table of mixed columns: ``x`` holds raw cells (objects), encoded after the split by a
    # schema fitted on the training rows (``fit_table``).
    table: TablePlan | None = None


def keep_classes(raw: RawData, classes: list[int] | None) -> RawData:
    """Only the samples of ``classes`` (indices into the data set's class names), relabelled 0..k-1
    in the order given: the other half of a data set is a new task for a transfer study."""
    if classes is None:
        return raw
    names = raw.class_names or []
    if len(set(classes)) != len(classes) or not classes:
        raise DataError(f"data.params.classes: {classes} must list distinct classes")
    if unknown := [c for c in classes if not 0 <= c < len(names)]:
        raise DataError(f"data.params.classes: {unknown} not in 0..{len(names) - 1} "
                        f"({', '.join(f'{i}={n}' for i, n in enumerate(names))})")
    relabel = np.full(len(names), -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))

    def subset(x: np.ndarray | None, y: np.ndarray | None):
        if x is None:
            return None, None
        kept = relabel[y] >= 0
        return x[kept], relabel[y[kept]]

    x, y = subset(raw.x, raw.y)
    x_test, y_test = subset(raw.x_test, raw.y_test)
    return replace(raw, x=x, y=y, x_test=x_test, y_test=y_test, class_names=[names[c] for c in classes])


def _label_budget(y: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (labelled, unlabelled) in ``y``: ``per_class`` of each class, drawn with ``rng``."""
    labelled = np.concatenate([rng.permutation(np.flatnonzero(y == label))[:per_class] for label in np.unique(y)])
    return np.sort(labelled), np.setdiff1d(np.arange(len(y)), labelled)


@dataclass
class Splits:
    task: Task
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    persistence: Literal["last", "zero"] | None = None
    season: int | None = None
    vocab: list[str] | None = None  # token data: id -> token, fitted on the training split
    join_with: str = ""
    x_unlabeled: np.ndarray | None = None  # training inputs whose labels a label budget withheld
    table: dict | None = None  # a mixed table: the fitted TableSchema, as JSON (it travels with the model)
    sensitive: list[str] | None = None  # columns fairness is measured over, kept out of the features
    groups: dict[str, np.ndarray] | None = None  # split -> each row's sensitive group (its display name)
    sensitive_values: dict[str, list] | None = None  # split -> each row's sensitive values, column by column
    pixel_max: float | None = None  # images: the brightest level (a PNG request's 255 maps to it); default: seen
    in_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.in_shape = tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.in_shape) == 3

    @property
    def streaming(self) -> bool:
        """Whether the samples stream from Ray Datasets (``data/streaming.py``) or are these arrays."""
        return False

    def size(self, split: str) -> int:
        return len(getattr(self, f"x_{split}"))

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y_train, minlength=self.num_outputs).astype(float)

    @property
    def is_text(self) -> bool:
        return self.vocab is not None

    @property
    def token_level(self) -> str:
        """"char" or "word": how the text was cut into tokens (and how served text is)."""
        return "char" if self.join_with == "" else "word"

    @property
    def num_outputs(self) -> int:
        if self.task in TOKEN_TARGETS:  # a token's logits over the vocabulary
            return len(self.vocab)
        if self.task == "classification":
            return len(self.class_names)
        return self.y_train.shape[1] if self.y_train.ndim == 2 else 1  # a forecast of several steps

    def input_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean and std fitted on the training split only: per channel for images, per feature otherwise.
        None for token ids, which are not standardized."""
        if self.is_text:
            return None
        axes = (0, 2, 3) if self.is_image else (0,)
        mean = self.x_train.mean(axis=axes, keepdims=True)[0]
        std = self.x_train.std(axis=axes, keepdims=True)[0]
        std = np.where(std < 1e-8, 1.0, std)
        for position, _ in self.embedded():  # category codes reach the embedding as they are
            mean[position], std[position] = 0.0, 1.0
        return mean.astype(np.float32), std.astype(np.float32)

    def embedded(self) -> list[tuple[int, int]]:
        """A table's embedded columns: (feature position, number of codes)."""
        from deepyard.data.tables import TableSchema

        return TableSchema.from_dict(self.table).embedded() if self.table else []

    def writable(self) -> "Splits":
        """These splits with arrays of their own: arrays from Ray's object store are read-only views
        of shared memory, which ``torch.from_numpy`` warns about and must never write into."""
        def own(value):
            if isinstance(value, np.ndarray) and not value.flags.writeable:
                return value.copy()
            if isinstance(value, dict):
                return {key: own(item) for key, item in value.items()}
            return value

        fields = self.__dataclass_fields__
        return replace(self, **{name: own(getattr(self, name)) for name in fields if fields[name].init})

    def target_stats(self) -> tuple[float, float]:
        if self.task != "regression":
            return 0.0, 1.0
        return float(self.y_train.mean()), float(max(self.y_train.std(), 1e-8))


def _split_indices(y: np.ndarray, fraction: float, rng: np.random.Generator, stratify: bool):
    """Indices (rest, held_out) with ``fraction`` held out; per class when stratified."""
    if fraction <= 0:
        return np.arange(len(y)), np.arange(0)
    groups = [np.flatnonzero(y == label) for label in np.unique(y)] if stratify else [np.arange(len(y))]
    held: list[np.ndarray] = []
    for members in groups:
        members = rng.permutation(members)
        held.append(members[: max(1, round(fraction * len(members)))])
    held_out = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(y)), held_out)
    return rest, held_out


def _check(raw: RawData) -> None:
    """Shapes and labels that would otherwise fail deep inside a worker."""
    pairs = [("x", raw.x, raw.y)] + ([("x_test", raw.x_test, raw.y_test)] if raw.x_test is not None else [])
    for name, x, y in pairs:
        if len(x) != len(y):
            raise DataError(f"{name} has {len(x)} samples but {len(y)} labels")
        if raw.task == "classification" and len(y):
            low, high = int(np.min(y)), int(np.max(y))
            if low < 0 or high >= len(raw.class_names or []):
                raise DataError(f"labels run from {low} to {high}, but the data set has "
                                f"{len(raw.class_names or [])} classes (for mnist_idx, set data.params.num_classes)")


def _check_values(raw: RawData) -> None:
    """Refused before training, not trained on: one class, or values that are not finite (a NaN
    loss and a registered model that answers nothing useful)."""
    if raw.task == "classification" and raw.symbols is None and len(raw.y):
        present = np.unique(raw.y)
        if len(present) < 2:
            name = (raw.class_names or [str(present[0])])[int(present[0])]
            raise DataError(f"the target has a single class ({name!r}); classification needs at least two")
    arrays = [("features", raw.x)] + ([("test features", raw.x_test)] if raw.x_test is not None else [])
    if raw.task == "regression":
        arrays.append(("the target", raw.y))
    for what, values in arrays:
        if not np.issubdtype(values.dtype, np.floating):
            continue
        bad = ~np.isfinite(values)
        if not bad.any():
            continue
        where = ""
        if what != "the target" and raw.feature_names and values.ndim == 2:
            columns = [raw.feature_names[i] for i in np.flatnonzero(bad.any(axis=0))]
            where = f" in column{'s' if len(columns) > 1 else ''} {', '.join(map(repr, columns[:5]))}"
        rows = np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))
        raise DataError(f"{what}: {len(rows)} row{'s' if len(rows) > 1 else ''} with values that are not finite "
                        f"(inf or NaN){where}, first at row {rows[0]}; fix or drop them first")


def _check_rows(raw: RawData, val_fraction: float, test_fraction: float) -> None:
    """Each split gets at least one row (of each class, where splits are stratified)."""
    needed = 1 + (val_fraction > 0) + (test_fraction > 0 and raw.x_test is None)
    if raw.task == "classification" and raw.symbols is None and len(raw.y):
        labels, counts = np.unique(raw.y, return_counts=True)
        if counts.min() < needed:
            smallest = int(labels[counts.argmin()])
            name = raw.class_names[smallest] if raw.class_names else smallest
            raise DataError(f"class {name!r} has {counts.min()} row{'s' if counts.min() > 1 else ''}; each class "
                            f"needs at least {needed}, one for each of the train, val and test splits; add rows or "
                            "leave the class out")
    elif len(raw.y) < needed:
        raise DataError(f"the data has {len(raw.y)} rows; it needs at least {needed} (one for each split)")


def make_splits(raw: RawData, *, val_fraction: float, test_fraction: float, seed: int,
                max_train_samples: int | None = None, vocab: list[str] | None = None) -> Splits:
    """``vocab``: token data is coded with this vocabulary (a pretrained model's) instead of one
    fitted on its training split."""
    rng = np.random.default_rng(seed)
    stratify = raw.task == "classification"
    _check(raw)
    _check_values(raw)
    if not raw.ordered:
        _check_rows(raw, val_fraction, test_fraction)
    if raw.ordered:
        splits = _ordered_splits(raw, val_fraction, test_fraction, max_train_samples)
        return fit_vocabulary(splits, raw, vocab) if raw.symbols is not None else splits

    x, y = raw.x, raw.y  # (inputs are converted once taken: a job of 12,000 of 60,000 images converts those)
    if raw.x_test is None:
        rest, test = _split_indices(y, test_fraction, rng, stratify)
        x_test, y_test, x, y = x[test], y[test], x[rest], y[rest]
    else:
        x_test, y_test = raw.x_test, raw.y_test
    train, val = _split_indices(y, val_fraction, rng, stratify)
    train = rng.permutation(train)
    unlabeled = np.arange(0)
    if raw.labels_per_class is not None:
        labelled, withheld = _label_budget(y[train], raw.labels_per_class, rng)
        train, unlabeled = rng.permutation(train[labelled]), train[withheld]
    if max_train_samples is not None:
        train = train[:max_train_samples]
    dtype = _target_dtype(raw)
    splits = Splits(
        task=raw.task,
        x_train=_inputs(raw, x[train]), y_train=y[train].astype(dtype),
        x_val=_inputs(raw, x[val]), y_val=y[val].astype(dtype),
        x_test=_inputs(raw, x_test), y_test=y_test.astype(dtype),
        class_names=raw.class_names,
        feature_names=raw.feature_names,
        x_unlabeled=_inputs(raw, x[unlabeled]) if len(unlabeled) else None,
    )
    if raw.table is not None:
        return fit_table(splits, raw.table)
    return fit_vocabulary(splits, raw, vocab) if raw.symbols is not None else splits


def _inputs(raw: RawData, x: np.ndarray) -> np.ndarray:
    if raw.table is not None:
        return x  # raw cells, encoded once the split is known
    return x.astype(np.int64) if raw.symbols is not None else x.astype(np.float32)


def fit_table(splits: Splits, table: TablePlan) -> Splits:
    """Encode a mixed table's splits with a schema fitted on the training rows only; keep each row's
    sensitive group (``table.sensitive``) aside for fairness metrics."""
    from deepyard.data.tables import category, group_key

    schema = table.fit(splits.x_train)
    groups, values = {}, {}
    for split in ("train", "val", "test"):
        cells = getattr(splits, f"x_{split}")
        if table.sensitive:
            sensitive = table.cells(cells, table.sensitive)
            groups[split] = np.array([group_key(row, table.sensitive) for row in sensitive], dtype=object)
            values[split] = [[category(cell) for cell in row] for row in sensitive]
        # (every cell was checked against its column's type before the split: encoding cannot fail)
        setattr(splits, f"x_{split}", _encoded(schema, table.cells(cells, table.names), table.names))
    splits.table, splits.feature_names = schema.to_dict(), schema.feature_names()
    if table.sensitive:
        splits.sensitive, splits.groups, splits.sensitive_values = list(table.sensitive), groups, values
    splits.in_shape = (schema.width,)
    return splits


def _encoded(schema, cells: np.ndarray, names: list[str]) -> np.ndarray:
    """A column at a time (``encode_frame``): cell by cell took most of a 400,000-row table's minute."""
    import pandas as pd

    return schema.encode_frame(pd.DataFrame(cells, columns=names)) if not schema.groups else schema.encode(cells)


def _target_dtype(raw: RawData):
    return np.float32 if raw.task == "regression" else np.int64


def _ordered_splits(raw: RawData, val_fraction: float, test_fraction: float,
                    max_train_samples: int | None) -> Splits:
    """Earliest span for training, then validation, then the most recent span for test."""
    n = len(raw.x)
    test_start = n - int(round(n * test_fraction))
    val_start = test_start - int(round(n * val_fraction))
    train_start = max(0, val_start - max_train_samples) if max_train_samples else 0  # the most recent ones
    x, y = _inputs(raw, raw.x), raw.y.astype(_target_dtype(raw))
    train_end, val_end = max(train_start, val_start - raw.split_gap), max(val_start, test_start - raw.split_gap)
    return Splits(task=raw.task, x_train=x[train_start:train_end], y_train=y[train_start:train_end],
                  x_val=x[val_start:val_end], y_val=y[val_start:val_end],
                  x_test=x[test_start:], y_test=y[test_start:], feature_names=raw.feature_names,
                  persistence=raw.persistence, season=raw.season)


def seasonal_naive_forecast(splits: Splits) -> np.ndarray | None:
    """Each test target's value one season before (for a differenced series, the change one season
    before); None without a season, with a season longer than the windows, or with a horizon
    longer than the season (the value one season back would itself be a target)."""
    horizon = splits.y_test.shape[1] if splits.y_test.ndim == 2 else 1
    lookback = splits.x_test.shape[1]
    if not splits.persistence or not splits.season or splits.season > lookback or horizon > splits.season:
        return None
    back = splits.x_test[:, lookback - splits.season: lookback - splits.season + horizon, 0]
    return back.reshape(splits.y_test.shape)


def persistence_forecast(splits: Splits) -> np.ndarray | None:
    """The naive forecast for each test window, every step ahead (None: not forecasting windows)."""
    if splits.persistence == "last":
        last = splits.x_test[:, -1, 0]
        return np.broadcast_to(last[:, None], splits.y_test.shape).copy() if splits.y_test.ndim == 2 else last
    if splits.persistence == "zero":
        return np.zeros_like(splits.y_test)
    return None


def fit_vocabulary(splits: Splits, raw: RawData, vocab: list[str] | None = None) -> Splits:
    """Re-code token data with a vocabulary fitted on the training inputs only: <pad>, <unk>, then
    the symbols seen at least ``min_count`` times, most frequent first. A symbol that only the
    validation or test data has becomes <unk>, as it would for text the model meets in serving.
    ``vocab``: a pretrained model's, kept as it is (its token ids are what its embeddings learned),
    and then the symbols of this fit it lacks (new embeddings: Hugging Face's ``add_tokens``)."""
    targets_are_tokens = raw.task in TOKEN_TARGETS
    seen = splits.x_train.ravel()
    if targets_are_tokens and raw.task != "language_model":  # (tokens only ever targets: </s>, a masked word)
        seen = np.concatenate([seen, splits.y_train.ravel()])
    counts = np.bincount(seen, minlength=len(raw.symbols))
    counts[PAD] = 0
    kept = [code for code in np.argsort(-counts, kind="stable") if counts[code] >= raw.min_count and code > UNK]
    kept = kept[: raw.max_vocab - 2] if raw.max_vocab else kept
    if MASK in raw.symbols:  # at MASK_ID, where the model looks for it
        mask = raw.symbols.index(MASK)
        kept = [mask] + [code for code in kept if code != mask]
    fitted = [raw.symbols[code] for code in kept]
    if vocab is not None:
        known = set(vocab)
        splits.vocab = list(vocab) + [symbol for symbol in fitted if symbol not in known]
    else:
        splits.vocab = ["<pad>", "<unk>"] + fitted
    position = {symbol: code for code, symbol in enumerate(splits.vocab)}
    recode = np.array([position.get(symbol, UNK) for symbol in raw.symbols], dtype=np.int64)
    recode[PAD] = PAD
    splits.join_with = raw.join_with
    for name in ("x_train", "x_val", "x_test") + (("y_train", "y_val", "y_test") if targets_are_tokens else ()):
        setattr(splits, name, recode[getattr(splits, name)])
    return splits
