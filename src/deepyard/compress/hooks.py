"""What the training loop asks of a compress method that fine-tunes (``runners/train.fit_loop``):

    prepare(model, splits, task, uri) -> (splits, task)   after the initial weights, before DDP
    finish(model)                                          on the best weights, before they are saved

A plain train job has none; a compress stage passes ``config["compress"]`` to pick one.
"""

from __future__ import annotations

from typing import Any


def for_config(settings: dict[str, Any] | None):
    """The hook that ``settings`` (``{"method": ..., its values}``) names; None for a plain job."""
    if not settings:
        return None
    if settings["method"] == "prune" and settings.get("structured"):
        from deepyard.compress.structured import StructuredPruning

        return StructuredPruning(settings["sparsity"])
    if settings["method"] == "prune":
        from deepyard.compress.prune import MagnitudePruning

        return MagnitudePruning(settings["sparsity"])
    from deepyard.compress.distill import Distilling

    return Distilling(settings["teacher"], settings["temperature"], settings["alpha"], settings["unlabeled"])
