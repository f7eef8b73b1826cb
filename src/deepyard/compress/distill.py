"""Knowledge distillation (Hinton et al. 2015): a student learns the teacher's outputs softened by a
temperature T, mixed with the labels:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, label)

The teacher is fixed, so its logits are computed once per worker, before training, and travel with
each training sample as its target: [teacher logits..., label], the label -1 where a label budget
withheld it (that sample learns from the teacher alone).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deepyard.tasks.classification import Classification

NO_LABEL = -1


class Distillation(Classification):
    """Classification whose training targets carry the teacher's logits. Validation and test targets
    are plain labels, scored as any classifier's; served as one too."""

    def __init__(self, num_classes: int, temperature: float, alpha: float):
        super().__init__(num_classes)
        self.temperature, self.alpha = temperature, alpha

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:
            return super().loss(outputs, targets)
        teacher, labels = targets[:, :-1], targets[:, -1].long()
        t = self.temperature
        soft = F.kl_div(F.log_softmax(outputs / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                        reduction="batchmean", log_target=True) * t * t
        labelled = labels != NO_LABEL
        hard = F.cross_entropy(outputs[labelled], labels[labelled]) if labelled.any() else outputs.sum() * 0
        return self.alpha * soft + (1 - self.alpha) * hard

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
        """Training: the accuracy is against the label, or the teacher's choice where there is none."""
        if targets.ndim == 1:
            return super().batch_sums(outputs, targets, loss)
        labels = targets[:, -1].long()
        chosen = torch.where(labels == NO_LABEL, targets[:, :-1].argmax(dim=-1), labels)
        return super().batch_sums(outputs, chosen, loss if loss is not None else self.loss(outputs, targets))

    def targets_per_sample(self, splits) -> int:
        return 1


def teacher_targets(teacher: torch.nn.Module, inputs: np.ndarray, labels: np.ndarray | None,
                    batch: int = 1024) -> np.ndarray:
    """[teacher logits..., label] per input, float32; label NO_LABEL where ``labels`` is None."""
    with torch.inference_mode():
        logits = torch.cat([teacher(torch.from_numpy(inputs[i:i + batch])) for i in range(0, len(inputs), batch)])
    column = np.full((len(inputs), 1), NO_LABEL, np.float32) if labels is None else labels[:, None].astype(np.float32)
    return np.concatenate([logits.numpy().astype(np.float32), column], axis=1)


class Distilling:
    """The training loop's hook: the teacher's logits become the training targets; the task, Distillation."""

    def __init__(self, teacher: str, temperature: float, alpha: float, unlabeled: bool):
        self.teacher, self.temperature, self.alpha, self.unlabeled = teacher, temperature, alpha, unlabeled

    def prepare(self, model, splits, task, uri: str | None = None):
        from deepyard.compress.parent import load_parent, rebuild

        parent = load_parent(self.teacher, uri, where="the teacher")
        teacher, _ = rebuild(parent, splits, where="the teacher")
        targets = [teacher_targets(teacher, splits.x_train, splits.y_train)]
        if self.unlabeled and splits.x_unlabeled is not None:
            targets.append(teacher_targets(teacher, splits.x_unlabeled, None))
            splits.x_train = np.concatenate([splits.x_train, splits.x_unlabeled])
        splits.y_train = np.concatenate(targets)
        return splits, Distillation(task.num_classes, self.temperature, self.alpha)

    def finish(self, model) -> None:
        pass
