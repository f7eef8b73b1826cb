"""Checkpoint files: plain dicts of tensors and numbers, so they load with ``weights_only=True``."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

STATE_FILE = "state.pt"


@contextmanager
def staged(state: dict[str, Any] | None) -> Iterator[str | None]:
    """A directory holding ``state`` for ``ray.train.report`` to persist (None: nothing to save)."""
    if state is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="deepyard-ckpt-") as directory:
        torch.save(state, os.path.join(directory, STATE_FILE))
        yield directory


def load(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in state_dict.items()}
