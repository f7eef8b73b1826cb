"""Adversarial examples under an L-infinity budget: FGSM (Goodfellow et al. 2015) and PGD (Madry et
al. 2018), in the data's own units and kept within each input's valid range.

Plain torch on the model's logits: the robustness job runs them in Ray tasks, and adversarial
training runs them inside the visible training loop (any device, under DDP). IBM's
adversarial-robustness-toolbox is the oracle the tests hold them to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _gradient_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return gradient.sign()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, lower: torch.Tensor,
         upper: torch.Tensor) -> torch.Tensor:
    """One step of size ``epsilon`` up the loss's gradient sign."""
    return torch.clamp(x + epsilon * _gradient_sign(model, x, y), lower, upper).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, lower: torch.Tensor,
        upper: torch.Tensor, *, steps: int = 10, step_size: float | None = None, restarts: int = 1,
        random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` signed-gradient steps of ``step_size`` (default 2.5 epsilon / steps), each projected
    back into the epsilon ball and the valid range; from a random point of the ball, ``restarts``
    times, keeping per example the first one that fools the model (else the last)."""
    step_size = step_size if step_size is not None else 2.5 * epsilon / steps
    low, high = torch.maximum(x - epsilon, lower), torch.minimum(x + epsilon, upper)
    found, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        adversarial = x.clone()
        if random_start:
            noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
            adversarial = torch.clamp(x + (2 * noise - 1) * epsilon, low, high)
        for _ in range(steps):
            adversarial = torch.clamp(adversarial + step_size * _gradient_sign(model, adversarial, y), low, high)
        with torch.no_grad():
            wrong = model(adversarial).argmax(-1) != y
        replace = ~fooled  # (not fooled yet: this restart's, which fools it or is the latest)
        found[replace] = adversarial[replace]
        fooled |= wrong
    return found.detach()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())
