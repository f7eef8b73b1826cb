"""Optimizers and schedules from the course material."""

from __future__ import annotations

import pytest
import torch

from deepyard.optim import OPTIMIZERS, check_optimizer, make_schedule


def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_minimizes_a_quadratic(name):
    params = _params()
    optimizer = OPTIMIZERS.build(name, {}, parameters=params, lr=0.05, weight_decay=0.0)
    target = torch.tensor([1.0, -2.0, 3.0])
    for _ in range(300):
        loss = ((params[0] - target) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        OPTIMIZERS.build("sgd", {"nesterov": True}, parameters=_params(), lr=0.1, weight_decay=0)


@pytest.mark.parametrize("name, params", [("sgd", {"nesterov": True}), ("sgd", {"momentum": -0.1}),
                                          ("adam", {"eps": -1e-8}), ("adamw", {"betas": [1.0, 0.9]}),
                                          ("rmsprop", {"alpha": -0.5}), ("adam", {"amsgrad": True})])
def test_the_check_refuses_what_building_the_optimizer_refuses(name, params):
    with pytest.raises(ValueError):
        OPTIMIZERS.build(name, params, parameters=_params(), lr=0.1, weight_decay=0)
    with pytest.raises(ValueError):
        check_optimizer(name, params)


@pytest.mark.slow  # (deepyard in a process of its own)
def test_the_check_builds_no_optimizer_so_a_command_does_not_import_torch_compiler():
    import subprocess
    import sys

    program = ("import sys; from deepyard.optim import check_optimizer; "
               "check_optimizer('sgd', {'momentum': 0.9, 'nesterov': True}); check_optimizer('adam', {}); "
               "print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("name", ["constant", "step", "cosine", "onecycle"])
def test_schedules_warm_up_and_decay(name):
    optimizer = torch.optim.SGD(_params(), lr=1.0)
    schedule = make_schedule(optimizer, name=name, total_steps=100, steps_per_epoch=10, warmup_epochs=2,
                             step_size=3, gamma=0.5)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] < 0.2 and max(rates) == pytest.approx(1.0, rel=0.05)  # warm-up, then the peak
    if name == "constant":
        assert rates[-1] == pytest.approx(1.0)
    else:
        assert rates[-1] < 0.2
