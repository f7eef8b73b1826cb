"""The user's own table: a CSV or Parquet file with a target column and feature columns of any
type (numbers, categories, booleans, gaps: ``data/tables.py``); and the bundled "arrests" table."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import PositiveInt

from deepyard.data.registry import DATASETS
from deepyard.data.splits import RawData
from deepyard.data.table_stream import TableStream, open_table
from deepyard.data.tables import ColumnOptions, check_columns, plan
from deepyard.errors import DataError

TableTask = Literal["classification", "regression"]


def read_table(path: str, columns: list[str], format: Literal["csv", "parquet"] = "csv"):
    """A CSV or Parquet file as a DataFrame that has ``columns``, or a DataError that says what is wrong."""
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{format} file {file} does not exist; set data.params.path to a readable file")
    try:
        table = pd.read_parquet(file) if format == "parquet" else pd.read_csv(file)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{file}: cannot be read as CSV: {error}") from None
    except (OSError, ValueError) as error:  # pyarrow: not a Parquet file (ArrowInvalid is a ValueError)
        raise DataError(f"{file}: cannot be read as {format}: {str(error)[:300]}") from None
    table.columns = [str(c) for c in table.columns]
    check_columns(table, columns, file, format)
    return table


def table_data(table, target: str, task: TableTask, where: str, *, features: list[str] | None = None,
               drop: list[str] = (), columns: dict[str, ColumnOptions] | None = None,
               max_onehot: int = 16) -> RawData:
    """A DataFrame -> RawData of raw cells and the plan that encodes them (fitted after the split)."""
    import pandas as pd

    if target in drop or target in (features or []):
        raise DataError(f"{where}: the target {target!r} cannot also be a feature or dropped")
    gaps = int(table[target].isna().sum())
    if gaps:
        raise DataError(f"{where}: the target {target!r} is missing in {gaps} rows; drop those rows first")
    table_plan = plan(table, target, features, list(drop), dict(columns or {}), max_onehot, where)
    cells = table[table_plan.sources].astype(object).to_numpy()
    if task == "classification":
        labels, y = np.unique(table[target].astype(str).str.strip().to_numpy(), return_inverse=True)
        return RawData(cells, y, task, class_names=[str(v) for v in labels], table=table_plan)
    if not pd.api.types.is_numeric_dtype(table[target]):
        raise DataError(f"{where}: regression target {target!r} must be numeric")
    return RawData(cells, table[target].to_numpy(dtype=np.float32), task, table=table_plan)


def _table(format: Literal["csv", "parquet"], path: str | list[str], target: str, features, task, drop, columns,
           max_onehot: int, split_key: str | None, test_path, stream: bool, split_seed: int, val_fraction: float,
           test_fraction: float) -> RawData | TableStream:
    """One local file is read into memory unless the spec streams it; a folder, a glob, a list of
    files or a bucket streams through Ray Data (``data/table_stream.py``)."""
    if stream or not isinstance(path, str) or "://" in path or not Path(path).expanduser().is_file():
        return open_table(format, path, target, features=features, task=task, drop=drop,
                          columns={name: ColumnOptions.model_validate(options) for name, options in columns.items()},
                          max_onehot=max_onehot, split_key=split_key, test_path=test_path, split_seed=split_seed,
                          val_fraction=val_fraction, test_fraction=test_fraction)
    for option, value in (("split_key", split_key), ("test_path", test_path)):
        if value is not None:
            raise DataError(f"data.params.{option}: applies to a streamed table; set data.stream: {{}} to stream "
                            f"{path} through Ray Data, or leave {option} out")
    table = read_table(path, [target] + list(features or []), format=format)
    return table_data(table, target, task, str(Path(path).expanduser()), features=features, drop=drop,
                      columns=columns, max_onehot=max_onehot)


@DATASETS.register("csv")
def csv(
    path: str | list[str],  # a file; or, streamed through Ray Data: a folder, a glob, a list of files, s3://...
    target: str,
    features: list[str] | None = None,  # None: every other column but those dropped
    task: TableTask = "classification",
    drop: list[str] = [],  # noqa: B006  (read-only default, part of the schema): identifiers, leaks
    columns: dict[str, ColumnOptions] = {},  # noqa: B006  name -> {type, encoding}: overrides inference
    max_onehot: PositiveInt = 16,  # categorical columns with more categories are embedded
    split_key: str | None = None,  # streamed: a row's split follows this column's hash (default: the whole row's)
    test_path: str | list[str] | None = None,  # streamed: files held out as the test split
    *,
    stream: bool = False, split_seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
) -> RawData | TableStream:
    return _table("csv", path, target, features, task, drop, columns, max_onehot, split_key, test_path, stream,
                  split_seed, val_fraction, test_fraction)


@DATASETS.register("parquet")
def parquet(
    path: str | list[str],
    target: str,
    features: list[str] | None = None,
    task: TableTask = "classification",
    drop: list[str] = [],  # noqa: B006
    columns: dict[str, ColumnOptions] = {},  # noqa: B006
    max_onehot: PositiveInt = 16,
    split_key: str | None = None,
    test_path: str | list[str] | None = None,
    *,
    stream: bool = False, split_seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
) -> RawData | TableStream:
    return _table("parquet", path, target, features, task, drop, columns, max_onehot, split_key, test_path, stream,
                  split_seed, val_fraction, test_fraction)


@DATASETS.register("arrests")
def arrests(drop: list[str] = [], columns: dict[str, ColumnOptions] = {}) -> RawData:  # noqa: B006
    """5,226 people arrested in Toronto for simple possession of marijuana (1997-2002): was each
    released with a summons (about 83% were)? With colour, sex, age, employment, citizenship and
    the number of police databases they appeared in. The file ships inside scikit-lego."""
    import pandas as pd

    from deepyard.data.packaged import package_file

    table = pd.read_csv(package_file("sklego", "data/arrests.zip", "scikit-lego"))
    return table_data(table, "released", "classification", "data arrests", drop=drop, columns=columns)
