"""The perceptron: one linear layer and an activation, the first model of the course."""

from __future__ import annotations

from torch import nn

from deepyard.models.layers import Activation, flat_size, make_activation
from deepyard.models.registry import MODELS


@MODELS.register("perceptron")
def perceptron(
    in_shape: tuple[int, ...], num_outputs: int, activation: Activation = "identity"
) -> nn.Module:
    """``activation: identity`` with cross-entropy is multinomial logistic regression."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(flat_size(in_shape), num_outputs), make_activation(activation)
    )
