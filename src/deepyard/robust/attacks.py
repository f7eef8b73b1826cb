"""Adversarial examples under an L-infinity budget: FGSM (Goodfellow et al. 2015) and PGD (Madry et
al. 2018), in the data's own units and kept within each input's valid range.

Plain torch on the model's logits: the robustness job runs them in Ray tasks, and adversarial
training runs them inside the visible training loop (any device, under DDP). IBM's
adversarial-robustness-toolbox is the oracle the tests hold them to.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def valid_range(x_train: np.ndarray, per_feature: bool) -> tuple[np.ndarray, np.ndarray]:
    """Where an adversarial input may go: the training inputs' range, one for every value (images:
    pixels) or each feature's own (tables, series)."""
    if per_feature:
        return x_train.min(axis=0).astype(np.float32), x_train.max(axis=0).astype(np.float32)
    return np.asarray(x_train.min(), np.float32), np.asarray(x_train.max(), np.float32)


def _gradient_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Loss) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(loss(model(x), y), x)
    return gradient.sign()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, lower: torch.Tensor,
         upper: torch.Tensor, *, loss: Loss = F.cross_entropy) -> torch.Tensor:
    """One step of size ``epsilon`` up the loss's gradient sign."""
    return torch.clamp(x + epsilon * _gradient_sign(model, x, y, loss), lower, upper).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, lower: torch.Tensor,
        upper: torch.Tensor, *, steps: int = 10, step_size: float | None = None, restarts: int = 1,
        random_start: bool = True, generator: torch.Generator | None = None,
        loss: Loss = F.cross_entropy) -> torch.Tensor:
    """``steps`` signed-gradient steps of ``step_size`` (default 2.5 epsilon / steps) up ``loss``, each
    projected back into the epsilon ball and the valid range; from a random point of the ball,
    ``restarts`` times, keeping per example the first one that fools a classifier (else the last)."""
    step_size = step_size if step_size is not None else 2.5 * epsilon / steps
    low, high = torch.maximum(x - epsilon, lower), torch.minimum(x + epsilon, upper)
    found, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        adversarial = x.clone()
        if random_start:
            noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
            adversarial = torch.clamp(x + (2 * noise - 1) * epsilon, low, high)
        for _ in range(steps):
            adversarial = torch.clamp(adversarial + step_size * _gradient_sign(model, adversarial, y, loss), low, high)
        if restarts == 1:
            return adversarial.detach()
        with torch.no_grad():
            wrong = model(adversarial).argmax(-1) != y
        replace = ~fooled  # (not fooled yet: this restart's, which fools it or is the latest)
        found[replace] = adversarial[replace]
        fooled |= wrong
    return found.detach()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())
