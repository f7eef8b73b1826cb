"""Streamed tables: Parquet and CSV folders read by Ray Data into Ray Train workers (real Ray, real MLflow)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import last_json

TABLE_JOB = """
kind: train
name: {name}
data:
  name: {format}
  params: {{path: {path}, target: {target}{extra}}}
model: {{name: mlp, params: {{hidden_sizes: [16]}}}}
optim: {{name: adam, lr: 0.01}}
train: {{epochs: 2, batch_size: 32}}
scaling: {{num_workers: {workers}, cpus_per_worker: 0.5}}
"""


def loans(rows: int = 1200, seed: int = 0) -> pd.DataFrame:
    """A mixed table: numbers with gaps, a yes/no column, a category; ``approved`` depends on them."""
    rng = np.random.default_rng(seed)
    income = rng.normal(50, 15, rows)
    debt = rng.normal(20, 8, rows)
    region = rng.choice(["north", "south", "east", "west"], rows, p=[0.4, 0.3, 0.2, 0.1])
    owner = rng.choice(["yes", "no"], rows)
    score = income - debt + 10 * (owner == "yes") + 8 * (region == "north") + rng.normal(0, 3, rows)
    table = pd.DataFrame({"income": income, "debt": debt, "region": region, "owner": owner,
                          "approved": np.where(score > np.median(score), "yes", "no")})
    table.loc[rng.random(rows) < 0.1, "debt"] = np.nan
    return table


def write_parts(table: pd.DataFrame, folder: Path, format: str, parts: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, part in enumerate(np.array_split(np.arange(len(table)), parts)):
        rows = table.iloc[part]
        if format == "parquet":
            rows.to_parquet(folder / f"part-{index}.parquet", index=False)
        else:
            rows.to_csv(folder / f"part-{index}.csv", index=False)
    (folder / "_SUCCESS").touch()  # (what Spark leaves: not a part of the table)
    return folder


@pytest.fixture(scope="module")
def loans_parquet(tmp_path_factory) -> Path:
    return write_parts(loans(), tmp_path_factory.mktemp("loans") / "parquet", "parquet")


def table_spec(write_spec, path, name: str, format: str = "parquet", workers: int = 1, target: str = "approved",
               extra: str = "") -> str:
    return write_spec(TABLE_JOB.format(name=name, format=format, path=path, target=target, workers=workers,
                                       extra=extra), f"{name}.yaml")


def test_a_column_read_at_once_encodes_as_cell_by_cell():
    from deepyard.data.table_files import arrests

    raw = arrests()
    schema = raw.table.fit(raw.x)
    cells = raw.table.cells(raw.x, raw.table.names)
    expected = schema.encode(cells)
    assert np.array_equal(schema.encode_frame(pd.DataFrame(cells, columns=raw.table.names)), expected)
    from deepyard.data.tables import CellError, Column, TableSchema

    odd = pd.DataFrame({"n": [1.5, None, "2", " 3 "], "b": ["Yes", "no", None, "TRUE"], "c": [3.0, "x", None, 3]})
    schema = TableSchema([Column("n", "numeric", fill=9.0, indicator=True), Column("b", "boolean", fill=1.0),
                          Column("c", "categorical", categories=["3", "x"], encoding="onehot")])
    assert np.array_equal(schema.encode_frame(odd), schema.encode(odd.astype(object).to_numpy()))
    with pytest.raises(CellError, match=r"column 'n', row 2: 'abc' is not a number"):
        schema.encode_frame(odd.assign(n=[1.0, None, "abc", 2]))
    from deepyard.data.tables import column_values

    # True is not the category 1 (pandas' factorize would take them for one), and a list is a CellError
    assert column_values(pd.Series([True, 1, 0, False, None], dtype=object), "categorical").tolist() == [
        "True", "1", "0", "False", "<missing>"]
    with pytest.raises(CellError, match="a list where a number is expected"):
        column_values(pd.Series([2.0, [1]], dtype=object), "numeric")


def test_a_row_keeps_its_split_whatever_else_is_in_the_table(loans_parquet):
    from deepyard.data.table_files import parquet
    from deepyard.data.table_stream import split_codes

    stream = parquet(str(loans_parquet), "approved")
    table = pd.concat([pd.read_parquet(file) for file in sorted(loans_parquet.glob("*.parquet"))])
    codes = split_codes(table, stream)
    assert np.array_equal(split_codes(table.iloc[::-1], stream)[::-1], codes)  # order-free
    assert np.array_equal(split_codes(table.iloc[:100], stream), codes[:100])  # whatever else is there
    shares = np.bincount(codes, minlength=3) / len(codes)
    assert shares == pytest.approx([0.7, 0.15, 0.15], abs=0.04)
    # A row's split does not depend on the dtype its block gave it (an int column is float where a
    # block has a gap, a bool column object)
    gaps = pd.DataFrame({"n": [1, 2, 3, None], "b": [True, False, True, None], "s": ["x", "y", None, "z"]})
    whole = pd.DataFrame({"n": [1, 2, 3], "b": [True, False, True], "s": ["x", "y", None]})
    assert gaps["n"].dtype == float and gaps["b"].dtype == object and whole["n"].dtype == "int64"
    assert split_codes(whole, stream).tolist() == split_codes(gaps, stream)[:3].tolist()
    from deepyard.data.table_stream import split_points

    assert np.array_equal(split_points(whole, stream), split_points(gaps, stream)[:3])
    reseeded = parquet(str(loans_parquet), "approved", split_seed=1)
    assert not np.array_equal(split_codes(table, reseeded), codes)
    # by a key: rows that share it share a split
    keyed = parquet(str(loans_parquet), "approved", split_key="region")
    by_region = pd.Series(split_codes(table, keyed)).groupby(table["region"].to_numpy()).nunique()
    assert (by_region == 1).all()


def test_a_numeric_table_is_split_by_its_seed_and_not_by_its_columns_order(tmp_path):
    from deepyard.data.table_files import parquet
    from deepyard.data.table_stream import split_codes

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"a": rng.normal(size=3000), "n": rng.integers(0, 9, 3000), "y": rng.normal(size=3000)})
    table.to_parquet(tmp_path / "part-0.parquet")
    stream = parquet(str(tmp_path), "y", task="regression", stream=True)
    codes = split_codes(table, stream)
    assert np.bincount(codes, minlength=3) / len(codes) == pytest.approx([0.7, 0.15, 0.15], abs=0.03)
    # (pandas' row hash, used before, ignores its key for numbers: every seed gave these rows one split)
    reseeded = split_codes(table, parquet(str(tmp_path), "y", task="regression", stream=True, split_seed=1))
    assert (reseeded != codes).mean() > 0.3
    assert np.array_equal(split_codes(table[["y", "n", "a"]], stream), codes)  # columns in another order
    assert np.array_equal(split_codes(table.assign(n=table["n"].astype(float)), stream), codes)  # or dtype
    assert np.array_equal(split_codes(table.assign(a=-0.0 * table["a"].abs()), stream),
                          split_codes(table.assign(a=0.0), stream))  # -0.0 is 0.0
    from deepyard.data.table_stream import row_hashes

    # a gap hashes alike in a block where its column has text and in one where it has nothing else
    only_gaps = pd.DataFrame({"a": [1.0, 2.0], "s": [None, None]})
    with_text = pd.DataFrame({"a": [1.0, 2.0, 3.0], "s": [None, None, "x"]})
    assert only_gaps["s"].dtype == object and np.array_equal(row_hashes(only_gaps, 0), row_hashes(with_text, 0)[:2])


def test_numeric_columns_encoded_at_once_match_cell_by_cell():
    from deepyard.data.tables import FLOAT32_MAX, CellError, Column, TableSchema

    frame = pd.DataFrame({"a": [1.5, np.nan, 3.0, -2.0], "c": ["x", "y", None, "x"], "n": [4, 5, 6, 7],
                          "f": np.array([0.5, 1.0, np.nan, 2.0], dtype=np.float32), "m": [1.0, 2.0, 3.0, 4.0]})
    schema = TableSchema([Column("a", "numeric", fill=9.0, indicator=True),
                          Column("c", "categorical", categories=["x", "y"], encoding="onehot"),
                          Column("n", "numeric"), Column("f", "numeric", fill=-1.0, indicator=True),
                          Column("m", "numeric", fill=0.5)])
    expected = schema.encode(frame.astype(object).to_numpy())
    assert np.array_equal(schema.encode_frame(frame), expected)
    assert np.array_equal(schema.encode_frame(frame[["m", "f", "n", "c", "a"]]), expected)  # (by name)
    for bad, value in ((np.inf, "inf"), (2.0 * FLOAT32_MAX, "6.8")):
        with pytest.raises(CellError, match=rf"column 'm', row 2: {value}.* is not a finite number"):
            schema.encode_frame(frame.assign(m=[1.0, 2.0, bad, 4.0]))


def test_a_folder_glob_or_list_streams_and_one_file_stays_in_memory(loans_parquet):
    from deepyard.data.splits import RawData
    from deepyard.data.table_files import parquet
    from deepyard.data.table_stream import TableStream

    parts = sorted(str(file) for file in loans_parquet.glob("*.parquet"))
    assert parquet(str(loans_parquet), "approved").files == parts  # (not _SUCCESS)
    assert parquet(str(loans_parquet / "part-*.parquet"), "approved").files == parts
    assert parquet(parts[:2], "approved").files == parts[:2]
    assert isinstance(parquet(parts[0], "approved"), RawData)
    assert isinstance(parquet(parts[0], "approved", stream=True), TableStream)


def test_a_column_typed_as_numbers_stays_numeric_whatever_its_first_rows_hold(tmp_path):
    from deepyard.data.table_files import parquet

    rows = 3000
    table = pd.DataFrame({"pixel": np.where(np.arange(rows) < 2500, np.arange(rows) % 2, 93).astype(np.uint8),
                          "answer": np.where(np.arange(rows) % 2, "yes", "no"), "label": np.arange(rows) % 3})
    write_parts(table, tmp_path / "pixels", "parquet")
    stream = parquet(str(tmp_path / "pixels"), "label")
    types = dict(zip(stream.columns.names, stream.columns.types))
    assert types == {"pixel": "numeric", "answer": "boolean"}  # (0 and 1 alone in the first 2,048 rows)


def test_rows_of_the_test_files_are_test_rows_however_ray_names_them(loans_parquet):
    from dataclasses import replace

    from deepyard.data.table_files import parquet
    from deepyard.data.table_stream import tally

    stream = replace(parquet(str(loans_parquet), "approved"), test_files=["s3://bucket/held_out.parquet"],
                     test_fraction=0.0)
    rows = loans(50).assign(path=["bucket/held_out.parquet"] * 30 + ["bucket/train.parquet"] * 20)
    counted = tally(rows, stream, frozenset(stream.test_files))
    assert counted["rows"][2] == 30 and counted["rows"][0] + counted["rows"][1] == 20


@pytest.mark.parametrize("params, says", [
    ("path: {missing}, target: approved", "does not exist"),
    ("path: {empty}, target: approved", "holds no parquet files (.parquet, .pq, .parq)"),
    ("path: '{folder}/*.csv', target: approved", "no file matches"),
    ("path: {folder}, target: aproved", "no column 'aproved'; did you mean 'approved'?"),
    ("path: {folder}, target: approved, drop: [incme]", "no column 'incme'"),
    ("path: {folder}, target: approved, split_key: id", "no column 'id'"),
    ("path: {folder}, target: approved, test_path: {missing}", "data.params.test_path: "),
])
def test_a_bad_table_exits_2_before_anything_starts(cli, write_spec, tmp_path, loans_parquet, params, says):
    (tmp_path / "empty").mkdir()
    params = params.format(missing=tmp_path / "nothing", empty=tmp_path / "empty", folder=loans_parquet)
    spec = write_spec(TABLE_JOB.replace("{{path: {path}, target: {target}{extra}}}", "{{" + params + "}}").format(
        name="bad_table", format="parquet", workers=1), "bad.yaml")
    result = cli("validate", spec, expect=2)
    assert says in result.stderr + result.stdout


def test_what_a_streamed_table_cannot_do_yet_exits_2(cli, write_spec, loans_parquet):
    spec = table_spec(write_spec, loans_parquet, "table_limits")
    result = cli("validate", spec, "--set", "data.max_train_samples=100", expect=2)
    assert "a streamed table is not cut short yet" in result.stderr + result.stdout
    one_file = table_spec(write_spec, loans_parquet / "part-0.parquet", "one_file", extra=", split_key: region")
    result = cli("validate", one_file, expect=2)
    assert "data.params.split_key: applies to a streamed table; set data.stream: {}" in result.stderr + result.stdout
    one_file = table_spec(write_spec, loans_parquet / "part-0.parquet", "one_file")
    assert "streamed by Ray Data" not in cli("validate", one_file).stderr
    assert "streamed by Ray Data" in cli("validate", one_file, "--set", "data.stream={}").stderr


@pytest.mark.slow
def test_statistics_and_categories_come_from_the_training_rows_only(ray_cluster, loans_parquet):
    from deepyard.data import attach_streams, load_splits
    from deepyard.data.table_stream import split_codes
    from deepyard.spec.train import StreamSpec

    splits = load_splits("parquet", {"path": str(loans_parquet), "target": "approved"}, val_fraction=0.15,
                         test_fraction=0.15, seed=0)
    attach_streams(splits, StreamSpec(shuffle="none"), seed=0)
    table = pd.concat([pd.read_parquet(file) for file in sorted(loans_parquet.glob("*.parquet"))])
    codes = split_codes(table, splits.plan)
    train = table[codes == 0]
    assert splits.sizes == dict(zip(("train", "val", "test"), np.bincount(codes, minlength=3).tolist()))

    # In memory, the same training rows fit the same schema (the median is a sketch's: within its error)
    from deepyard.data.table_files import table_data

    raw = table_data(train.reset_index(drop=True), "approved", "classification", "here")
    expected = raw.table.fit(raw.x)
    got = {column["name"]: column for column in splits.table["columns"]}
    for column in expected.columns:
        assert got[column.name]["categories"] == column.categories
        assert got[column.name]["indicator"] == column.indicator
        if column.type == "numeric":
            assert abs((train[column.name].dropna() <= got[column.name]["fill"]).mean() - 0.5) < 0.01
    features = expected.encode_frame(train)
    mean, std = splits.input_stats()
    assert mean == pytest.approx(features.mean(axis=0), abs=0.02)
    assert std == pytest.approx(features.std(axis=0), rel=0.02)
    every = expected.encode_frame(table)
    assert abs(every[:, 0].mean() - features[:, 0].mean()) > 1e-3  # (so the check above could fail)
    assert splits.counts.tolist() == [float((train["approved"] == name).sum()) for name in splits.class_names]

    # Each split's Dataset holds its own rows, encoded with that schema
    val = next(iter(splits.streams["val"].iter_batches(batch_size=10_000)))
    rows = table[codes == 1]
    from deepyard.data.tables import TableSchema

    assert np.allclose(np.sort(val["x"], axis=0), np.sort(TableSchema.from_dict(splits.table).encode_frame(rows),
                                                         axis=0))
    assert sorted(val["y"].tolist()) == sorted((rows["approved"] == "yes").astype(int).tolist())


@pytest.mark.slow
@pytest.mark.long  # (a minute: a Ray Train worker group and Ray Data's split coordinator start)
def test_a_parquet_folder_trains_on_two_workers_each_on_its_own_share(ray_cluster, cli, write_spec, loans_parquet):
    summary = last_json(cli("run", table_spec(write_spec, loans_parquet, "loans_ddp", workers=2), "--json"))
    assert summary["metrics"]["test_accuracy"] > 0.75
    client = MlflowClient()
    from deepyard.data.table_files import parquet
    from deepyard.data.table_stream import split_codes

    table = pd.concat([pd.read_parquet(file) for file in sorted(loans_parquet.glob("*.parquet"))])
    codes = split_codes(table, parquet(str(loans_parquet), "approved"))
    train_rows = int((codes == 0).sum())
    share = train_rows // 2
    share -= share % 32 == 1  # (a last batch of one sample is dropped: batch norm)
    seen = [m.value for m in client.get_metric_history(summary["run_id"], "train_samples")]
    assert seen == [2 * share] * 2  # each worker its own equal share, not the whole split twice

    # The registered model carries the schema fitted by Ray Data: its endpoint encodes raw rows with it.
    from deepyard.data.tables import TableSchema

    model = mlflow.pyfunc.load_model(f"models:/loans_ddp/{summary['model_version']}")
    schema = TableSchema.from_dict(model.metadata.metadata["table"])
    test = table[codes == 2]
    predicted = np.asarray(model.predict(schema.encode_frame(test))).argmax(axis=1)
    assert (predicted == (test["approved"] == "yes")).mean() == pytest.approx(summary["metrics"]["test_accuracy"],
                                                                              abs=1e-6)


@pytest.mark.slow
@pytest.mark.long  # (a whole job: make test keeps under its budget; CI runs it)
def test_a_csv_folder_streams_a_regression_on_one_worker(ray_cluster, cli, write_spec, tmp_path):
    table = loans(900, seed=3).assign(limit=lambda t: 2 * t["income"].to_numpy() + 5)
    folder = write_parts(table.drop(columns="approved"), tmp_path / "csv", "csv")
    spec = table_spec(write_spec, folder, "limits_csv", format="csv", target="limit", extra=", task: regression")
    summary = last_json(cli("run", spec, "--set", "train.epochs=8", "--json"))
    assert summary["metrics"]["test_rmse"] < 0.3 * table["limit"].std()  # (the targets' mean and std: training rows')
    assert summary["worker_peak_rss_mb"] > 0


@pytest.mark.slow
@pytest.mark.long  # (a job that waits ~8 s for CPUs)
def test_a_streaming_job_says_it_waits_for_cpus_that_other_work_holds_and_trains_once_they_are_free(
        ray_cluster, cli, write_spec, loans_parquet):
    import threading

    @ray_cluster.remote(num_cpus=1.5)
    class OtherWork:
        def ready(self) -> bool:
            return True

    other = OtherWork.remote()
    ray_cluster.get(other.ready.remote())
    done = threading.Timer(8, ray_cluster.kill, args=(other,))
    done.start()
    try:
        result = cli("run", table_spec(write_spec, loans_parquet, "loans_waiting"), "--json")
    finally:
        done.cancel()
        ray_cluster.kill(other)
    assert "waiting for CPUs" in result.stderr and "0.5 of the cluster's 2 CPUs are free now" in result.stderr
    assert last_json(result)["metrics"]["test_accuracy"] > 0.75


@pytest.mark.slow
def test_a_bad_cell_deep_in_the_table_fails_before_training_with_its_file(ray_cluster, cli, write_spec, tmp_path):
    table = loans(9000).astype({"income": object})
    table.loc[8500, "income"] = "n/a?"  # past the first rows, whose types are inferred
    folder = write_parts(table, tmp_path / "bad_cell", "csv")
    result = cli("run", table_spec(write_spec, folder, "bad_cell", format="csv"), expect=2)
    said = result.stderr + result.stdout
    assert "column 'income' (numeric): 'n/a?' is not a number" in said and "part-2.csv" in said


@pytest.mark.slow
@pytest.mark.long  # (a job of its own: its embedded Ray cluster's workers get the endpoint from the environment)
def test_a_job_trains_on_parquet_in_a_bucket(tmp_path, s3_server, loans_parquet):
    import json
    import os
    import subprocess
    import sys

    from deepyard.data.table_files import parquet

    s3_server["client"].create_bucket(Bucket="tables")
    for file in sorted(loans_parquet.glob("*.parquet")):
        s3_server["client"].put_object(Bucket="tables", Key=f"loans/{file.name}", Body=file.read_bytes())
    stream = parquet("s3://tables/loans", "approved")
    assert [Path(file).name for file in stream.files] == [f"part-{index}.parquet" for index in range(3)]
    assert stream.rows == 1200
    spec = tmp_path / "s3_table.yaml"
    spec.write_text(TABLE_JOB.format(name="s3_table", format="parquet", path="s3://tables/loans", target="approved",
                                     workers=1, extra=""))
    env = {**os.environ, **s3_server["env"], "DEEPYARD_HOME": str(tmp_path / "home")}
    for inherited in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # its own store and cluster
        env.pop(inherited, None)
    done = subprocess.run([sys.executable, "-m", "deepyard", "run", str(spec), "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["metrics"]["test_accuracy"] > 0.75


def test_the_median_sketch_takes_the_same_share_of_every_block(tmp_path):
    from datasketches import kll_doubles_sketch

    from deepyard.data import table_stream
    from deepyard.data.table_files import parquet

    rng = np.random.default_rng(0)
    pd.DataFrame({"x": rng.normal(size=100), "y": rng.normal(size=100)}).to_parquet(tmp_path / "t.parquet")
    stream = parquet(str(tmp_path), "y", task="regression", stream=True)
    stream.rows = 10 * table_stream.SKETCHED_ROWS  # a large table: a tenth of its rows are sketched
    counts = []
    for rows, value in ((20_000, 0.0), (2_000, 100.0)):  # a large block and a small one
        block = pd.DataFrame({"x": np.full(rows, value) + rng.normal(size=rows) * 1e-3, "y": np.zeros(rows),
                              table_stream.PATH_COLUMN: "t.parquet"})
        column = table_stream.tally(block, stream, frozenset())["columns"]["x"]
        counts.append((kll_doubles_sketch.deserialize(column["sketch"]).n, column["n"]))
    for sketched, train in counts:  # (each block: a tenth of its training rows, whatever its size)
        assert sketched == pytest.approx(train / 10, rel=0.15)
