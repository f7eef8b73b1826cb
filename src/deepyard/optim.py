"""Optimizers and learning-rate schedules from the course: gradient descent in its batch,
stochastic and mini-batch forms (the batch size decides which), momentum, Nesterov, RMSprop, Adam.

Each optimizer builder's keyword arguments past ``lr`` and ``weight_decay`` are the spec's
``optim.params``. Schedules are stepped once per batch so that warm-up is smooth at any batch size.
"""

from __future__ import annotations

import math
import warnings
from typing import Annotated, Iterable

import torch
from pydantic import Field, NonNegativeFloat

from deepyard.registry import Registry

OPTIMIZERS = Registry("optimizer", injected=("parameters", "lr", "weight_decay"))

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def _nesterov_has_momentum(params) -> None:
    if params.nesterov and params.momentum == 0:
        raise ValueError("nesterov needs momentum > 0 (for example optim.params.momentum: 0.9)")


@OPTIMIZERS.register("sgd", check=_nesterov_has_momentum)
def sgd(parameters: Iterable, lr: float, weight_decay: float,
        momentum: NonNegativeFloat = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def adam(parameters: Iterable, lr: float, weight_decay: float,
         betas: tuple[Beta, Beta] = (0.9, 0.999), eps: NonNegativeFloat = 1e-8) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(parameters: Iterable, lr: float, weight_decay: float,
          betas: tuple[Beta, Beta] = (0.9, 0.999), eps: NonNegativeFloat = 1e-8) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("rmsprop")
def rmsprop(parameters: Iterable, lr: float, weight_decay: float,
            alpha: Beta = 0.99, momentum: NonNegativeFloat = 0.0) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(parameters, lr=lr, alpha=alpha, momentum=momentum, weight_decay=weight_decay)


def check_optimizer(name: str, params: dict) -> None:
    """What building optimizer ``name`` with ``params`` would refuse, found without building one:
    a torch optimizer's first construction imports torch._dynamo (~0.9 s of a command's start on
    2 cores), and the worker builds the real one anyway. Every value torch checks is constrained by
    the builders' annotations and checks (ValueError: pydantic's ValidationError is one)."""
    OPTIMIZERS.validated(name, params)


def make_schedule(optimizer: torch.optim.Optimizer, *, name: str, total_steps: int, steps_per_epoch: int,
                  warmup_epochs: float = 0.0, step_size: int = 10, gamma: float = 0.1,
                  ) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-batch schedule: linear warm-up over ``warmup_epochs``, then the named decay."""
    warmup = int(warmup_epochs * steps_per_epoch)
    if name == "onecycle":
        max_lr = [group["lr"] for group in optimizer.param_groups]
        pct_start = warmup / total_steps if warmup else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                                   pct_start=min(max(pct_start, 0.01), 0.99))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "step":
            return gamma ** ((step // steps_per_epoch) // step_size)
        if name == "cosine":
            progress = (step - warmup) / max(total_steps - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
            optimizer_state: dict, scheduler_state: dict) -> None:
    """Load saved optimizer and schedule state (moments, step count) but keep this job's own
    hyperparameters (lr, weight decay, betas...): under PBT the state comes from another trial, whose
    hyperparameters the exploring trial has just perturbed. On a plain resume nothing changes."""
    own = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    for group, hyperparameters in zip(optimizer.param_groups, own):
        group.update(hyperparameters)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    with warnings.catch_warnings():  # get_lr outside step() warns; here it is the closed form we want
        warnings.simplefilter("ignore")
        lrs = scheduler.get_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
