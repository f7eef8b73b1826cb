"""Data sets, one file per source. Each builder returns a ``RawData``, which ``make_splits`` turns
into deterministic train/val/test splits, or a streaming source's ``StreamPlan`` (its files and
their splits; Ray Data reads them, ``data/streaming.py``). Nothing here touches the network,
Ray or MLflow."""

from deepyard.data.registry import DATASETS
from deepyard.data.splits import RawData, Splits, make_splits
from deepyard.data.streaming import StreamPlan
from deepyard.data.table_stream import TableStream
from deepyard.data import idx, image_folder, seq2seq, series, sklearn_sets, table_files, text  # noqa: F401  (registers)

__all__ = ["DATASETS", "RawData", "Splits", "attach_streams", "make_splits", "load_splits"]


def load_splits(name: str, params: dict, *, val_fraction: float, test_fraction: float,
                seed: int, max_train_samples: int | None = None, sensitive: list[str] = (),
                keep_sensitive: bool = False, stream: bool = False, vocab: list[str] | None = None) -> Splits:
    """``sensitive``: table columns whose groups fairness is measured over; kept out of the
    features unless ``keep_sensitive``. A streaming source's splits are ``StreamSplits``
    (``stream``: the spec asks a source that can stream to do so). ``vocab``: text is coded with
    this vocabulary (a pretrained model's), not one fitted on the training split."""
    raw = DATASETS.build(name, params, split_seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                         stream=stream)
    if isinstance(raw, (StreamPlan, TableStream)):
        return _streamed(name, raw, sensitive, max_train_samples, seed)
    if sensitive:
        raw = with_sensitive(raw, name, list(sensitive), keep_sensitive)
    return make_splits(raw, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                       max_train_samples=max_train_samples, vocab=vocab)


def attach_streams(splits, options, seed: int):
    """Ray is up: a streaming source's Ray Datasets, after its pass over the data (statistics, checks).
    ``options``: the spec's ``data.stream``."""
    from deepyard.data import streaming, table_stream

    if isinstance(splits.plan, TableStream):
        attached = table_stream.attach_table(splits, options, seed)
    else:
        attached = streaming.attach(splits, options, seed)
    streaming.keep_validation(attached)
    return attached


def _streamed(name: str, plan: StreamPlan | TableStream, sensitive: list[str], max_train_samples: int | None,
              seed: int) -> Splits:
    from deepyard.data import table_stream
    from deepyard.data.streaming import stream_splits
    from deepyard.errors import DataError

    if sensitive:
        raise DataError(f"fairness.sensitive: data {name!r} streams; fairness is measured on in-memory tables "
                        "(csv, parquet, arrests)")
    if isinstance(plan, TableStream):
        if max_train_samples is not None:
            raise DataError(f"data.max_train_samples: data {name!r} streams, and a streamed table is not cut short "
                            "yet; leave it out, or point data.params.path at fewer files")
        return table_stream.stream_splits(plan)
    if max_train_samples is not None and max_train_samples < len(plan.files["train"]):
        import numpy as np  # a seeded draw (of the listing's own seeded order)

        kept = np.sort(np.random.default_rng(seed).permutation(len(plan.files["train"]))[:max_train_samples])
        plan.files["train"] = [plan.files["train"][index] for index in kept]
        plan.labels["train"] = plan.labels["train"][kept]
    return stream_splits(plan)


def with_sensitive(raw: RawData, name: str, sensitive: list[str], keep: bool) -> RawData:
    from dataclasses import replace

    from deepyard.errors import DataError
    from deepyard.registry import did_you_mean

    if raw.table is None:
        raise DataError(f"fairness.sensitive: data {name!r} is not a table of named columns; fairness is measured "
                        "on tables (csv, parquet, arrests)")
    for column in sensitive:
        if column not in raw.table.sources:
            raise DataError(f"fairness.sensitive: data {name!r} has no column {column!r}"
                            f"{did_you_mean(column, raw.table.sources)} (columns: {', '.join(raw.table.sources)})")
    from deepyard.data.tables import CellError, category

    for column in sensitive:  # each value must name a group
        for row, cell in enumerate(raw.table.cells(raw.x, [column])[:, 0]):
            try:
                category(cell)
            except CellError as error:
                raise DataError(f"fairness.sensitive: column {column!r}, row {row}: {error.reason}") from None
    table = raw.table if keep else raw.table.without(sensitive)
    if not table.names:
        raise DataError("fairness.sensitive: every feature column is sensitive; nothing would be left to learn from "
                        "(set fairness.include_sensitive: true to learn from them)")
    return replace(raw, table=replace(table, sensitive=sensitive))
