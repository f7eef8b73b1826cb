"""Adversarial training inside the visible training loop (``train.adversarial``): each batch's
first ``mix`` share (batches are shuffled) replaced by adversarial examples of the model as it is
at that step, before the optimizer step. Each worker attacks its own shard with its own replica (the
module under DDP, so no gradient sync is triggered); the attack runs in eval mode, so batch-norm
statistics come from the batches trained on."""

from __future__ import annotations

import torch
from torch import nn

from deepyard.robust.attacks import fgsm, pgd, valid_range


class Adversary:
    def __init__(self, settings, splits, task, device: torch.device):
        self.settings, self.task = settings, task
        lower, upper = valid_range(splits.x_train, per_feature=not splits.is_image)
        self.lower, self.upper = torch.from_numpy(lower).to(device), torch.from_numpy(upper).to(device)

    def perturb(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        settings = self.settings
        count = round(len(inputs) * settings.mix)
        if count == 0:
            return inputs
        modes = {module: module.training for module in model.modules()}  # (frozen norms stay in eval mode)
        model.eval()
        try:
            head, labels = inputs[:count], targets[:count]
            if settings.method == "fgsm":
                attacked = fgsm(model, head, labels, settings.epsilon, self.lower, self.upper, loss=self.task.loss)
            else:
                attacked = pgd(model, head, labels, settings.epsilon, self.lower, self.upper, steps=settings.steps,
                               step_size=settings.step_size, loss=self.task.loss, first_to_fool=False)
        finally:
            for module, training in modes.items():
                module.training = training
        return torch.cat([attacked, inputs[count:]])
