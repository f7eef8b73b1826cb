"""Multi-layer perceptrons: hidden layers of Linear -> [BatchNorm] -> activation -> [Dropout].

Named parts: ``body`` (the hidden layers) then ``head`` (the output layer), as in every CNN.
"""

from __future__ import annotations

from collections import OrderedDict

from pydantic import PositiveInt
from torch import nn

from deepyard.models.layers import Activation, Dropout, flat_size, make_activation, make_dropout
from deepyard.models.registry import MODELS


@MODELS.register("mlp")
def mlp(
    in_shape: tuple[int, ...],
    num_outputs: int,
    hidden_sizes: list[PositiveInt] = [128, 64],  # noqa: B006  (read-only default, part of the schema)
    activation: Activation = "relu",
    dropout: Dropout = 0.0,
    batch_norm: bool = False,
) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = flat_size(in_shape)
    for hidden in hidden_sizes:
        layers.append(nn.Linear(width, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [make_activation(activation), make_dropout(dropout)]
        width = hidden
    return nn.Sequential(OrderedDict(body=nn.Sequential(*layers), head=nn.Linear(width, num_outputs)))
