"""The user's own table: a CSV file with a target column and numeric feature columns."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from deepyard.data.registry import DATASETS
from deepyard.data.splits import RawData
from deepyard.errors import DataError
from deepyard.registry import did_you_mean


def _check_column(column: str, columns: list[str], path: Path) -> None:
    if column not in columns:
        raise DataError(f"{path}: no column {column!r}{did_you_mean(column, columns)} (columns: {', '.join(columns)})")


def read_table(path: str, columns: list[str]):
    """A CSV file as a DataFrame that has ``columns``, or a DataError that says what is wrong."""
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"CSV file {file} does not exist; set data.params.path to a readable file")
    try:
        table = pd.read_csv(file)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{file}: cannot be read as CSV: {error}") from None
    known = [str(c) for c in table.columns]
    if len(known) == 1 and columns and columns[0] not in known:
        # One "column" is the file's whole first line: not echoed, since the file may hold a secret.
        raise DataError(f"{file}: one column only, not {columns[0]!r}; is it a comma-separated table with a "
                        "header row?")
    for column in columns:
        _check_column(column, known, file)
    return table


@DATASETS.register("csv")
def csv(
    path: str,
    target: str,
    features: list[str] | None = None,  # None: every other column
    task: Literal["classification", "regression"] = "classification",
) -> RawData:
    import pandas as pd  # ~0.25 s: paid only by CSV jobs

    table = read_table(path, [target] + list(features or []))
    file = Path(path).expanduser()
    features = features or [str(c) for c in table.columns if str(c) != target]
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise DataError(f"{file}: feature columns must be numeric; not numeric: {', '.join(non_numeric)}")
    if table[features + [target]].isna().any().any():
        raise DataError(f"{file}: missing values in the target or feature columns; fill or drop them first")
    x = table[features].to_numpy(dtype=np.float32)
    if task == "classification":
        labels, y = np.unique(table[target].astype(str).to_numpy(), return_inverse=True)
        return RawData(x, y, task, class_names=[str(v) for v in labels], feature_names=features)
    if not pd.api.types.is_numeric_dtype(table[target]):
        raise DataError(f"{file}: regression target {target!r} must be numeric")
    return RawData(x, table[target].to_numpy(dtype=np.float32), task, feature_names=features)
