"""The network plus the preprocessing fitted on the training split, saved and served as one module.

Inputs stay in the data set's own units all the way to the model: the fitted mean and std are
buffers, so they travel in every checkpoint and in the logged model, and serving needs nothing else.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Standardize(nn.Module):
    """``(x - mean) / std`` as one fused multiply-add: on a GPU, small models are bound by kernel
    launches, and this runs on every step. ``mean`` and ``std`` are the saved state; the scale and
    shift are derived from them (again after every ``load_state_dict``)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.register_buffer("scale", torch.empty(0), persistent=False)
        self.register_buffer("shift", torch.empty(0), persistent=False)
        self._derive()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._derive())

    def _derive(self) -> None:
        self.scale = 1.0 / self.std
        self.shift = -self.mean * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class Pipeline(nn.Module):
    """Raw inputs -> standardized -> network -> raw outputs (logits, or standardized targets)."""

    def __init__(self, net: nn.Module, stats: tuple[np.ndarray, np.ndarray] | None):
        super().__init__()
        # Token ids (stats None) go to the network as they are.
        self.standardize = Standardize(*stats) if stats is not None else nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))
