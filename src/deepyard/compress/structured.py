"""Structured pruning with Torch-Pruning: whole channels and neurons are removed, with everything
that depends on them (the next layer's inputs, batch norms, residual branches), so that the model
really has fewer parameters, a smaller file and faster dense kernels. Units go by their weights'
L2 norm; the output layer keeps every unit.

The pruning is deterministic given the weights, so every worker, and the driver that logs the result,
derive the same smaller architecture from the same parent.
"""

from __future__ import annotations

import torch
from torch import nn

from deepyard import transfer
from deepyard.errors import BadInput


def remove_units(pipeline: nn.Module, example: torch.Tensor, amount: float) -> None:
    """Remove ``amount`` of the units of each layer of ``pipeline.net`` but the output layer, in place."""
    import torch_pruning as tp

    net = pipeline.net
    output = net.get_submodule(transfer.output_layer(net)[0].rsplit(".", 1)[0])
    training = net.training
    net.eval()
    with torch.no_grad():
        inputs = pipeline.standardize(example)
    pruner = tp.pruner.MetaPruner(net, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=amount, ignored_layers=[output])
    pruner.step()
    net.train(training)


def check_structured(pipeline: nn.Module, splits) -> None:
    """Torch-Pruning can trace the network (on a copy): exit 2 before Ray starts if not."""
    import copy

    trial = copy.deepcopy(pipeline)
    example = torch.from_numpy(splits.x_train[:2])
    try:
        remove_units(trial, example, 0.5)
        trial.eval()(example)
    except Exception as error:
        raise BadInput(f"method prune, structured: Torch-Pruning cannot remove units of this network ({error}); "
                       "use structured: false") from None


class StructuredPruning:
    """The training loop's hook: the units go before the first step; the smaller model fine-tunes."""

    def __init__(self, amount: float):
        self.amount = amount

    def prepare(self, model: nn.Module, splits, task, uri: str | None = None):
        remove_units(model, torch.from_numpy(splits.x_train[:2]), self.amount)
        return splits, task

    def finish(self, model: nn.Module) -> None:
        pass
