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


class TableEmbeddings(nn.Module):
    """A table's category-code columns -> learnt vectors, after the other features: what the network
    reads in place of one-hot columns for categories too many to one-hot. Code 0 (a category not seen
    in training) is a zero vector that never trains."""

    def __init__(self, width: int, embedded: list[tuple[int, int]]):
        super().__init__()
        codes = [position for position, _ in embedded]
        plain = [i for i in range(width) if i not in codes]
        self.register_buffer("plain", torch.tensor(plain, dtype=torch.long), persistent=False)
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.long), persistent=False)
        self.tables = nn.ModuleList(nn.Embedding(count, embedding_size(count), padding_idx=0)
                                    for _, count in embedded)
        self.limits = [count - 1 for _, count in embedded]

    @property
    def out_width(self) -> int:
        return len(self.plain) + sum(table.embedding_dim for table in self.tables)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = x.index_select(1, self.codes).long()
        vectors = [table(codes[:, i].clamp(0, limit)) for i, (table, limit) in enumerate(zip(self.tables, self.limits))]
        return torch.cat([x.index_select(1, self.plain)] + vectors, dim=1)


def embedding_size(count: int) -> int:
    """fast.ai's rule of thumb for a category's vector size, at most 16 here (small tables)."""
    return min(16, round(1.6 * count**0.56))


class Pipeline(nn.Module):
    """Raw inputs -> standardized -> [table embeddings] -> network -> raw outputs (logits, or
    standardized targets)."""

    def __init__(self, net: nn.Module, stats: tuple[np.ndarray, np.ndarray] | None,
                 embeddings: TableEmbeddings | None = None):
        super().__init__()
        # Token ids (stats None) go to the network as they are.
        self.standardize = Standardize(*stats) if stats is not None else nn.Identity()
        if embeddings is not None:  # (absent otherwise: checkpoints of other models keep their keys)
            self.embeddings = embeddings
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)
        if hasattr(self, "embeddings"):
            x = self.embeddings(x)
        return self.net(x)
