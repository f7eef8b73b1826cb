"""Small building blocks shared by the model families."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from torch import nn

Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "gelu", "identity"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def make_activation(name: Activation) -> nn.Module:
    return _ACTIVATIONS[name]()


def flat_size(in_shape: tuple[int, ...]) -> int:
    size = 1
    for dim in in_shape:
        size *= dim
    return size

# A dropout probability: 0 turns it off, 1 would drop everything.
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


def make_dropout(p: float) -> nn.Module:
    """Dropout, or a no-op in its place when ``p`` is 0: either way the layer numbering, and so the
    checkpoint's keys, stay the same (PBT moves weights between trials with different ``p``)."""
    return nn.Dropout(p) if p else nn.Identity()
