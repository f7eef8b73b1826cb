"""Tables as users have them: numbers, categories, booleans and gaps.

A column's type is inferred from the whole table, or set in the spec (types are not statistics).
Everything learnt from values (fill values, category lists) is fitted on the training split only,
by ``TableSchema.fit``. The fitted schema is JSON: it travels with the registered model, and the
endpoint encodes each request's instances with it, exactly as the training rows were encoded.

Encoding, per column:
- numeric: the value; a gap becomes the training median, plus a 0/1 ``<name>_missing`` feature
  where the training split has gaps in that column;
- boolean (true/false, yes/no, 1/0): 0 or 1; a gap as for numbers, with the training mode;
- categorical: one-hot over the training categories (an unseen one: all zeros), or, above
  ``max_onehot`` categories, one code column that the model's embedding layer reads (0: unseen).
  A gap is a category of its own, ``<missing>``.
"""

from __future__ import annotations

import decimal
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from deepyard.errors import DataError
from deepyard.registry import did_you_mean

ColumnType = Literal["numeric", "boolean", "categorical", "drop"]
Encoding = Literal["onehot", "embedding"]
MISSING = "<missing>"
_TRUE = {"true", "yes", "y", "t", "1", "1.0"}
_FALSE = {"false", "no", "n", "f", "0", "0.0"}


class ColumnOptions(BaseModel):
    """A spec's word on one column (``data.params.columns.<name>``): overrides the inferred type."""

    model_config = ConfigDict(extra="forbid")
    type: ColumnType | None = None
    encoding: Encoding | None = None  # categorical only; default: by the number of categories


class CellError(ValueError):
    """One value does not fit its column's type: why, and where (row, column) once known."""

    def __init__(self, reason: str, row: int | None = None, column: str | None = None):
        super().__init__(reason)
        self.reason, self.row, self.column = reason, row, column

    def __str__(self) -> str:
        where = ", ".join(part for part in (f"column {self.column!r}" if self.column else "",
                                            f"row {self.row}" if self.row is not None else "") if part)
        return f"{where}: {self.reason}" if where else self.reason


def is_missing(cell: Any) -> bool:
    return cell is None or (isinstance(cell, float) and math.isnan(cell)) or _is_pandas_na(cell)


def _is_pandas_na(cell: Any) -> bool:
    return type(cell).__name__ in ("NAType", "NaTType")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(cell: Any) -> float:
    if isinstance(cell, (bool, np.bool_)):
        raise CellError(f"{cell!r} is true/false, not a number")
    if not isinstance(cell, (numbers.Real, decimal.Decimal, str)):
        raise CellError(f"a {type(cell).__name__} where a number is expected")
    try:
        value = float(cell)
    except (ValueError, OverflowError):  # (a JSON integer of 400 digits: OverflowError)
        raise CellError(f"{str(cell)[:40]!r} is not a number" if isinstance(cell, str)
                        else f"{str(cell)[:40]} is out of range") from None
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:  # (float32 would make it infinite)
        raise CellError(f"{str(cell)[:40]} is not a finite number (within +-3.4e38)")
    return value


def _boolean(cell: Any) -> float:
    if isinstance(cell, (bool, np.bool_)):
        return float(cell)
    text = str(cell).strip().lower() if isinstance(cell, (str, int, float, np.integer, np.floating)) else None
    if text in _TRUE:
        return 1.0
    if text in _FALSE:
        return 0.0
    raise CellError(f"{cell!r} is not a boolean (true/false, yes/no or 1/0)")


def category(cell: Any) -> str:
    """A cell as its category's name: strings stripped; 3 and 3.0 (integer codes read with gaps) alike."""
    if is_missing(cell):
        return MISSING
    if isinstance(cell, (bool, np.bool_)):
        return str(bool(cell))
    if isinstance(cell, (float, np.floating)) and float(cell).is_integer():
        return str(int(cell))
    if isinstance(cell, (str, int, float, np.integer, np.floating)):
        return str(cell).strip()
    raise CellError(f"a {type(cell).__name__} where a category (a string or a number) is expected")


@dataclass
class Column:
    """One input column, fitted: how its raw values become features."""

    name: str
    type: Literal["numeric", "boolean", "categorical"]
    fill: float = 0.0  # numeric, boolean: a gap's value (the training median, or mode)
    indicator: bool = False  # a 0/1 feature that says the value was missing
    categories: list[str] = field(default_factory=list)  # categorical: training categories, most frequent first
    encoding: Encoding | None = None

    @property
    def width(self) -> int:
        if self.type != "categorical":
            return 1 + self.indicator
        return len(self.categories) if self.encoding == "onehot" else 1

    def feature_names(self) -> list[str]:
        if self.type != "categorical":
            return [self.name] + ([f"{self.name}_missing"] if self.indicator else [])
        if self.encoding == "onehot":
            return [f"{self.name}={value}" for value in self.categories]
        return [self.name]

    def encode(self, cells: np.ndarray) -> np.ndarray:
        """Raw cells -> (n, width) features; a cell of the wrong type raises CellError naming its row."""
        out = np.zeros((len(cells), self.width), dtype=np.float32)
        if self.type == "categorical":
            index = {value: i for i, value in enumerate(self.categories)}
            for row, cell in enumerate(cells):
                code = index.get(_at(row, category, cell))
                if self.encoding == "onehot":
                    if code is not None:
                        out[row, code] = 1.0
                else:
                    out[row, 0] = 0 if code is None else code + 1
            return out
        read = _number if self.type == "numeric" else _boolean
        for row, cell in enumerate(cells):
            if is_missing(cell):
                out[row, 0] = self.fill
                if self.indicator:
                    out[row, 1] = 1.0
            else:
                out[row, 0] = _at(row, read, cell)
        return out

    def decode(self, features: np.ndarray) -> Any:
        """One row's features -> a raw value that encodes to them (a request example)."""
        if self.type == "categorical":
            if self.encoding == "onehot":
                hot = np.flatnonzero(features > 0.5)
                return self.categories[hot[0]] if len(hot) else None
            code = int(round(float(features[0])))
            return self.categories[code - 1] if code > 0 else None
        if self.indicator and features[1] > 0.5:
            return None
        return bool(features[0] > 0.5) if self.type == "boolean" else round(float(features[0]), 6)


    def encode_values(self, values: np.ndarray, out: np.ndarray) -> None:
        """``encode`` for a whole column read at once (``column_values``), into ``out`` (n, width)."""
        if self.type == "categorical":
            import pandas as pd

            codes = pd.Categorical(values, categories=self.categories).codes  # -1: unseen
            if self.encoding == "onehot":
                seen = np.flatnonzero(codes >= 0)
                out[seen, codes[seen]] = 1.0
            else:
                out[:, 0] = codes + 1
            return
        missing = np.isnan(values)
        out[:, 0] = np.where(missing, self.fill, values)
        if self.indicator:
            out[:, 1] = missing


def column_values(series, kind: str) -> np.ndarray:
    """Every cell of a column read as its type at once, as ``Column.encode`` reads them one by one:
    numbers (NaN for a gap) for numeric and boolean columns, category names for categorical ones.
    A CellError names the first row that does not fit. (Each distinct value is read once.)"""
    import pandas as pd

    if kind == "numeric" and series.dtype == object:  # (a table's cells held as objects: floats, None...)
        inferred = series.infer_objects()
        if pd.api.types.is_numeric_dtype(inferred) and not pd.api.types.is_bool_dtype(inferred):
            series = inferred
    if kind == "numeric" and pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            bad = np.isinf(values) | (np.abs(values) > FLOAT32_MAX)
        if bad.any():
            row = int(np.argmax(bad))
            raise CellError(f"{values[row]} is not a finite number (within +-3.4e38)", row)
        return values
    read = {"numeric": _number, "boolean": _boolean, "categorical": category}[kind]
    if series.dtype == object and pd.api.types.infer_dtype(series, skipna=True) in ("mixed", "mixed-integer"):
        return _cell_by_cell(series, kind, read)  # (factorize takes True for 1: they are different categories)
    try:
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
    except TypeError:  # a cell that cannot be hashed (a list): read one by one, which names it
        return _cell_by_cell(series, kind, read)
    readings = []
    for position, cell in enumerate(uniques):
        try:
            readings.append(read(cell))
        except CellError as error:
            raise CellError(error.reason, int(np.argmax(codes == position))) from None
    gap = MISSING if kind == "categorical" else np.nan  # (code -1, a gap, takes the last entry)
    return np.array(readings + [gap], dtype=object if kind == "categorical" else np.float64)[codes]


def numeric_block(frame, names: list[str]) -> tuple[list[str], np.ndarray]:
    """Those of ``names`` whose dtype holds numbers, read in one conversion into one (n, k) float64
    block (784 pixels a column at a time took ~10 ms a 1,000 rows); checked as ``column_values``
    checks them, so a CellError names the first bad cell's column and row."""
    import pandas as pd

    dtypes = frame.dtypes
    names = [name for name in names if pd.api.types.is_numeric_dtype(dtypes[name])
             and not pd.api.types.is_bool_dtype(dtypes[name])]
    if not names:
        return [], np.zeros((len(frame), 0))
    block = frame[names].to_numpy(dtype=np.float64, na_value=np.nan)
    floats = [index for index, name in enumerate(names) if pd.api.types.is_float_dtype(dtypes[name])]
    if floats:  # (integers are finite, and within float32's range)
        checked = block[:, floats] if len(floats) < len(names) else block
        with np.errstate(invalid="ignore"):
            bad = np.isinf(checked) | (np.abs(checked) > FLOAT32_MAX)
        if bad.any():
            column = int(np.flatnonzero(bad.any(axis=0))[0])
            row = int(np.argmax(bad[:, column]))
            raise CellError(f"{checked[row, column]} is not a finite number (within +-3.4e38)", row,
                            names[floats[column]])
    return names, block


def _cell_by_cell(series, kind: str, read) -> np.ndarray:
    gap = MISSING if kind == "categorical" else np.nan
    values = [gap if is_missing(cell) else _at(row, read, cell) for row, cell in enumerate(series)]
    return np.array(values, dtype=object if kind == "categorical" else np.float64)


def _at(row: int, read, cell: Any):
    try:
        return read(cell)
    except CellError as error:
        raise CellError(error.reason, row) from None


@dataclass
class Groups:
    """The sensitive columns a fairness-mitigated model reads: their combined value, as a code
    (the index of the group in ``keys``) appended after the features. An unknown group is refused.
    ``values``: each group's values, column by column (a key is only their display)."""

    columns: list[str]
    keys: list[str]
    values: list[list[str]] = field(default_factory=list)


def group_key(cells: list[Any] | np.ndarray, columns: list[str]) -> str:
    """One row's sensitive values as one group name: ``White``, or ``colour=White, sex=Male``."""
    values = [category(cell) for cell in cells]
    return values[0] if len(values) == 1 else ", ".join(f"{c}={v}" for c, v in zip(columns, values))


@dataclass
class TableSchema:
    columns: list[Column]
    groups: Groups | None = None
    # Columns a request may carry that the model does not read: the sensitive columns of a version
    # measured for fairness, so that its requests and its mitigated version's are the same.
    ignored: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> list[str]:
        """The raw columns a request gives, in the order a list instance gives them."""
        return [c.name for c in self.columns] + (self.groups.columns if self.groups else [])

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns) + (self.groups is not None)

    def feature_names(self) -> list[str]:
        return [name for c in self.columns for name in c.feature_names()]

    def embedded(self) -> list[tuple[int, int]]:
        """(feature position, number of codes incl. 0 = unseen) of each embedded column."""
        found, position = [], 0
        for column in self.columns:
            if column.type == "categorical" and column.encoding == "embedding":
                found.append((position, len(column.categories) + 1))
            position += column.width
        return found

    def encode(self, cells: np.ndarray) -> np.ndarray:
        """(n, len(inputs)) raw cells -> (n, width) float32 features."""
        parts = []
        for i, column in enumerate(self.columns):
            try:
                parts.append(column.encode(cells[:, i]))
            except CellError as error:
                raise CellError(error.reason, error.row, column.name) from None
        if self.groups:
            index = {key: i for i, key in enumerate(self.groups.keys)}
            codes = []
            for row, values in enumerate(cells[:, len(self.columns):]):
                key = group_key(values, self.groups.columns)
                if key not in index:
                    raise CellError(f"group {key!r} is not among those the thresholds were fitted on ("
                                    f"{', '.join(self.groups.keys)})", row, ", ".join(self.groups.columns))
                codes.append(index[key])
            parts.append(np.asarray(codes, dtype=np.float32)[:, None])
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(cells), 0), np.float32)

    def encode_frame(self, frame) -> np.ndarray:
        """``encode`` for a DataFrame of the input columns (a streamed table's batches): the numeric
        columns at once, the others a column at a time; a CellError names the column and the row.
        Sensitive groups are not read here."""
        out, position, positions = np.zeros((len(frame), self.width), dtype=np.float32), 0, {}
        for column in self.columns:
            positions[column.name] = position
            position += column.width
        read, block = numeric_block(frame, [column.name for column in self.columns if column.type == "numeric"])
        if read:
            by_name = {column.name: column for column in self.columns}
            columns = [by_name[name] for name in read]
            at = np.array([positions[name] for name in read])
            missing = np.isnan(block)
            if missing.any():
                block = np.where(missing, np.array([column.fill for column in columns]), block)
                flagged = [index for index, column in enumerate(columns) if column.indicator]
                out[:, at[flagged] + 1] = missing[:, flagged]
            if np.array_equal(at, np.arange(at[0], at[0] + len(at))):  # (side by side: a slice, not a scatter)
                out[:, at[0]: at[0] + len(at)] = block
            else:
                out[:, at] = block
        read = set(read)
        for column in self.columns:
            if column.name in read:
                continue
            try:
                values = column_values(frame[column.name], column.type)
            except CellError as error:
                raise CellError(error.reason, error.row, column.name) from None
            column.encode_values(values, out[:, positions[column.name]: positions[column.name] + column.width])
        return out

    def decode(self, features: np.ndarray) -> dict[str, Any]:
        """One encoded row -> a request instance (the curl hint's example)."""
        instance, position = {}, 0
        for column in self.columns:
            instance[column.name] = column.decode(features[position: position + column.width])
            position += column.width
        if self.groups:
            instance.update(zip(self.groups.columns, self.groups.values[int(features[position])]))
        return instance

    def describe(self) -> list[str]:
        """One line per column, for `deepyard validate` and the model's GET page."""
        lines = []
        for c in self.columns:
            detail = {"numeric": f"null -> {c.fill:g}", "boolean": f"null -> {bool(c.fill)}"}.get(c.type, "")
            if c.type == "categorical":
                shown = ", ".join(c.categories[:6]) + (", ..." if len(c.categories) > 6 else "")
                detail = f"{len(c.categories)} categories ({shown}), {c.encoding}"
            if c.indicator:
                detail += " + missing indicator"
            lines.append(f"{c.name}: {c.type}, {detail}")
        if self.groups:
            lines.append(f"{', '.join(self.groups.columns)}: sensitive, one of {', '.join(self.groups.keys)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [asdict(c) for c in self.columns],
                "groups": asdict(self.groups) if self.groups else None, "ignored": self.ignored}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TableSchema":
        groups = saved.get("groups")
        return cls([Column(**c) for c in saved["columns"]], Groups(**groups) if groups else None,
                   list(saved.get("ignored") or []))


@dataclass
class TablePlan:
    """What a table builder decided before any split: each feature column's type and encoding.
    ``RawData.x`` holds the raw cells of every column in ``sources``; features are ``names``."""

    sources: list[str]
    names: list[str]
    types: list[str]
    encodings: list[Encoding | None]
    sensitive: list[str] = field(default_factory=list)  # kept aside for fairness metrics

    def cells(self, x: np.ndarray, names: list[str]) -> np.ndarray:
        return x[:, [self.sources.index(name) for name in names]]

    def without(self, names: list[str]) -> "TablePlan":
        kept = [i for i, name in enumerate(self.names) if name not in names]
        return TablePlan(self.sources, [self.names[i] for i in kept], [self.types[i] for i in kept],
                         [self.encodings[i] for i in kept], self.sensitive)

    def fit(self, x: np.ndarray) -> TableSchema:
        """Fill values and categories from the training rows ``x`` (raw cells) only."""
        columns = []
        cells = self.cells(x, self.names)
        for i, (name, kind, encoding) in enumerate(zip(self.names, self.types, self.encodings)):
            import pandas as pd

            values = column_values(pd.Series(cells[:, i], dtype=object), kind)  # (every cell was checked by plan())
            if kind == "categorical":
                found, counts = np.unique(values.astype(str), return_counts=True)
                order = np.lexsort((found, -counts))  # most frequent first; ties by name: stable across runs
                columns.append(Column(name, kind, categories=[str(found[j]) for j in order], encoding=encoding))
                continue
            present = values[~np.isnan(values)]
            if not len(present):
                raise DataError(f"column {name!r} has no values in the training split; drop it "
                                "(data.params.drop) or give it values")
            fill = float(np.median(present)) if kind == "numeric" else float(present.mean() >= 0.5)
            # An indicator only where training has gaps: one that is always 0 there never trains.
            columns.append(Column(name, kind, fill=fill, indicator=len(present) < len(values)))
        ignored = [name for name in self.sensitive if name not in self.names]
        return TableSchema(columns, ignored=ignored)


def plan(frame, target: str, features: list[str] | None, drop: list[str], columns: dict[str, ColumnOptions | dict],
         max_onehot: int, where: str) -> TablePlan:
    """Each feature column's type (the spec's, or inferred) and encoding; DataError for a column that
    cannot be a feature (all gaps, an identifier)."""
    columns = {name: ColumnOptions.model_validate(options) for name, options in columns.items()}
    known = [str(c) for c in frame.columns]
    for name in list(drop) + list(columns):
        if name not in known:
            raise DataError(f"{where}: no column {name!r}{did_you_mean(name, known)} (columns: {', '.join(known)})")
    dropped = set(drop) | {name for name, options in columns.items() if options.type == "drop"}
    names = [c for c in (features or known) if c != target and c not in dropped]
    if not names:
        raise DataError(f"{where}: no feature columns left besides the target {target!r}")
    types, encodings = [], []
    for name in names:
        series = frame[name]
        if series.isna().all():
            raise DataError(f"{where}: column {name!r} has no values (all missing); drop it with data.params.drop")
        options = columns.get(name, ColumnOptions())
        kind = options.type or infer_type(series, name, where)
        if options.encoding and kind != "categorical":
            raise DataError(f"{where}: column {name!r}: encoding {options.encoding!r} is for categorical columns, "
                            f"and this one is {kind}")
        _check_cells(series, name, kind, where)
        encoding = None
        if kind == "categorical":
            encoding = options.encoding or ("onehot" if series.nunique(dropna=False) <= max_onehot else "embedding")
        types.append(kind)
        encodings.append(encoding)
    return TablePlan([c for c in known if c != target], names, types, encodings)


def check_columns(table, columns: list[str], shown, format: str) -> None:
    """``table`` (a DataFrame, or a file's first rows) has ``columns``, or a DataError that says what is wrong."""
    known = [str(c) for c in table.columns]
    if format == "csv" and len(known) == 1 and columns and columns[0] not in known:
        # One "column" is the file's whole first line: not echoed, since the file may hold a secret.
        raise DataError(f"{shown}: one column only, not {columns[0]!r}; is it a comma-separated table with a "
                        "header row?")
    for column in columns:
        if column not in known:
            raise DataError(f"{shown}: no column {column!r}{did_you_mean(column, known)} (columns: {', '.join(known)})")


def _check_cells(series, name: str, kind: str, where: str) -> None:
    """Every value fits its column's type (types are not statistics: the whole table is checked, and
    the error names the row as the file has it)."""
    try:
        column_values(series, kind)
    except CellError as error:
        raise DataError(f"{where}: column {name!r} ({kind}), row {error.row}: {error.reason}; fix or drop the "
                        "row, or set the column's type in data.params.columns") from None


def infer_type(series, name: str, where: str) -> str:
    """numeric, boolean or categorical, from the column's values; an identifier is refused."""
    import pandas as pd

    values = series.dropna()
    if pd.api.types.is_bool_dtype(series) or _two_valued_boolean(values):
        return "boolean"
    if pd.api.types.is_numeric_dtype(series):
        return "numeric"
    if pd.to_numeric(values, errors="coerce").notna().all():
        return "numeric"  # numbers written as text
    if len(values) > 20 and values.nunique() == len(values):
        raise DataError(f"{where}: column {name!r} looks like an identifier (every one of its {len(values)} values "
                        f"is different); drop it with data.params.drop: [{name}], or set data.params.columns."
                        f"{name}.type")
    return "categorical"


def _two_valued_boolean(values) -> bool:
    if values.nunique() > 8:  # (Yes/yes/YES...: a few spellings at most)
        return False
    distinct = {str(v).strip().lower() for v in values.unique()}
    return len(distinct) == 2 and len(distinct & _TRUE) == 1 and len(distinct & _FALSE) == 1
