"""Pruning with ``torch.nn.utils.prune``: the smallest-magnitude weights of all Conv and Linear layers
together are masked to zero (global magnitude pruning) and the rest fine-tuned.

Masks alone neither shrink a model nor speed it up (pytorch issues 32928, 36214): the stored file
shrinks only once compressed, and dense kernels run as fast as before. Structured pruning removes
whole units instead.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def prunable(net: nn.Module) -> list[tuple[nn.Module, str]]:
    """Conv and Linear weights, except one shared with another module (a language model's output layer
    tied to its embedding): masking it in one place would change the other unseen."""
    uses: dict[int, int] = {}
    for module in net.modules():
        for parameter in module.parameters(recurse=False):
            uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    own = lambda module: getattr(module, "weight_orig", module.weight)  # noqa: E731  (masked: the original)
    return [(module, "weight") for module in net.modules()
            if isinstance(module, PRUNABLE) and uses.get(id(own(module)), 0) == 1]


def sparsity(net: nn.Module) -> float:
    """The share of zero weights over the prunable layers."""
    weights = [getattr(module, name) for module, name in prunable(net)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


class MagnitudePruning:
    """The training loop's hook: masks ``amount`` of the weights before the first step; the masks
    stay on while it fine-tunes, and are folded into the weights at the end."""

    def __init__(self, amount: float):
        self.amount = amount

    def prepare(self, model: nn.Module, splits, task, uri: str | None = None):
        prune.global_unstructured(prunable(model.net), pruning_method=prune.L1Unstructured, amount=self.amount)
        return splits, task

    def finish(self, model: nn.Module) -> None:
        for module, name in prunable(model.net):
            if prune.is_pruned(module):
                prune.remove(module, name)
