"""Classification: softmax cross-entropy; accuracy, macro F1 and a confusion matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Probabilities(nn.Module):
    """Serving head: class probabilities for raw inputs."""

    def __init__(self, pipeline: nn.Module):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.pipeline(x), dim=-1)


class Classification:
    name = "classification"
    monitor, monitor_mode = "val_accuracy", "max"
    metric_names = ("loss", "accuracy")

    def __init__(self, num_classes: int, **_: object):
        self.num_classes = num_classes

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
        """[summed loss, correct predictions, samples] for one batch; ``loss``, the batch's mean loss
        if the caller has it, saves computing it twice."""
        count = torch.full((), float(len(targets)), device=outputs.device)  # no host->device copy
        total = (loss.detach().float() * count if loss is not None
                 else F.cross_entropy(outputs.float(), targets, reduction="sum"))
        correct = (outputs.argmax(dim=-1) == targets).sum(dtype=torch.float32)
        return torch.stack([total, correct, count])

    def metrics(self, sums: torch.Tensor, prefix: str) -> dict[str, float]:
        loss, correct, count = sums.tolist()
        count = max(count, 1.0)
        return {f"{prefix}_loss": loss / count, f"{prefix}_accuracy": correct / count}

    def confusion(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        index = targets * self.num_classes + outputs.argmax(dim=-1)
        counts = torch.bincount(index, minlength=self.num_classes**2)
        return counts.reshape(self.num_classes, self.num_classes)

    @staticmethod
    def macro_f1(confusion: torch.Tensor) -> float:
        confusion = confusion.double()
        true_pos = confusion.diag()
        precision = true_pos / confusion.sum(0).clamp(min=1)
        recall = true_pos / confusion.sum(1).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        return float(f1.mean())

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return Probabilities(pipeline)
