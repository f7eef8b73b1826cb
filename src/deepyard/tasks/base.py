"""The Task protocol: everything task-specific, asked for by runners and serving, in one place.

A task module under ``tasks/`` owns its loss and metrics (accumulated as sums, so data-parallel
workers all-reduce them exactly), which metrics it reports and whether higher is better, what it
adds each epoch and at the end, what its served model takes and answers (its ``codec``), and the
metadata serving needs. Runners and ``serve/`` never test a task's name: they call these.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

Direction = Literal["min", "max"]


class Codec(Protocol):
    """What a served model of the task takes and answers over HTTP (``serve/payloads.py`` helps)."""

    # decode() gives an array the endpoint may concatenate with other requests' (dynamic batching)
    batchable: bool

    def expected(self, metadata: dict[str, Any]) -> str:
        """One line that says what an instance must be: ends every 4xx message."""

    def decode(self, body: Any, metadata: dict[str, Any], max_batch: int) -> Any:
        """A request body -> what ``run`` takes; raises ``payloads.BadRequest`` (a 4xx)."""

    def run(self, module: nn.Module, decoded: Any, metadata: dict[str, Any]) -> Any:
        """The served module's outputs for ``decoded``."""

    def encode(self, outputs: Any, metadata: dict[str, Any], body: dict, options: Any) -> list[Any]:
        """Outputs -> one JSON-ready prediction per instance (``options``: the endpoint's)."""

    def named_outputs(self, outputs: Any, metadata: dict[str, Any]) -> dict[str, Any]:
        """``run``'s outputs as named arrays, the tensors of the v2 protocol's answer (``serve/v2.py``)."""

    def output_tensors(self, metadata: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
        """Those tensors' v2 datatypes and shapes (-1: any size), for the model's metadata."""

    def example(self, logged_input: Any, metadata: dict[str, Any]) -> Any:
        """One request instance made from the version's logged input example (curl hints, --try-sample)."""


class Task(Protocol):
    name: ClassVar[str]
    # metric name -> direction; reported as train_<name>, val_<name> and test_<name>
    directions: ClassVar[dict[str, Direction]]
    monitor: ClassVar[str]  # the validation metric that ranks epochs when a spec names none
    shown: ClassVar[tuple[str, ...]]  # the metrics the live progress table shows
    data_parallel: ClassVar[bool]  # can several DDP workers train it
    # Among epochs (or trials) that tie on the monitored metric, the lower value of this one wins
    # (None: no tie-break). Accuracy saturates on small validation splits; the loss still moves.
    tie_breaker: ClassVar[str | None]
    target_unit: ClassVar[str | None]  # "tokens": throughput is also logged per token
    # What an explanation attributes (explain/): "class" (a class's probability), "value" (a value,
    # or a forecast's step), None: the task's outputs are not explained (generated samples, tokens)
    explains: ClassVar[str | None]
    # Its predictions are decisions (labels) whose rates can be compared across groups of people
    fairness_measured: ClassVar[bool]
    weighs_classes: ClassVar[bool]  # takes class_weights (train.class_weight)
    codec: ClassVar[Codec]

    @staticmethod
    def fits(net: nn.Module, splits) -> str | None:
        """Why this network cannot learn the task on this data (checked before Ray starts), or None."""

    def input_stats(self, splits) -> tuple | None:
        """The (mean, std) the served pipeline standardizes raw inputs with (None: token ids as they are)."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
        """Per-batch sums whose last entry counts the targets scored."""

    def metrics(self, sums: torch.Tensor, prefix: str) -> dict[str, float]: ...

    def epoch_metrics(self, model: nn.Module, splits, seed: int) -> dict[str, float]:
        """What the epoch's validation adds beyond the sums (a GAN's judged quality)."""

    def epoch_artifacts(self, model: nn.Module, splits, epoch: int) -> dict[str, Any]:
        """Artifact path -> text or matplotlib figure, logged each epoch (samples, image grids)."""

    def test_metrics(self, model: nn.Module, loader, device: torch.device, splits,
                     seed: int) -> tuple[dict[str, float], dict[str, Any]]:
        """(test metrics, what the final checkpoint keeps for the driver, e.g. a confusion matrix)."""

    def input_example(self, model: nn.Module, splits) -> torch.Tensor:
        """A few inputs of the served model, logged with it."""

    def targets_per_sample(self, splits) -> int:
        """Targets each training sample holds, as its sums count them (tokens of a context, steps ahead)."""

    def outcome(self, serving: nn.Module, splits, final: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """On the driver, after training: (more test metrics, artifacts such as plots)."""

    def serving_module(self, pipeline: nn.Module) -> nn.Module: ...

    def serving_metadata(self, pipeline: nn.Module, splits) -> dict[str, Any]:
        """What the endpoint needs beyond the data's shapes and names."""


def selectable(task: type) -> dict[str, Direction]:
    """The validation metrics a spec may rank epochs or trials by, with their directions."""
    prefix = getattr(task, "monitor_prefix", "val_")
    return {f"{prefix}{name}": direction for name, direction in task.directions.items()}


class Supervised:
    """Defaults for a supervised task: no per-epoch extras, the test sums alone, no extra plots.
    (Plain defaults, not behaviour to override piecemeal: a task that differs writes its own.)"""

    shown: ClassVar[tuple[str, ...]] = ("train_loss", "val_loss")
    data_parallel: ClassVar[bool] = True
    tie_breaker: ClassVar[str | None] = "val_loss"
    target_unit: ClassVar[str | None] = None
    explains: ClassVar[str | None] = None
    fairness_measured: ClassVar[bool] = False
    weighs_classes: ClassVar[bool] = False

    @staticmethod
    def fits(net: nn.Module, splits) -> str | None:
        return None

    def input_stats(self, splits) -> tuple | None:
        return splits.input_stats()

    def epoch_metrics(self, model: nn.Module, splits, seed: int) -> dict[str, float]:
        return {}

    def epoch_artifacts(self, model: nn.Module, splits, epoch: int) -> dict[str, Any]:
        return {}

    def test_metrics(self, model, loader, device, splits, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
        sums = evaluate_sums(model, loader, self, device)
        return self.metrics(sums, "test"), {}

    def input_example(self, model: nn.Module, splits) -> torch.Tensor:
        return torch.from_numpy(splits.x_test[:5].copy())

    def targets_per_sample(self, splits) -> int:
        return splits.y_train[0].size

    def outcome(self, serving: nn.Module, splits, final: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        return {}, {}

    def serving_metadata(self, pipeline: nn.Module, splits) -> dict[str, Any]:
        return {}


@torch.inference_mode()
def evaluate_sums(model: nn.Module, loader, task, device: torch.device, on_batch=None) -> torch.Tensor:
    """The task's metric sums over ``loader`` in one pass; ``on_batch(outputs, targets)`` sees each batch."""
    model.eval()
    sums = None
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs).float()
        part = task.batch_sums(outputs, targets)
        sums = part if sums is None else sums + part
        if on_batch is not None:
            on_batch(outputs, targets)
    return sums.cpu() if sums is not None else torch.zeros(3)
