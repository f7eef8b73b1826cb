"""One runner per job kind. ``RUNNERS`` must list exactly the kinds in ``spec.KINDS`` (a test checks).

Runner modules import lazily (``runner(kind)``): they pull in Ray, which the CLI's validate path and
the GPU step bench (``runners.loop`` on a machine with PyTorch only) do not need.
"""

from __future__ import annotations

import importlib
from typing import Callable

RUNNERS = {"train": "deepyard.runners.train", "sweep": "deepyard.runners.sweep", "deploy": "deepyard.runners.deploy",
           "rl": "deepyard.runners.rl"}


def runner(kind: str) -> Callable:
    return importlib.import_module(RUNNERS[kind]).run
