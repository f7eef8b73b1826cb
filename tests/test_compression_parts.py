"""The pieces of `kind: compress`, without Ray: the distillation loss, pruning masks folded into
weights, units removed the same way twice, int8 that stays close to float."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from deepyard.compress import measure
from deepyard.compress.distill import NO_LABEL, Distillation
from deepyard.compress.prune import MagnitudePruning, sparsity
from deepyard.compress.quantize import for_serving, quantize_dynamic, quantize_static
from deepyard.compress.structured import remove_units
from deepyard.models import MODELS
from deepyard.models.pipeline import Pipeline


def _pipeline(name: str = "cnn", **params) -> Pipeline:
    torch.manual_seed(0)
    net = MODELS.build(name, params, in_shape=(1, 8, 8), num_outputs=5)
    return Pipeline(net, (torch.zeros(1, 1, 1).numpy(), torch.ones(1, 1, 1).numpy())).eval()


def test_distillation_mixes_the_softened_teacher_with_the_labels_and_skips_missing_labels():
    task = Distillation(num_classes=3, temperature=2.0, alpha=0.5)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 2, NO_LABEL, 1], dtype=torch.float32)
    targets = torch.cat([teacher, labels[:, None]], dim=1)
    soft = F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1), reduction="batchmean") * 4
    hard = F.cross_entropy(student[[0, 1, 3]], labels[[0, 1, 3]].long())  # the unlabelled row: teacher only
    assert task.loss(student, targets) == pytest.approx(float(0.5 * soft + 0.5 * hard), rel=1e-5)
    same = torch.cat([student, torch.full((4, 1), float(NO_LABEL))], dim=1)
    assert float(task.loss(student, same)) == pytest.approx(0.0, abs=1e-6)  # the teacher's own outputs: no loss
    assert task.loss(student, labels[[0, 1]].long().repeat(2)) == pytest.approx(
        float(F.cross_entropy(student, labels[[0, 1]].long().repeat(2))))  # validation targets: plain labels


def test_magnitude_pruning_masks_while_training_and_folds_into_plain_weights():
    model = _pipeline()
    hook = MagnitudePruning(0.7)
    hook.prepare(model, None, None)
    assert sparsity(model.net) == pytest.approx(0.7, abs=0.01)
    assert any(name.endswith("weight_orig") for name in model.state_dict())  # masked while it fine-tunes
    hook.finish(model)
    assert not any(name.endswith(("_orig", "_mask")) for name in model.state_dict())
    assert sparsity(model.net) == pytest.approx(0.7, abs=0.01)
    assert measure.nonzero_parameters(model) < 0.4 * measure.parameters(model)


def test_structured_pruning_removes_units_and_is_the_same_on_every_copy():
    model, example = _pipeline(channels=[8, 16], hidden_sizes=[32]), torch.rand(4, 1, 8, 8)
    twin = copy.deepcopy(model)
    before = measure.parameters(model)
    remove_units(model, example, 0.5)
    remove_units(twin, example, 0.5)
    assert measure.parameters(model) < 0.4 * before
    assert [p.shape for p in model.parameters()] == [p.shape for p in twin.parameters()]
    assert model(example).shape == (4, 5)  # the output layer keeps every class
    assert measure.stored_bytes(model)[0] < measure.stored_bytes(_pipeline(channels=[8, 16], hidden_sizes=[32]))[0]


def test_dynamic_int8_stays_close_to_float_and_stores_smaller():
    model, example = _pipeline("mlp", hidden_sizes=[256]), torch.rand(16, 1, 8, 8)
    quantized = quantize_dynamic(model)
    assert (quantized(example) - model(example)).abs().max() < 0.05
    assert measure.stored_bytes(quantized)[0] < measure.stored_bytes(model)[0] / 3
    assert measure.parameters(model) == sum(p.numel() for p in model.parameters())  # the float model is untouched


@pytest.mark.slow  # ~2.6 s of a core: make test-fast skips it
def test_static_int8_quantizes_convolutions_too_and_serves_as_torchscript(tmp_path):
    model, example = _pipeline(channels=[8, 16], hidden_sizes=[32]), torch.rand(64, 1, 8, 8)
    quantized = quantize_static(model, example.numpy())
    assert (quantized(example) - model(example)).abs().max() < 0.1
    assert measure.stored_bytes(quantized)[0] < measure.stored_bytes(model)[0] / 1.3  # scales weigh on a tiny net
    for module in (quantized, quantize_dynamic(model)):
        scripted = for_serving(module, example[:2])
        torch.jit.save(scripted, tmp_path / "model.pt")
        loaded = torch.jit.load(tmp_path / "model.pt")
        assert torch.equal(loaded(example[:7]), module(example[:7]))  # any batch size, the same outputs


def test_a_weight_tied_to_an_embedding_is_not_pruned():
    net = MODELS.build("transformer_decoder", {"width": 16, "layers": 1, "heads": 2}, in_shape=(8,),
                       num_outputs=20, vocab_size=20)
    from deepyard.compress.prune import prunable

    shared = {id(p) for m in net.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    assert prunable(net) and not any(id(module.weight) in shared for module, _ in prunable(net))
