"""Tables that stream: `data: parquet` or `data: csv` over a folder, a glob, a list of files or a
bucket (or one file, with ``data.stream``), read by Ray Data (``read_parquet``, ``read_csv``) while
the workers train, never whole in any one process.

Before Ray starts (``open_table``): the files are listed, the first rows read, and each column's
type inferred from them as for a table in memory (``tables.plan``). Once Ray is up
(``attach_table``): one Ray Data aggregation over every row (``TableFit``) checks each cell against
its column's type, counts each split's rows and classes, and fits the schema (fill values,
categories) and the standardization on the training rows only. Each split is then a Dataset that
reads the files, keeps its own rows and encodes them (``EncodeRows``).

A row's split follows a hash of the row (every column the file has) or of ``split_key``, and the
seed: the same on any number of workers and on every read, and a row keeps its split when rows are
added. Rows that are exact copies share a split, so none leaks from training into the test.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deepyard.data.tables import CellError, Column, ColumnOptions, TablePlan, TableSchema, column_values
from deepyard.errors import DataError

Format = Literal["parquet", "csv"]
HEAD_ROWS = 2048  # read before Ray starts: the columns' types, and the few rows the driver encodes
EXTENSIONS = {"parquet": (".parquet", ".pq", ".parq"), "csv": (".csv", ".csv.gz", ".csv.bz2")}
SPLITS = ("train", "val", "test")
ROWS_PER_BATCH = 16384  # rows encoded at a time on Ray Data's workers (fewer, larger blocks: less overhead)
SKETCH_SIZE = 400  # a median's rank error of about 0.7% (datasketches' KLL)
SKETCHED_ROWS = 20_000  # rows of the table whose values each median sketch takes (its rank error: ~0.4% more)
PATH_COLUMN = "path"  # where Ray Data's include_paths names each row's file
READ_TASKS = 200  # at most, per pass over the files (more files: several to a task)
BLOCK_BYTES = 8 * 2 ** 20  # the most a block of the table holds (4 MiB: an epoch ~15% longer)


@dataclass
class TableStream:
    """What a streamed table source returns before Ray starts: its files, the columns' types
    (inferred from the first rows, or set in the spec) and those rows."""

    format: Format
    files: list[str]
    target: str
    task: Literal["classification", "regression"]
    columns: TablePlan  # the feature columns' types; categorical encodings are decided on the training rows
    encodings: dict[str, str]  # categorical columns whose encoding the spec sets
    max_onehot: int
    split_key: str | None
    seed: int
    val_fraction: float
    test_fraction: float  # 0 when test_files hold the test split
    head: Any  # DataFrame: the first rows, raw
    where: str
    test_files: list[str] | None = None
    test_head: Any = None
    rows: int | None = None  # from Parquet footers; None for CSV (counted by the fit)


def list_files(path: str | list[str], format: Format, where: str) -> list[str]:
    """The table's files: ``path`` is a file, a folder (searched recursively), a glob, a list of
    files, or the URI of a file or folder that pyarrow reaches (s3://, gs://). Hidden files and
    Spark's markers (``.x``, ``_SUCCESS``) are skipped."""
    if isinstance(path, list):
        if not path:
            raise DataError(f"{where}: an empty list; give files, a folder or a glob")
        return [file for item in path for file in _file(item, format, where, listed=True)]
    return _file(path, format, where)


def _file(path: str, format: Format, where: str, listed: bool = False) -> list[str]:
    if "://" in path:
        return _remote(path, format, where, listed)
    if not listed and any(mark in path for mark in "*?["):
        found = [name for name in sorted(glob.glob(os.path.expanduser(path), recursive=True)) if os.path.isfile(name)]
        if not found:
            raise DataError(f"{where}: no file matches {path}")
        return found
    base = Path(path).expanduser()
    if base.is_file():
        return [str(base)]
    if base.is_dir() and not listed:
        found = [str(file) for file in sorted(base.rglob("*")) if file.is_file()
                 and _wanted(file.relative_to(base).as_posix(), format)]
        if not found:
            raise DataError(f"{where}: {base} holds no {format} files ({', '.join(EXTENSIONS[format])})")
        return found
    raise DataError(f"{where}: {base} does not exist" if not base.exists() else f"{where}: {base} is not a file")


def _wanted(relative: str, format: Format) -> bool:
    hidden = any(part.startswith((".", "_")) for part in relative.split("/"))
    return not hidden and relative.lower().endswith(EXTENSIONS[format])


def _remote(uri: str, format: Format, where: str, listed: bool) -> list[str]:
    import pyarrow
    from pyarrow import fs

    if "?" in uri:
        raise DataError(f"{where}: {uri}: give the endpoint and options in the environment (AWS_ENDPOINT_URL...), "
                        "not in the URI")
    scheme = uri.split("://")[0]
    try:
        filesystem, base = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(base)
        if info.type == fs.FileType.File:
            return [uri]
        if info.type != fs.FileType.Directory or listed:
            raise DataError(f"{where}: {uri} does not exist there" if info.type == fs.FileType.NotFound
                            else f"{where}: {uri} is not a file")
        infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True))
    except (OSError, ValueError, pyarrow.ArrowException) as error:  # no bucket or credentials; an unknown scheme
        raise DataError(f"{where}: {uri} cannot be listed: {error}") from None
    prefix = base.rstrip("/") + "/"
    found = sorted(f"{scheme}://{info.path}" for info in infos if info.type == fs.FileType.File
                   and _wanted(info.path[len(prefix):], format))
    if not found:
        raise DataError(f"{where}: {uri} holds no {format} files ({', '.join(EXTENSIONS[format])})")
    return found


def read_head(files: list[str], format: Format, where: str):
    """The first rows of the table (a DataFrame), and its row count where the files' footers say it."""
    import pyarrow
    import pyarrow.dataset as ds
    from pyarrow import fs

    try:
        if "://" in files[0]:
            filesystem = fs.FileSystem.from_uri(files[0])[0]
            paths = [fs.FileSystem.from_uri(file)[1] for file in files]
        else:
            filesystem, paths = None, files
        parts, wanted = [], HEAD_ROWS
        for path in paths:  # file by file: a scan of them all would convert (and trip on) rows past the head
            parts.append(ds.dataset(path, format=format, filesystem=filesystem).head(wanted))
            wanted -= parts[-1].num_rows
            if wanted <= 0:
                break
        head = pyarrow.concat_tables(parts, promote_options="permissive").to_pandas()
        rows = ds.dataset(paths, format=format, filesystem=filesystem).count_rows() if format == "parquet" else None
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise DataError(f"{where}: {files[0]}{' and others' if len(files) > 1 else ''} cannot be read as {format}: "
                        f"{str(error)[:300]}") from None
    head.columns = [str(column) for column in head.columns]
    return head, rows


def split_points(frame, stream: TableStream) -> np.ndarray:
    """Each row's point in [0, 1): a hash of the row (or of its ``split_key``) and the seed."""
    return split_hashes(frame, stream) / 2.0 ** 64


def split_hashes(frame, stream: TableStream) -> np.ndarray:
    return row_hashes(frame[[stream.split_key]] if stream.split_key else frame, stream.seed)


HASHED_ROWS = 1024  # rows mixed at a time: a block of 784 pixels' bits stays in the CPU's cache


def row_hashes(frame, seed: int) -> np.ndarray:
    """A 64-bit hash of each row's values (``_canonical``: whatever dtype a block gave them) and the
    seed. Each cell is mixed with a salt of its column's name and the seed, and a row's cells are
    summed: the columns' order in the file does not matter. A gap adds nothing, whatever its
    column's type in this block (a column of gaps alone reads as numbers, one with text as text).
    (pandas' hash_pandas_object took ~8x as long on 784 pixels, and ignores its key for numbers:
    the seed did not move a numeric row.)"""
    import pandas as pd

    numbers, texts = _canonical(frame)
    total = np.zeros(len(frame), dtype=np.uint64)
    if numbers is not None:
        salts = _salts(numbers.columns, seed)
        block = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
        for start in range(0, len(block), HASHED_ROWS):
            cells = block[start: start + HASHED_ROWS] + 0.0  # (-0.0 is 0.0)
            gaps = np.isnan(cells)
            bits = cells.view(np.uint64)
            bits ^= salts
            mixed = _mix(bits)
            mixed[gaps] = 0
            total[start: start + HASHED_ROWS] = mixed.sum(axis=1, dtype=np.uint64)
    key = hashlib.blake2b(str(seed).encode(), digest_size=8).hexdigest()  # (16 characters: siphash's key)
    for salt, (name, (values, gaps)) in zip(_salts(list(texts), seed), texts.items()):
        mixed = _mix(pd.util.hash_array(values, hash_key=key) ^ salt)
        mixed[gaps] = 0
        total += mixed
    return _mix(total)


def _salts(names, seed: int) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest(), "little")
                     for name in names], dtype=np.uint64)


def _mix(bits: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place: every input bit moves about half the output bits."""
    bits ^= bits >> np.uint64(30)
    bits *= np.uint64(0xBF58476D1CE4E5B9)
    bits ^= bits >> np.uint64(27)
    bits *= np.uint64(0x94D049BB133111EB)
    bits ^= bits >> np.uint64(31)
    return bits


def _canonical(frame):
    """The rows as their values, whatever dtype a block gave them: pandas types an int column with a
    gap as float, and a bool one as object, in that block only. Numbers and booleans as one numeric
    frame (float64, NaN for a gap; None if there are none); any other column as strings (numbers
    and booleans among them written as floats) and where its gaps are, by name."""
    import numbers

    import pandas as pd

    numeric = [name for name, dtype in frame.dtypes.items() if pd.api.types.is_bool_dtype(dtype)
               or pd.api.types.is_numeric_dtype(dtype)]
    columns = {}
    for name in frame.columns.difference(numeric, sort=False):
        column = frame[name]
        try:
            codes, uniques = pd.factorize(column, use_na_sentinel=True)
        except TypeError:  # (unhashable cells: the fit names them)
            codes, uniques = np.arange(len(column)), [repr(cell) for cell in column]
        canon = [float(value) if isinstance(value, (bool, np.bool_, numbers.Number)) else value for value in uniques]
        if all(isinstance(value, float) for value in canon):  # (an object column of numbers: a gap made it so)
            numeric.append(name)
            frame = frame.assign(**{name: np.array(canon + [np.nan], dtype=np.float64)[codes]})
        else:
            columns[name] = (np.array([repr(value) if isinstance(value, float) else str(value) for value in canon]
                                      + [""], dtype=object)[codes], codes == -1)
    return (frame[numeric] if numeric else None), columns


def split_codes(frame, stream: TableStream) -> np.ndarray:
    """Each row's split (0 train, 1 val, 2 test)."""
    from deepyard.data.streaming import split_by_point

    return split_by_point(split_points(frame, stream), stream.val_fraction, stream.test_fraction)


def labels_of(frame, stream: TableStream):
    """The target column as class names (classification: as the in-memory table reads them)."""
    return frame[stream.target].astype(str).str.strip()


# ---- before Ray: the samples the driver encodes -------------------------------------------------


def stream_splits(stream: TableStream):
    """The in-memory face of a streamed table: the first rows of each split, encoded with a schema
    fitted on the first training rows (``attach_table`` refits it on all of them)."""
    from deepyard.data.streaming import StreamSplits

    heads = _heads(stream)
    if heads["train"].empty:
        raise DataError(f"{stream.where}: none of the first {len(stream.head)} rows falls in the training split; "
                        "lower data.val_fraction / data.test_fraction")
    cells = heads["train"][stream.columns.sources].astype(object).to_numpy()
    schema = stream.columns.fit(cells)
    class_names = None
    if stream.task == "classification":
        labelled = [stream.head] + ([stream.test_head] if stream.test_files else [])
        class_names = sorted({label for frame in labelled for label in labels_of(frame, stream)})
    samples = {split: _encoded(rows, stream, schema, class_names) for split, rows in heads.items()}
    whole = stream.rows is not None and stream.rows == len(stream.head) or len(stream.head) < HEAD_ROWS
    scale = 1.0 if whole or stream.rows is None else stream.rows / len(stream.head)
    sizes = {split: round(len(rows) * scale) for split, rows in heads.items()}
    if stream.test_files:
        sizes["test"] = len(heads["test"])
    splits = StreamSplits(stream.task, *samples["train"], *samples["val"], *samples["test"],
                          class_names=class_names, plan=stream, sizes=sizes, counts=None)
    splits.table, splits.feature_names = schema.to_dict(), schema.feature_names()
    return splits


def _heads(stream: TableStream) -> dict[str, Any]:
    codes = split_codes(stream.head, stream)
    heads = {split: stream.head[codes == index] for index, split in enumerate(SPLITS)}
    if stream.test_files:
        heads["test"] = stream.test_head
    return heads


def _encoded(frame, stream: TableStream, schema: TableSchema, class_names: list[str] | None):
    try:
        x = schema.encode_frame(frame)
    except CellError as error:  # (the driver's samples; Ray Data's rows were all checked by the fit)
        raise DataError(f"{stream.where}: {error}; fix the row, or set the column's type in data.params.columns") \
            from None
    if stream.task == "classification":
        import pandas as pd

        return x, pd.Categorical(labels_of(frame, stream), categories=class_names).codes.astype(np.int64)
    return x, column_values(frame[stream.target], "numeric").astype(np.float32)


# ---- once Ray is up: one pass to fit, then a Dataset per split ----------------------------------


def read(files: list[str], format: Format, **options):
    """The files as a Dataset, a read task per file (up to ``READ_TASKS``): Ray Data would otherwise
    split each file's rows into several blocks (9 per file of a 400,000-row table in 8 files), and
    the task and block overheads made an epoch ~1.8x as long."""
    import ray.data

    reader = ray.data.read_parquet if format == "parquet" else ray.data.read_csv
    # Smaller blocks than Ray Data's 128 MiB: a worker maps each block it reads from the object
    # store, and those pages stay in its RSS (a 4M-row table's epoch: 898 MB peak, 722 at 8 MiB).
    # (A Dataset copies the context it is made in, and the Datasets made from it keep that copy.)
    context = ray.data.DataContext.get_current()
    saved, context.target_max_block_size = context.target_max_block_size, BLOCK_BYTES
    try:
        return reader(files, override_num_blocks=min(len(files), READ_TASKS), **options)
    finally:
        context.target_max_block_size = saved


def tally(frame, stream: TableStream, test_files: frozenset[str]) -> dict[str, Any]:
    """One block's share of the fit: rows per split, labels, and per feature column its training
    rows' sums, sketch or category counts. Every cell of every split is checked against its type."""
    named = PATH_COLUMN not in stream.head.columns  # (a table's own "path" column keeps its place)
    paths = frame.pop(PATH_COLUMN).to_numpy() if named else np.full(len(frame), "a file of the table", dtype=object)
    from deepyard.data.streaming import split_by_point

    hashes = split_hashes(frame, stream)
    codes = split_by_point(hashes / 2.0 ** 64, stream.val_fraction, stream.test_fraction)
    if test_files:  # (Ray Data names a bucket's file without its scheme: s3://b/t.parquet is b/t.parquet)
        codes[np.isin(_bare(paths), [_bare(file) for file in test_files])] = 2
    train = codes == 0
    # The rows whose values the median sketches take: the same share of every block, picked by the
    # hash's low bits (its high bits pick the split), so that each sampled row weighs the same.
    rate = min(1.0, SKETCHED_ROWS / stream.rows) if stream.rows else 1.0
    sketched = ((hashes & np.uint64(0xFFFFFFFF)) < np.uint64(rate * 2 ** 32))[train]

    def fail(problem: str, rows: np.ndarray) -> None:
        raise DataError(f"{stream.where}: {problem}, in {paths[int(np.flatnonzero(rows)[0])]}")

    target = frame[stream.target]
    if (gaps := target.isna().to_numpy()).any():
        fail(f"the target {stream.target!r} is missing in {int(gaps.sum())} rows; drop those rows first", gaps)
    result = {"rows": np.bincount(codes, minlength=3).tolist(), "columns": {}}
    if stream.task == "classification":
        labels = labels_of(frame, stream)
        result["labels"], result["train_labels"] = _counts(labels), _counts(labels[train])
    else:
        values = _read(target, "numeric", f"regression target {stream.target!r}", fail)[train]
        result["target"] = [len(values), float(values.sum()), float((values * values).sum())]

    numbers, block = _numeric_block(frame, stream, fail)
    for name, kind in zip(stream.columns.names, stream.columns.types):
        if name in numbers:  # (a column of the block: its values side by side, as pandas holds them)
            result["columns"][name] = _numeric_tally(block[:, numbers[name]][train], sketched)
            continue
        values = _read(frame[name], kind, f"column {name!r} ({kind})", fail)[train]
        if kind == "categorical":
            result["columns"][name] = {"counts": _counts(values)}
            continue
        if kind == "numeric":  # (numbers held as objects)
            result["columns"][name] = _numeric_tally(values, sketched)
            continue
        present = values[~np.isnan(values)]
        result["columns"][name] = {"n": len(present), "gaps": len(values) - len(present),
                                   "sum": float(present.sum()), "squares": float((present * present).sum())}
    return result


def _numeric_tally(values: np.ndarray, sketched: np.ndarray) -> dict[str, Any]:
    """A numeric column's sums over one block's training rows, and a sketch of its ``sketched``
    values for the median (a sketch takes ~30 ns a value: Fashion's 784 pixels spent more time
    there than in everything else the fit does)."""
    from datasketches import kll_doubles_sketch

    known = ~np.isnan(values)
    present = values[known]
    sketch = kll_doubles_sketch(SKETCH_SIZE)
    sketch.update(values[known & sketched])
    return {"n": len(present), "gaps": len(values) - len(present), "sum": float(present.sum()),
            "squares": float(np.dot(present, present)), "sketch": sketch.serialize()}


def _numeric_block(frame, stream: TableStream, fail) -> tuple[dict[str, int], np.ndarray]:
    """The numeric feature columns whose dtype holds numbers, read at once: their places in the block."""
    from deepyard.data.tables import numeric_block

    wanted = [name for name, kind in zip(stream.columns.names, stream.columns.types) if kind == "numeric"]
    try:
        names, block = numeric_block(frame, wanted)
    except CellError as error:
        rows = np.zeros(len(frame), dtype=bool)
        rows[error.row] = True
        fail(f"column {error.column!r} (numeric): {error.reason}; fix or drop the row, or set the column's type in "
             "data.params.columns", rows)
    return {name: index for index, name in enumerate(names)}, block


def _bare(paths):
    """Paths without a URI's scheme."""
    import pandas as pd

    return pd.Series(paths, dtype=object).str.replace(r"^\w+://", "", regex=True).to_numpy()


def numpy_frame(table):
    """An Arrow block as a DataFrame of NumPy columns. (Ray Data's own conversion keeps them
    Arrow-backed, which read ~5x slower a column: Fashion's 784 pixels, 45,000 rows/s encoded.)"""
    return table.to_pandas()


def _counts(values) -> Counter:
    import pandas as pd

    return Counter(pd.Series(values).value_counts(sort=False).to_dict())


def _read(series, kind: str, what: str, fail) -> np.ndarray:
    try:
        return column_values(series, kind)
    except CellError as error:
        rows = np.zeros(len(series), dtype=bool)
        rows[error.row] = True
        fail(f"{what}: {error.reason}; fix or drop the row, or set the column's type in data.params.columns", rows)


def merged(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two tallies as one."""
    if not first:
        return second
    if not second:
        return first
    result = {"rows": [a + b for a, b in zip(first["rows"], second["rows"])], "columns": {}}
    for key in ("labels", "train_labels"):
        if key in first:
            result[key] = first[key] + second[key]
    if "target" in first:
        result["target"] = [a + b for a, b in zip(first["target"], second["target"])]
    for name, column in first["columns"].items():
        other = second["columns"][name]
        if "counts" in column:
            result["columns"][name] = {"counts": column["counts"] + other["counts"]}
            continue
        joined = {key: column[key] + other[key] for key in ("n", "gaps", "sum", "squares")}
        if "sketch" in column:
            from datasketches import kll_doubles_sketch

            sketch = kll_doubles_sketch.deserialize(column["sketch"])
            sketch.merge(kll_doubles_sketch.deserialize(other["sketch"]))
            joined["sketch"] = sketch.serialize()
        result["columns"][name] = joined
    return result


def _table_fit_class():
    from ray.data.aggregate import AggregateFnV2

    class TableFit(AggregateFnV2):
        """Ray Data's aggregation of ``tally`` over every block (the accumulator is pickled: Ray
        keeps it in Arrow blocks between the map and the combine)."""

        def __init__(self, stream: TableStream):
            self.stream = stream
            self.test_files = frozenset(stream.test_files or ())
            super().__init__("table_fit", zero_factory=lambda: pickle.dumps({}), on=None, ignore_nulls=False)

        def aggregate_block(self, block) -> bytes:
            from ray.data.block import BlockAccessor

            return pickle.dumps(tally(numpy_frame(BlockAccessor.for_block(block).to_arrow()), self.stream,
                                      self.test_files))

        def combine(self, current: bytes, new: bytes) -> bytes:
            return pickle.dumps(merged(pickle.loads(current), pickle.loads(new)))

    return TableFit


@dataclass
class Fitted:
    schema: TableSchema
    class_names: list[str] | None
    counts: np.ndarray | None
    sizes: dict[str, int]
    stats: tuple[np.ndarray, np.ndarray]
    targets: tuple[float, float] | None


def fitted(stream: TableStream, tallied: dict[str, Any]) -> Fitted:
    """The schema and the statistics from the tally of every row: the same schema ``TablePlan.fit``
    fits in memory (a numeric column's median is a sketch's, within 0.7% of the ranks), and the
    mean and std of each encoded feature over the training rows, worked out from the sums."""
    rows = int(tallied["rows"][0])
    columns, means, squares = [], [], []
    for name, kind in zip(stream.columns.names, stream.columns.types):
        column = tallied["columns"][name]
        if kind == "categorical":
            ranked = sorted(column["counts"].items(), key=lambda item: (-item[1], item[0]))  # as TablePlan.fit
            categories = [str(value) for value, _ in ranked]
            encoding = stream.encodings.get(name) or ("onehot" if len(categories) <= stream.max_onehot else "embedding")
            columns.append(Column(name, kind, categories=categories, encoding=encoding))
            if encoding == "onehot":
                shares = [count / rows for _, count in ranked]
                means += shares
                squares += shares
            else:  # codes reach the embedding as they are
                means.append(0.0)
                squares.append(1.0)
            continue
        if column["n"] == 0:
            raise DataError(f"{stream.where}: column {name!r} has no values in the training split; drop it "
                            "(data.params.drop) or give it values")
        if kind == "numeric":
            from datasketches import kll_doubles_sketch

            fill = float(kll_doubles_sketch.deserialize(column["sketch"]).get_quantile(0.5))
        else:
            fill = float(column["sum"] / column["n"] >= 0.5)
        gaps = column["gaps"]
        columns.append(Column(name, kind, fill=fill, indicator=gaps > 0))
        means.append((column["sum"] + gaps * fill) / rows)  # a gap counts as its fill value
        squares.append((column["squares"] + gaps * fill * fill) / rows)
        if gaps:
            means.append(gaps / rows)
            squares.append(gaps / rows)
    schema = TableSchema(columns)
    mean = np.array(means)
    std = np.sqrt(np.maximum(np.array(squares) - mean ** 2, 0.0))
    std = np.where(std < 1e-8, 1.0, std)
    for position, _ in schema.embedded():
        mean[position], std[position] = 0.0, 1.0
    class_names = counts = targets = None
    if stream.task == "classification":
        class_names = sorted(tallied["labels"])
        counts = np.array([tallied["train_labels"].get(name, 0) for name in class_names], dtype=float)
    else:
        n, total, total_squares = tallied["target"]
        average = total / max(n, 1)
        targets = (float(average), float(max(np.sqrt(max(total_squares / max(n, 1) - average ** 2, 0.0)), 1e-8)))
    sizes = dict(zip(SPLITS, (int(count) for count in tallied["rows"])))
    return Fitted(schema, class_names, counts, sizes, (mean.astype(np.float32), std.astype(np.float32)), targets)


class EncodeRows:
    """Ray Data's map from a block of the table's rows to one split's encoded rows: ``x`` the
    features (float32), ``y`` the class index or the target."""

    def __init__(self, stream: TableStream, schema: dict, class_names: list[str] | None, split: str | None):
        self.stream, self.class_names, self.split = stream, class_names, split
        self.schema = TableSchema.from_dict(schema)
        self.inputs = list(self.stream.columns.names)

    def __call__(self, table) -> dict[str, np.ndarray]:
        from deepyard.data.streaming import split_by_point

        frame = numpy_frame(table)
        if self.split is not None:
            points = split_points(frame, self.stream)
            codes = split_by_point(points, self.stream.val_fraction, self.stream.test_fraction)
            own = np.flatnonzero(codes == SPLITS.index(self.split))
            if self.split == "train":  # in the order of their hashes: a file's rows, mixed (its order may be sorted)
                own = own[np.argsort(points[own], kind="stable")]
            frame = frame.iloc[own]
        # (the fit read every cell: only a file changed since could fail here, a DataError that says which cell)
        return dict(zip(("x", "y"), _encoded(frame, self.stream, self.schema, self.class_names)))


def attach_table(splits, options, seed: int):
    """Ray is up: the fit over every row (checks, sizes, schema and statistics), then one Dataset
    per split; the driver's samples are encoded again with the fitted schema."""
    from ray.data import FileShuffleConfig, RandomSeedConfig

    from deepyard.data.streaming import _data_error, configure

    configure()
    stream = splits.plan
    every = read(stream.files + (stream.test_files or []), stream.format,
                 include_paths=PATH_COLUMN not in stream.head.columns)
    try:
        tallied = pickle.loads(every.aggregate(_table_fit_class()(stream))["table_fit"])
    except Exception as error:  # a Ray task's failure wraps the DataError that says which file
        if (cause := _data_error(error)) is None:
            raise
        raise DataError(cause) from None
    fit = fitted(stream, tallied)
    splits.table, splits.feature_names = fit.schema.to_dict(), fit.schema.feature_names()
    splits.class_names, splits.counts, splits.sizes = fit.class_names, fit.counts, fit.sizes
    splits.stats, splits.targets = fit.stats, fit.targets
    for split, rows in _heads(stream).items():
        x, y = _encoded(rows, stream, fit.schema, fit.class_names)
        setattr(splits, f"x_{split}", x)
        setattr(splits, f"y_{split}", y)
    splits.in_shape = (fit.schema.width,)

    def encoded(split: str, rows):
        own = None if split == "test" and stream.test_files else split
        return rows.map_batches(EncodeRows(stream, splits.table, fit.class_names, own), batch_format="pyarrow",
                                batch_size=ROWS_PER_BATCH)

    # Each epoch reads the files in a new (seeded) order; a full shuffle is Ray Data's, after encoding.
    # (Not randomize_block_order: it would hold every block of the table at once.)
    order = FileShuffleConfig(seed=seed, reseed_after_execution=True) if options.shuffle != "none" else None
    splits.streams = {"train": encoded("train", read(stream.files, stream.format, shuffle=order)),
                      "val": encoded("val", read(stream.files, stream.format)),
                      "test": encoded("test", read(stream.test_files or stream.files, stream.format))}
    if options.shuffle == "full":
        splits.streams["train"] = splits.streams["train"].random_shuffle(
            seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return splits


def open_table(format: Format, path: str | list[str], target: str, *, features: list[str] | None,
               task: Literal["classification", "regression"], drop: list[str],
               columns: dict[str, ColumnOptions], max_onehot: int, split_key: str | None, test_path,
               split_seed: int, val_fraction: float, test_fraction: float) -> TableStream:
    """A streamed table's plan, from its listing and first rows: DataError for what they show wrong."""
    import pandas as pd

    from deepyard.data.tables import check_columns, plan

    where = "data.params.path"
    files = list_files(path, format, where)
    head, rows = read_head(files, format, where)
    shown = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"
    check_columns(head, [target] + list(features or []) + ([split_key] if split_key else []), shown, format)
    if target in drop or target in (features or []):
        raise DataError(f"{shown}: the target {target!r} cannot also be a feature or dropped")
    # A column the files type as numbers is numeric: a pixel that is 0 or 1 in the first rows is not
    # a yes/no column (in memory, the whole table decides; here the first rows would).
    typed = {name: ColumnOptions(type="numeric") for name in head.columns if name != target
             and pd.api.types.is_numeric_dtype(head[name]) and not pd.api.types.is_bool_dtype(head[name])}
    columns_plan = plan(head, target, features, list(drop), {**typed, **columns}, max_onehot, shown)
    test_files = test_head = None
    if test_path is not None:
        if PATH_COLUMN in head.columns:
            raise DataError(f"data.params.test_path: {shown} has a column named {PATH_COLUMN!r}, the name Ray Data "
                            "gives each row's file, which tells the test files' rows apart; rename the column, or "
                            "leave test_path out")
        test_files = list_files(test_path, format, "data.params.test_path")
        test_head, _ = read_head(test_files, format, "data.params.test_path")
        check_columns(test_head, [target] + columns_plan.names, test_files[0], format)
        test_fraction = 0.0
    encodings = {name: options.encoding for name, options in columns.items() if options.encoding}
    return TableStream(format, files, target, task, columns_plan, encodings, max_onehot, split_key, split_seed,
                       val_fraction, test_fraction, head, shown, test_files, test_head, rows)
