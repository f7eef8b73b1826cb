"""Classification: softmax cross-entropy (weighted per class with ``train.class_weight``: the
training loss only; validation and test losses stay plain); accuracy, macro F1, balanced accuracy
and a confusion matrix.

Served: class probabilities; each prediction names the label, every class's probability and the top k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepyard.serve.payloads import ArrayCodec, BadRequest
from deepyard.tasks.base import Supervised, evaluate_sums


class Probabilities(nn.Module):
    """Serving head: class probabilities for raw inputs."""

    def __init__(self, pipeline: nn.Module):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.pipeline(x), dim=-1)


class Labels(ArrayCodec):
    def named_outputs(self, outputs: np.ndarray, metadata: dict[str, Any]) -> dict[str, np.ndarray]:
        names = metadata.get("class_names") or [str(i) for i in range(outputs.shape[-1])]
        return {"probabilities": outputs.astype(np.float32),
                "label": np.array([names[i] for i in outputs.argmax(-1)], dtype=object)}

    def output_tensors(self, metadata: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
        return {"probabilities": ("FP32", [-1, len(metadata.get("class_names") or []) or -1]),
                "label": ("BYTES", [-1])}

    def encode(self, outputs: np.ndarray, metadata: dict[str, Any], body: dict, options: Any) -> list[Any]:
        top_k = body.get("top_k")
        top_k = options.top_k if top_k is None else top_k
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise BadRequest(f"top_k must be a positive integer, got {top_k!r}")
        names = metadata.get("class_names") or [str(i) for i in range(outputs.shape[-1])]
        order = np.argsort(-outputs, axis=-1)[:, :min(top_k, len(names))]
        labels = order[:, 0]
        if fair := metadata.get("fair_decisions"):  # probabilities of each decision: one is drawn
            from deepyard.fairness.mitigate import draw_labels

            labels = draw_labels(outputs, body["instances"], fair["favourable"])
        return [{"label": names[label], "probabilities": dict(zip(names, map(float, probs))),
                 "top_k": [{"label": names[i], "probability": float(probs[i])} for i in row]}
                for probs, row, label in zip(outputs, order, labels)]


class Classification(Supervised):
    name = "classification"
    directions = {"loss": "min", "accuracy": "max"}
    monitor = "val_accuracy"
    shown = ("train_loss", "val_loss", "val_accuracy")
    explains = "class"
    fairness_measured = True
    weighs_classes = True
    codec = Labels()

    def __init__(self, num_classes: int, class_weights: list[float] | None = None, **_: object):
        self.num_classes = num_classes
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self._weights_on: dict[torch.device, torch.Tensor] = {}  # one copy per device, not one per step

    def _weights(self, device: torch.device) -> torch.Tensor | None:
        if self.class_weights is None:
            return None
        if device not in self._weights_on:
            self._weights_on[device] = self.class_weights.to(device)
        return self._weights_on[device]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, weight=self._weights(outputs.device))

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

    def test_metrics(self, model, loader, device, splits, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

        def count(outputs: torch.Tensor, targets: torch.Tensor) -> None:
            confusion.add_(self.confusion(outputs, targets).cpu())

        test = self.metrics(evaluate_sums(model, loader, self, device, on_batch=count), "test")
        test["test_f1_macro"] = self.macro_f1(confusion)
        recall = confusion.diag().double() / confusion.sum(1).clamp(min=1)
        test["test_balanced_accuracy"] = float(recall[confusion.sum(1) > 0].mean())  # mean recall: imbalanced data
        return test, {"confusion": confusion}

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

    def outcome(self, serving: nn.Module, splits, final: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        from deepyard import plots

        return {}, {"plots/confusion_matrix.png": plots.confusion_matrix(final["confusion"].numpy(),
                                                                         splits.class_names)}

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return Probabilities(pipeline)
