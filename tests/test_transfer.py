"""Transfer learning: a train job starts from a registered model's weights (real Ray, real MLflow),
copies what fits, freezes what it is told to, and says which source it came from."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import last_json
from deepyard import transfer
from deepyard.data import load_splits
from deepyard.errors import BadInput
from deepyard.models import MODELS
from deepyard.spec.train import ParamGroupSpec

TARGET = """
kind: train
name: {name}
data: {{name: digits, params: {{classes: [5, 6, 7, 8, 9, 0], labels_per_class: 10}}}}
model: {{name: cnn, params: {{channels: [8, 16], hidden_sizes: [{hidden}]}}}}
init: {{from: {source}, freeze: ['{freeze}']}}
optim: {{name: adam, lr: 0.01, param_groups: [{{match: '{group}', lr: 0.001}}]}}
train: {{epochs: 2, batch_size: 16}}
"""


def _cnn(num_outputs: int = 5, hidden: int = 32):
    return MODELS.build("cnn", {"channels": [8, 16], "hidden_sizes": [hidden]}, in_shape=(1, 8, 8),
                        num_outputs=num_outputs)


def test_a_new_output_layer_is_made_where_the_class_count_differs_and_other_mismatches_are_named():
    source = _cnn(5).state_dict()
    plan, fresh = transfer.copy_plan(_cnn(6), source, None)
    assert fresh == ["head.4.weight", "head.4.bias"]
    assert all(torch.equal(plan[name], source[name]) for name in plan) and "body.0.weight" in plan

    with pytest.raises(BadInput, match=r"tensor 'head.1.weight' is \(32, 64\) in the source but \(64, 64\)"):
        transfer.copy_plan(_cnn(5, hidden=64), source, None)
    plan, fresh = transfer.copy_plan(_cnn(5, hidden=64), source, [r"^body\."])  # copy less: it fits
    assert set(plan) == {n for n in source if n.startswith("body.")} and "head.1.weight" in fresh
    with pytest.raises(BadInput, match=r"init.modules: '\^tail' matches no parameter"):
        transfer.copy_plan(_cnn(5), source, ["^tail"])


def test_frozen_parameters_and_their_batch_norms_hold_until_the_unfreeze_epoch():
    net = _cnn()
    freezer = transfer.Freezer(net, [r"^body\."], unfreeze_at_epoch=3)
    assert freezer.set_epoch(1) is False  # the first call sets up; nothing to re-wrap
    assert not net.body[0].weight.requires_grad and net.head[1].weight.requires_grad
    net.train()
    freezer.hold_norms()
    assert not net.body[1].training and net.head.training  # frozen batch norm keeps its statistics
    assert freezer.set_epoch(2) is False and freezer.set_epoch(3) is True
    assert all(p.requires_grad for p in net.parameters())


def test_param_groups_take_the_first_match_and_the_rest_train_at_the_base_rate():
    net = _cnn()
    groups = transfer.param_groups(net, [ParamGroupSpec(match=r"^body\.", lr=1e-4),
                                         ParamGroupSpec(match=r"\.bias$", lr=1e-2)], lr=1e-3, weight_decay=0.0)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4, 1e-2]  # the rest first: the logged lr is optim.lr
    assert len(groups[1]["params"]) == 8 and len(groups[2]["params"]) == 2  # head biases: body's are taken
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_classes_are_kept_relabelled_and_the_label_budget_is_stratified():
    splits = load_splits("digits", {"classes": [7, 3], "labels_per_class": 5}, val_fraction=0.2,
                         test_fraction=0.2, seed=1)
    assert splits.class_names == ["7", "3"]
    assert np.bincount(splits.y_train).tolist() == [5, 5]
    assert set(np.unique(splits.y_test)) == {0, 1} and len(splits.x_val) > 20  # only the training split is budgeted
    again = load_splits("digits", {"classes": [7, 3], "labels_per_class": 5}, val_fraction=0.2, test_fraction=0.2,
                        seed=1)
    assert np.array_equal(again.x_train, splits.x_train)  # seeded
    assert len(splits.x_unlabeled) > 100  # the withheld training inputs


@pytest.mark.slow
def test_fine_tuning_from_a_registered_model_freezes_copies_and_records_its_source(digits_source, cli, write_spec):
    source = digits_source
    spec = write_spec(TARGET.format(name="tl_target", source="digits_source@champion", hidden=32, freeze=r"^body\.",
                                    group=r"^head\.1\."))
    summary = last_json(cli("run", spec, "--json"))
    assert summary["metrics"]["test_accuracy"] > 1 / 6

    client = MlflowClient()
    before = _weights(source["run_id"])
    after = _weights(summary["run_id"])
    body = [name for name in before if name.startswith("net.body.")]
    assert body and all(torch.equal(before[name], after[name]) for name in body), "a frozen tensor changed"
    assert not torch.equal(before["net.head.1.weight"], after["net.head.1.weight"])  # copied, then trained
    assert after["net.head.4.weight"].shape[0] == 6  # a new output layer for six classes
    assert not torch.equal(before["standardize.mean"], after["standardize.mean"])  # its own data's statistics

    version = client.get_model_version("tl_target", summary["model_version"])
    assert version.tags["init_from"] == f"digits_source:{source['model_version']}"
    assert client.get_run(summary["run_id"]).data.tags["deepyard.init_from"] == version.tags["init_from"]


def _weights(run_id: str) -> dict[str, torch.Tensor]:
    from deepyard import tracking

    return torch.load(tracking.download(run_id, transfer.WEIGHTS_ARTIFACT), weights_only=True)


@pytest.mark.parametrize("change, message", [
    ({"source": "no_such_model@champion"}, "unknown registered model 'no_such_model'"),
    ({"hidden": 64}, r"tensor 'head.1.weight' is \(32, 64\) in the source but \(64, 64\) here"),
    ({"freeze": "^backbone"}, r"init.freeze: '\^backbone' matches no parameter"),
    ({"group": "^tail"}, r"optim.param_groups\[0\].match: '\^tail' matches no parameter"),
    ({"freeze": ".*"}, "init.freeze: every parameter is frozen, so nothing would train"),
    ({"source": "/no/such/weights.pt"}, "init.from: no file /no/such/weights.pt"),
])
def test_bad_transfer_input_exits_2_before_ray_starts(cli, write_spec, tmp_path, change, message):
    weights = tmp_path / "source.pt"
    torch.save(_cnn(5).state_dict(), weights)  # a state-dict file a user brings
    values = {"name": "tl_bad", "source": str(weights), "hidden": 32, "freeze": r"^body\.", "group": r"^head\.",
              **change}
    result = cli("validate", write_spec(TARGET.format(**values)), expect=2)
    assert re.search(message, result.stderr), result.stderr
