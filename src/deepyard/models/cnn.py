"""Convolutional networks: conv/pool blocks, then a fully connected head.

``cnn`` is the general family; ``cnn_lenet`` and ``cnn_resnet_small`` are presets (more builders,
not flags). Each is ``body`` (the features a transfer job reuses or freezes) then ``head``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from pydantic import PositiveInt
from torch import nn

from deepyard.models.layers import Activation, Dropout, make_activation, make_dropout
from deepyard.models.registry import MODELS


def _image_shape(in_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ValueError(
            f"a CNN needs image inputs shaped (channels, height, width), got {tuple(in_shape)}; "
            "use an image data set (digits, fashion_mnist, mnist_idx) or the mlp model"
        )
    return in_shape  # type: ignore[return-value]


def _head(features: int, hidden: list[int], num_outputs: int, act: Activation, dropout: float):
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(features, width), make_activation(act), make_dropout(dropout)]
        features = width
    layers.append(nn.Linear(features, num_outputs))
    return nn.Sequential(*layers)


def _body_and_head(body: nn.Module, head: nn.Module) -> nn.Sequential:
    """Named parts, so parameters read ``body.0.weight`` and ``head.3.bias`` (``init.freeze: ['^body']``)."""
    return nn.Sequential(OrderedDict(body=body, head=head))


def _out_features(body: nn.Module, in_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return body(torch.zeros(1, *in_shape)).numel()


@MODELS.register("cnn")
def cnn(
    in_shape: tuple[int, ...],
    num_outputs: int,
    channels: list[PositiveInt] = [32, 64],  # noqa: B006
    kernel_size: PositiveInt = 3,
    pool_every: PositiveInt = 1,  # a 2x2 max-pool after every n-th conv block
    hidden_sizes: list[PositiveInt] = [128],  # noqa: B006
    activation: Activation = "relu",
    batch_norm: bool = True,
    dropout: Dropout = 0.25,
) -> nn.Module:
    image = _image_shape(in_shape)
    blocks: list[nn.Module] = []
    in_channels, size = image[0], min(image[1:])
    for index, out_channels in enumerate(channels, start=1):
        blocks.append(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2))
        if batch_norm:
            blocks.append(nn.BatchNorm2d(out_channels))
        blocks.append(make_activation(activation))
        if index % pool_every == 0 and size >= 2:
            blocks.append(nn.MaxPool2d(2))
            size //= 2
        in_channels = out_channels
    body = nn.Sequential(*blocks)
    head = _head(_out_features(body, image), hidden_sizes, num_outputs, activation, dropout)
    return _body_and_head(body, head)


@MODELS.register("cnn_lenet")
def cnn_lenet(in_shape: tuple[int, ...], num_outputs: int, activation: Activation = "tanh"):
    """LeNet-5's layout: two 5x5 conv + pool blocks (6 and 16 maps), then 120 -> 84 -> outputs."""
    image = _image_shape(in_shape)
    body = nn.Sequential(
        nn.Conv2d(image[0], 6, 5, padding=2), make_activation(activation), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), make_activation(activation), nn.MaxPool2d(2),
    )
    head = _head(_out_features(body, image), [120, 84], num_outputs, activation, 0.0)
    return _body_and_head(body, head)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


@MODELS.register("cnn_resnet_small")
def cnn_resnet_small(
    in_shape: tuple[int, ...], num_outputs: int, width: PositiveInt = 32, dropout: Dropout = 0.1
) -> nn.Module:
    """A stem conv, two residual stages (the second at half resolution, double width), global pooling."""
    image = _image_shape(in_shape)
    body = nn.Sequential(
        nn.Conv2d(image[0], width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        ResidualBlock(width),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        ResidualBlock(2 * width),
        nn.AdaptiveAvgPool2d(1),
    )
    return _body_and_head(body, nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, num_outputs)))
