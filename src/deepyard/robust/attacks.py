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


def _box(x: torch.Tensor, epsilon: float, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The epsilon ball around x within the valid range (widened to x where x itself is outside it:
    a test value beyond the training range must not move by more than epsilon)."""
    return torch.maximum(x - epsilon, torch.minimum(lower, x)), torch.minimum(x + epsilon, torch.maximum(upper, x))


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, lower: torch.Tensor,
         upper: torch.Tensor, *, loss: Loss = F.cross_entropy) -> torch.Tensor:
    """One step of size ``epsilon`` up the loss's gradient sign."""
    low, high = _box(x, epsilon, lower, upper)
    return torch.clamp(x + epsilon * _gradient_sign(model, x, y, loss), low, high).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, lower: torch.Tensor,
        upper: torch.Tensor, *, steps: int = 10, step_size: float | None = None, restarts: int = 1,
        random_start: bool = True, generator: torch.Generator | None = None, loss: Loss = F.cross_entropy,
        first_to_fool: bool = True) -> torch.Tensor:
    """``steps`` signed-gradient steps of ``step_size`` (default 2.5 epsilon / steps) up ``loss``, each
    projected back into the epsilon ball and the valid range, from a random point of the ball,
    ``restarts`` times. ``first_to_fool`` (measuring a classifier): per example, the first step of
    any restart that fools it, else the last; so more steps or restarts never find less. Otherwise
    (training on any loss) the last step of the last restart."""
    step_size = step_size if step_size is not None else 2.5 * epsilon / steps
    low, high = _box(x, epsilon, lower, upper)
    found, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        adversarial = x.clone()
        if random_start:
            noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
            adversarial = torch.clamp(x + (2 * noise - 1) * epsilon, low, high)
        for _ in range(steps):
            adversarial = torch.clamp(adversarial + step_size * _gradient_sign(model, adversarial, y, loss), low, high)
            if not first_to_fool:
                continue
            with torch.no_grad():
                fools = (model(adversarial).argmax(-1) != y) & ~fooled
            found[fools], fooled = adversarial[fools], fooled | fools
        if not first_to_fool:
            found = adversarial
        else:
            found[~fooled] = adversarial[~fooled]
    return found.detach()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())
