"""Every model in the zoo: output shapes, and a loss that falls on a tiny batch."""

from __future__ import annotations

import pytest
import torch

from deepyard.models import MODELS
from deepyard.models.pipeline import Pipeline

IMAGE_ONLY = {"cnn", "cnn_lenet", "cnn_resnet_small"}
# (test_text.py, test_seq2seq.py, test_gan.py)
TESTED_ELSEWHERE = {"transformer_encoder", "transformer_decoder", "transformer_seq2seq", "dcgan"}


def tiny_params(name: str) -> dict:
    return {"mlp": {"hidden_sizes": [16, 8]}, "cnn": {"channels": [8, 16], "hidden_sizes": [16]},
            "cnn_resnet_small": {"width": 8}, "rnn": {"hidden_size": 16}, "lstm": {"hidden_size": 16},
            "gru": {"hidden_size": 16}}.get(name, {})


@pytest.mark.parametrize("name", sorted(set(MODELS.names()) - TESTED_ELSEWHERE))
@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28), (13,)], ids=["8x8", "28x28", "tabular"])
def test_output_shape_and_falling_loss(name, in_shape):
    if name in IMAGE_ONLY and len(in_shape) != 3:
        with pytest.raises(ValueError, match="channels, height, width"):
            MODELS.build(name, {}, in_shape=in_shape, num_outputs=3)
        return
    torch.manual_seed(0)
    model = MODELS.build(name, tiny_params(name), in_shape=in_shape, num_outputs=3)
    inputs, targets = torch.randn(32, *in_shape), torch.randint(0, 3, (32,))
    assert model(inputs).shape == (32, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3 if name in IMAGE_ONLY else 1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "gelu"])
def test_mlp_activations_and_options(activation):
    model = MODELS.build("mlp", {"hidden_sizes": [8], "activation": activation, "dropout": 0.5,
                                 "batch_norm": True}, in_shape=(4,), num_outputs=2)
    kinds = {type(m).__name__.lower() for m in model.modules()}
    assert {"batchnorm1d", "dropout"} <= kinds
    assert model(torch.randn(5, 4)).shape == (5, 2)


def test_pipeline_standardizes_raw_inputs_and_saves_its_statistics():
    mean, std = torch.tensor([10.0, -5.0]), torch.tensor([2.0, 4.0])
    pipeline = Pipeline(torch.nn.Identity(), (mean.numpy(), std.numpy()))
    assert torch.allclose(pipeline(torch.tensor([[12.0, 3.0]])), torch.tensor([[1.0, 2.0]]))
    assert set(pipeline.state_dict()) == {"standardize.mean", "standardize.std"}


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("options", [{}, {"bidirectional": True, "layers": 2, "dropout": 0.1}, {"pooling": "mean"}],
                         ids=["plain", "bidirectional-stacked", "mean-pooled"])
def test_recurrent_models_read_sequences_in_order(cell, options):
    torch.manual_seed(0)
    model = MODELS.build(cell, {"hidden_size": 8, **options}, in_shape=(12, 3), num_outputs=2).eval()
    sequences = torch.randn(5, 12, 3)
    outputs = model(sequences)
    assert outputs.shape == (5, 2)
    # the order of the steps matters (a bag of steps would not see the difference)
    assert not torch.allclose(model(sequences.flip(1)), outputs, atol=1e-5)
    # an image is read row by row: rows are the steps, each row's pixels the features
    image_model = MODELS.build(cell, {"hidden_size": 8, **options}, in_shape=(1, 8, 8), num_outputs=2)
    assert image_model.rnn.input_size == 8


def test_recurrent_models_refuse_other_shapes():
    with pytest.raises(ValueError, match=r"\(time, features\)"):
        MODELS.build("lstm", {}, in_shape=(2, 3, 4, 5), num_outputs=2)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_truncated_bptt_cuts_the_gradient_but_not_the_forward_pass(cell):
    torch.manual_seed(0)
    full = MODELS.build(cell, {"hidden_size": 8}, in_shape=(12, 1), num_outputs=1)
    truncated = MODELS.build(cell, {"hidden_size": 8, "bptt_steps": 4}, in_shape=(12, 1), num_outputs=1)
    truncated.load_state_dict(full.state_dict())
    inputs = torch.randn(3, 12, 1)

    def input_gradient(model):
        x = inputs.clone().requires_grad_(True)
        output = model.train()(x)
        output.sum().backward()
        return output.detach(), x.grad[:, :, 0].abs().sum(0)

    full_out, full_grad = input_gradient(full)
    cut_out, cut_grad = input_gradient(truncated)
    torch.testing.assert_close(full_out, cut_out)  # the same values forward
    assert (full_grad[:8] > 0).all() and (cut_grad[:8] == 0).all() and (cut_grad[8:] > 0).all()
    with pytest.raises(ValueError, match="cannot be combined with bidirectional"):
        MODELS.build(cell, {"bptt_steps": 4, "bidirectional": True}, in_shape=(12, 1), num_outputs=1)
