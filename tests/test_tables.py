"""Tables as users have them (categories, booleans, gaps, CSV and Parquet), served as objects keyed
by column name; and fairness: per-group metrics, disparities and a mitigated version, with fairlearn
as the oracle. The end-to-end checks run real Ray, MLflow and Serve over real HTTP."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import free_port, last_json
from deepyard.data import DATASETS, load_splits
from deepyard.data.tables import TableSchema
from deepyard.errors import DataError
from deepyard.models.pipeline import Pipeline, TableEmbeddings
from deepyard.serve.payloads import ArrayCodec, BadRequest

CITIES = [f"city{i}" for i in range(12)]


def people(rows: int = 300, seed: int = 0) -> pd.DataFrame:
    """A mixed table whose outcome depends on every kind of column, with gaps in three of them."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "id": [f"p{i:05d}" for i in range(rows)],
        "age": rng.integers(18, 80, rows).astype(float),
        "colour": rng.choice(["Red", "Blue", "Green"], rows, p=[0.5, 0.3, 0.2]),
        "member": rng.choice(["yes", "no"], rows),
        "city": rng.choice(CITIES, rows),
        "group": rng.choice(["a", "b"], rows, p=[0.7, 0.3]),
        "grade": rng.integers(1, 4, rows),  # small integer codes: a category by the spec's word
    })
    score = (frame.age - 50) / 15 + (frame.colour == "Red") * 1.5 + (frame.member == "yes") - (frame.grade == 2)
    frame["outcome"] = np.where(score + rng.normal(0, 0.7, rows) > 0.3, "good", "bad")
    frame.loc[rng.random(rows) < 0.1, "age"] = np.nan
    frame.loc[rng.random(rows) < 0.1, "member"] = None
    frame.loc[rng.random(rows) < 0.05, "colour"] = None
    return frame


PARAMS = {"target": "outcome", "drop": ["id"], "max_onehot": 8, "columns": {"grade": {"type": "categorical"}}}


def splits_of(frame: pd.DataFrame, tmp_path, **params):
    path = tmp_path / "people.csv"
    frame.to_csv(path, index=False)
    return load_splits("csv", {"path": str(path), **PARAMS, **params}, val_fraction=0.2, test_fraction=0.2, seed=0,
                       sensitive=["group"])


def test_column_types_are_inferred_or_set_and_fitted_on_the_training_split_only(tmp_path):
    splits = splits_of(people(), tmp_path)
    schema = TableSchema.from_dict(splits.table)
    kinds = {c.name: (c.type, c.encoding, c.indicator) for c in schema.columns}
    assert kinds == {"age": ("numeric", None, True), "colour": ("categorical", "onehot", False),
                     "member": ("boolean", None, True), "city": ("categorical", "embedding", False),
                     "grade": ("categorical", "onehot", False)}  # id dropped, group sensitive: not features
    assert "<missing>" in schema.columns[1].categories  # a gap in a category is a category of its own
    assert splits.feature_names[:2] == ["age", "age_missing"] and "grade=2" in splits.feature_names
    assert splits.in_shape == (schema.width,) and splits.x_train.dtype == np.float32
    assert set(splits.groups["test"]) == {"a", "b"} and len(splits.groups["test"]) == len(splits.y_test)
    # The fill value is the training rows' median: read back from their encoded (age, age_missing).
    ages, missing = splits.x_train[:, 0], splits.x_train[:, 1]
    assert schema.columns[0].fill == pytest.approx(np.median(ages[missing == 0]))
    assert (ages[missing == 1] == schema.columns[0].fill).all()


def test_a_category_training_never_saw_is_the_unknown_bucket(tmp_path):
    frame = people()
    frame.loc[frame.index[:3], "colour"] = "Purple"  # three rows: one split at most can hold them all
    splits = splits_of(frame, tmp_path)
    colour = TableSchema.from_dict(splits.table).columns[1]
    encoded = colour.encode(np.array(["Mauve", "Red", None], dtype=object))
    assert encoded[0].sum() == 0  # never seen: all zeros
    assert encoded[1, colour.categories.index("Red")] == 1
    assert encoded[2, colour.categories.index("<missing>")] == 1
    city = TableSchema.from_dict(splits.table).columns[3]
    assert city.encoding == "embedding" and city.encode(np.array(["Atlantis"], dtype=object))[0, 0] == 0


def _write(frame: pd.DataFrame, tmp_path, name: str = "t.csv"):
    path = tmp_path / name
    frame.to_parquet(path) if name.endswith(".parquet") else frame.to_csv(path, index=False)
    return path


def test_parquet_reads_the_same_table_as_csv(tmp_path):
    frame = people()
    csv = splits_of(frame, tmp_path)
    path = _write(frame, tmp_path, "people.parquet")
    parquet = load_splits("parquet", {"path": str(path), **PARAMS}, val_fraction=0.2, test_fraction=0.2, seed=0,
                          sensitive=["group"])
    assert parquet.feature_names == csv.feature_names
    np.testing.assert_allclose(parquet.x_test, csv.x_test)


@pytest.mark.parametrize("change, params, message", [
    (lambda f: f.assign(age=np.nan), {}, "column 'age' has no values"),
    (lambda f: f.assign(outcome="good"), {}, "single class"),
    (lambda f: f, {"drop": []}, "'id' looks like an identifier"),
    (lambda f: f, {"drop": ["idd"]}, "no column 'idd'; did you mean 'id'"),
    (lambda f: f.assign(outcome=f.outcome.where(f.index > 3)), {}, "target 'outcome' is missing in 4 rows"),
    (lambda f: f, {"columns": {"colour": {"type": "numeric"}}}, r"'colour' \(numeric\), row \d+: '\w+' is not a"),
    (lambda f: f, {"columns": {"age": {"encoding": "onehot"}}}, "encoding 'onehot' is for categorical columns"),
])
def test_bad_tables_exit_2_before_ray_starts_with_the_reason(cli, write_spec, tmp_path, change, params, message):
    path = _write(change(people()), tmp_path)
    data = {"name": "csv", "params": {"path": str(path), **PARAMS, **params}}
    result = cli("run", write_spec(f"name: t\ndata: {json.dumps(data)}\nmodel: {{name: mlp}}\n"), expect=2)
    assert re.search(message, result.stderr), result.stderr


def test_a_file_that_is_not_a_table_is_refused(tmp_path):
    garbage = tmp_path / "t.parquet"
    garbage.write_bytes(b"\x00\x01 not parquet at all")
    with pytest.raises(DataError, match="cannot be read as parquet"):
        DATASETS.build("parquet", {"path": str(garbage), "target": "y"})
    binary = tmp_path / "t.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="cannot be read as CSV|one column only"):
        DATASETS.build("csv", {"path": str(binary), "target": "y"})


def test_embedded_categories_reach_the_network_as_codes_and_export(tmp_path):
    splits = splits_of(people(), tmp_path)
    (position, codes), = splits.embedded()
    mean, std = splits.input_stats()
    assert (mean[position], std[position]) == (0.0, 1.0)  # codes are not standardized
    embeddings = TableEmbeddings(splits.in_shape[0], splits.embedded())
    net = torch.nn.Linear(embeddings.out_width, 2)
    pipeline = Pipeline(net, (mean, std), embeddings).eval()
    x = torch.from_numpy(splits.x_test[:4])
    program = torch.export.export(pipeline, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.testing.assert_close(program.module()(x), pipeline(x))
    unseen = x.clone()
    unseen[:, position] = codes + 5  # a code past the table (never sent by the codec) is clamped, not an error
    assert torch.isfinite(pipeline(unseen)).all()


def served_metadata(splits) -> dict:
    return {"task": "classification", "input_shape": list(splits.in_shape), "table": splits.table,
            "class_names": splits.class_names}


def test_instances_are_objects_or_lists_and_bad_ones_are_400s_that_name_the_column(tmp_path):
    splits = splits_of(people(), tmp_path)
    metadata, codec = served_metadata(splits), ArrayCodec()
    row = {"age": 40, "colour": "Red", "member": True, "city": "city3", "grade": 2}
    batch = codec.decode({"instances": [row, list(row.values()), {**row, "colour": "Mauve", "age": None}]},
                         metadata, 8)
    assert batch.shape == (3, splits.in_shape[0]) and (batch[0] == batch[1]).all()
    assert codec.example(batch[0], metadata) == {**row, "member": True, "grade": "2", "age": 40.0}
    for instance, message in [({k: v for k, v in row.items() if k != "city"}, "no column 'city'"),
                              ({**row, "age": [40, 50]}, "column 'age': a list; each column takes one value"),
                              ({**row, "age": 10**400}, "column 'age': 1000000.* is out of range"),
                              ({**row, "age": 1e39}, "column 'age': 1e\\+39 is not a finite number"),
                              ({**row, "agee": 3}, "unknown column 'agee'"),
                              ({**row, "age": "old"}, "column 'age': 'old' is not a number"),
                              ({**row, "member": "maybe"}, "column 'member': 'maybe' is not a boolean"),
                              ([1, 2], "a list of 2 values")]:
        with pytest.raises(BadRequest, match=message):
            codec.decode({"instances": [row, instance]}, metadata, 8)
    assert "columns age, colour, member, city, grade" in codec.expected(metadata)
    # The sensitive column is not a feature, but a request may carry it (as the mitigated version's must)
    assert codec.decode({"instances": [{**row, "group": "a"}]}, metadata, 8).shape == (1, splits.in_shape[0])


# -- fairness --------------------------------------------------------------------------------------

def test_group_metrics_and_disparities_match_fairlearn():
    from fairlearn.metrics import MetricFrame, equalized_odds_difference, selection_rate

    from deepyard.fairness.measure import report, resampled_disparities

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 500)
    groups = rng.choice(["a", "b", "c"], 500).astype(object)
    predicted = np.where(rng.random(500) < np.where(groups == "a", 0.9, 0.7), truth, 1 - truth)
    found = report(truth, predicted, groups, 1, bootstrap=100, seed=0)
    frame = MetricFrame(metrics=selection_rate, y_true=truth, y_pred=predicted, sensitive_features=groups)
    for group, rate in frame.by_group.items():
        assert found.by_group[group]["selection_rate"] == pytest.approx(rate)
    assert found.disparities["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(truth, predicted, sensitive_features=groups))
    low, high = found.intervals["equalized_odds_difference"]
    assert 0 <= low < high <= 1
    # One vectorized resample is the same number fairlearn gives on the rows it drew.
    draws = resampled_disparities(truth, predicted, groups, 1, seed=7)
    counts = np.random.default_rng(7).multinomial(500, np.full(500, 1 / 500), size=1)[0]
    rows = np.repeat(np.arange(500), counts)
    assert draws["equalized_odds_difference"][0] == pytest.approx(
        equalized_odds_difference(truth[rows], predicted[rows], sensitive_features=groups[rows]))


@pytest.mark.parametrize("constraint, saturated", [("equalized_odds", False), ("demographic_parity", False),
                                                   ("equalized_odds", True)])
def test_the_served_thresholds_are_the_optimizers_own(constraint, saturated):
    from deepyard.fairness.mitigate import FairDecisions, draw_labels, fit_thresholds, rules

    rng = np.random.default_rng(2)
    groups = rng.choice(["a", "b"], 2000).astype(object)
    truth = rng.integers(0, 2, 2000)
    scores = np.clip(truth * 0.3 + rng.random(2000) * 0.7 + (groups == "a") * 0.1, 0, 1)
    if saturated:  # a softmax near 1: neighbouring scores one float32 step apart
        scores = 1 - 2.0**-24 * rng.integers(0, 8, 2000)
    scores = scores.astype(np.float32).astype(np.float64)  # what a model's probabilities are
    optimizer = fit_thresholds(scores, truth, groups, constraint=constraint, objective="accuracy_score")
    keys = sorted(optimizer.interpolated_thresholder_.interpolation_dict)

    class Scores(torch.nn.Module):  # a "model" whose favourable probability is its first feature
        def forward(self, x):
            return torch.stack([1 - x[:, 0], x[:, 0]], dim=1)

    module = FairDecisions(Scores(), 1, rules(optimizer, keys))
    x = torch.tensor(np.stack([scores, [keys.index(g) for g in groups]], axis=1), dtype=torch.float32)
    assert (x[:, 0].double().numpy() == scores).all()  # the scores are float32 numbers, as a model's are
    expected = optimizer._pmf_predict(scores[:, None], sensitive_features=groups)
    np.testing.assert_allclose(module(x).numpy(), expected, atol=1e-5)
    instances = [{"i": i} for i in range(2000)]
    labels = draw_labels(module(x).numpy(), instances, 1)
    assert (labels == draw_labels(module(x).numpy(), instances, 1)).all()  # the same request, the same answer
    assert abs(labels.mean() - expected[:, 1].mean()) < 0.03  # ...and the optimizer's rates over many


# -- end to end ------------------------------------------------------------------------------------

JOB = """
kind: train
name: people
data: {{name: csv, params: {{path: {path}, target: outcome, drop: [id], max_onehot: 8,
                              columns: {{grade: {{type: categorical}}}}}}}}
model: {{name: mlp, params: {{hidden_sizes: [16]}}}}
train: {{epochs: 6, batch_size: 32}}
register: {{model_name: people}}
fairness: {{sensitive: [group], mitigation: threshold_optimizer, bootstrap: 50, positive_label: good}}
"""


@pytest.fixture(scope="module")
def fair_endpoint(ray_cluster, tmp_path_factory):
    from ray import serve
    from typer.testing import CliRunner

    from deepyard.cli import app
    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions

    folder = tmp_path_factory.mktemp("tables")
    path = _write(people(600), folder)
    spec = folder / "job.yaml"
    spec.write_text(JOB.format(path=path))
    result = CliRunner().invoke(app, ["run", str(spec), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    summary = last_json(result)
    port = free_port()
    deploy.start([EndpointOptions(model="people:1", num_cpus=0.5)], host="127.0.0.1", port=port)
    yield {"url": f"http://127.0.0.1:{port}", "summary": summary, "port": port}
    serve.shutdown()


ROW = {"age": 61, "colour": "Red", "member": "yes", "city": "city1", "grade": 3}


@pytest.mark.slow
def test_a_mixed_table_trains_registers_and_answers_objects_over_http(fair_endpoint):
    base = fair_endpoint["url"]
    answer = httpx.post(f"{base}/models/people/predict", timeout=30, json={"instances": [
        ROW, {**ROW, "age": None, "member": None, "colour": "Mauve"}, list(ROW.values())]})
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert predictions[0] == predictions[2] and {p["label"] for p in predictions} <= {"good", "bad"}
    missing = httpx.post(f"{base}/models/people/predict", json={"instances": [{"age": 3}]}, timeout=30)
    assert missing.status_code == 400 and "no column 'colour'" in missing.json()["error"]
    with_group = httpx.post(f"{base}/models/people/predict", json={"instances": [{**ROW, "group": "a"}]}, timeout=30)
    assert with_group.json()["predictions"][0] == predictions[0]  # carried, not read: the mitigated one needs it
    wrong = httpx.post(f"{base}/models/people/predict", json={"instances": [{**ROW, "age": "old"}]}, timeout=30)
    assert wrong.status_code == 400 and "column 'age'" in wrong.json()["error"]
    v2 = httpx.post(f"{base}/v2/models/people/infer", timeout=30, json={"inputs": [
        {"name": "input", "datatype": "BYTES", "shape": [1], "data": [json.dumps(ROW)]}]})  # a row: a JSON object
    assert v2.status_code == 200, v2.text
    labels = {output["name"]: output["data"] for output in v2.json()["outputs"]}["label"]
    assert labels == [predictions[0]["label"]]
    page = httpx.get(f"{base}/models/people/", timeout=30).json()
    assert [c["name"] for c in page["columns"]] == ["age", "colour", "member", "city", "grade"]
    assert page["columns"][3]["encoding"] == "embedding" and "sensitive" not in page


@pytest.mark.slow
def test_a_fairness_job_logs_its_metrics_and_serves_a_mitigated_version(fair_endpoint):
    from deepyard import tracking

    summary = fair_endpoint["summary"]
    run = tracking.get_run(summary["run_id"])
    for name in ("test_fairness_equalized_odds_difference", "test_fairness_equalized_odds_difference_ci_high",
                 "test_fairness_balanced_accuracy", "test_mitigated_equalized_odds_difference"):
        assert name in run.data.metrics, name
    assert set(summary["fairness"]["by_group"]) == {"a", "b"}
    assert summary["mitigated"]["model_version"] == "2"
    tags = tracking.client().get_model_version("people", "1").tags
    assert tags["fairness.sensitive"] == "group" and "fairness.equalized_odds_difference.ci95" in tags
    fair_tags = tracking.client().get_model_version("people", "2").tags
    assert fair_tags["fairness.mitigates_version"] == "1" and fair_tags["fairness.mitigation"] == "threshold_optimizer"
    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions

    # The mitigated version replaces the plain one at /models/people (a model is deployed once at a time)
    deploy.start([EndpointOptions(model="people@fair", num_cpus=0.5)], host="127.0.0.1", port=fair_endpoint["port"])
    base = fair_endpoint["url"]
    without_group = httpx.post(f"{base}/models/people/predict", json={"instances": [ROW]}, timeout=30)
    assert without_group.status_code == 400 and "no column 'group'" in without_group.json()["error"]
    unknown = httpx.post(f"{base}/models/people/predict", json={"instances": [{**ROW, "group": "z"}]}, timeout=30)
    assert unknown.status_code == 400 and "group 'z' is not among those the thresholds" in unknown.json()["error"]
    body = {"instances": [{**ROW, "group": "a"}, {**ROW, "group": "b"}, {**ROW, "age": 20, "group": "b"}]}
    first = httpx.post(f"{base}/models/people/predict", json=body, timeout=30)
    assert first.status_code == 200, first.text
    again = httpx.post(f"{base}/models/people/predict", json=body, timeout=30)
    assert first.json() == again.json()  # a drawn decision, the same for the same request
    assert httpx.get(f"{base}/models/people/", timeout=30).json()["sensitive"]["columns"] == ["group"]
    explained = httpx.post(f"{base}/models/people/explain", json=body, timeout=30)
    assert explained.status_code == 400 and "per-group thresholds" in explained.json()["error"]


@pytest.mark.parametrize("data, fairness, message", [
    ("digits", "{sensitive: [colour]}", "fairness.sensitive: data 'digits' is not a table"),
    ("arrests", "{sensitive: [colur]}", "no column 'colur'; did you mean 'colour'"),
    ("arrests", "{sensitive: [colour], positive_label: Maybe}", "'Maybe' is not a class"),
])
def test_bad_fairness_blocks_exit_2_before_ray_starts(cli, write_spec, data, fairness, message):
    spec = write_spec(f"name: f\ndata: {{name: {data}}}\nmodel: {{name: mlp}}\nfairness: {fairness}\n")
    result = cli("run", spec, expect=2)
    assert message in result.stderr, result.stderr


def test_mitigation_needs_both_outcomes_in_each_validation_group():
    from types import SimpleNamespace

    from deepyard.errors import BadInput
    from deepyard.fairness.options import FairnessSpec
    from deepyard.runners.fairness import check
    from deepyard.tasks.classification import Classification

    groups = np.array(["a", "a", "b", "b"], dtype=object)
    splits = SimpleNamespace(class_names=["bad", "good"], y_val=np.array([0, 1, 1, 1]),
                             groups={"val": groups, "test": groups})
    options = FairnessSpec(sensitive=["g"], mitigation="threshold_optimizer")
    with pytest.raises(BadInput, match="group\\(s\\) b have only one outcome"):
        check(options, splits, Classification(num_classes=2))
    check(options.model_copy(update={"mitigation": None}), splits, Classification(num_classes=2))  # measured: fine
    assert FairnessSpec(sensitive=["g"], positive_label=1).positive_label == "1"


def test_arrests_is_bundled_with_its_sensitive_columns():
    splits = load_splits("arrests", {}, val_fraction=0.2, test_fraction=0.2, seed=0, sensitive=["colour"])
    assert splits.class_names == ["No", "Yes"] and set(splits.groups["test"]) == {"Black", "White"}
    assert "colour" not in json.dumps(splits.feature_names) and len(splits.y_train) + len(splits.y_val) + len(
        splits.y_test) == 5226


def test_balanced_class_weights_weigh_the_training_loss_by_rarity():
    import torch.nn.functional as F

    from deepyard.runners.setup import class_weights
    from deepyard.tasks.classification import Classification

    splits = load_splits("arrests", {}, val_fraction=0.2, test_fraction=0.2, seed=0)
    weights = class_weights(splits)
    counts = np.bincount(splits.y_train)
    assert weights[0] * counts[0] == pytest.approx(weights[1] * counts[1])  # each class weighs the same in all
    assert weights[0] > 2 * weights[1]  # "not released" is the rare one
    task = Classification(num_classes=2, class_weights=weights)
    outputs, targets = torch.randn(16, 2), torch.randint(0, 2, (16,))
    torch.testing.assert_close(task.loss(outputs, targets),
                               F.cross_entropy(outputs, targets, weight=torch.tensor(weights)))
    plain = Classification(num_classes=2)
    torch.testing.assert_close(plain.loss(outputs, targets), F.cross_entropy(outputs, targets))


def test_class_weight_is_refused_where_there_are_no_classes(cli, write_spec):
    spec = write_spec("name: r\ndata: {name: diabetes}\nmodel: {name: mlp}\ntrain: {class_weight: balanced}\n")
    assert "train.class_weight: a regression job has no classes" in cli("run", spec, expect=2).stderr
