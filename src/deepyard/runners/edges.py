"""Where the training loop meets Ray: the four edges [1]-[4] of ``train.fit_loop``, two ways.

``TrainWorker``: one worker of a TorchTrainer's group (DDP, Ray Train's checkpoints and restarts).
``TuneTrial``: the whole job in one process inside a Tune trial. One-worker train jobs and a sweep's
single-worker trials run this way: no controller and worker group to start (~7-14 s on a laptop), and
the trial's checkpoints are Tune's own, which PBT copies between trials and ``--resume`` continues from.

Each also says how rank 0's epoch metrics reach MLflow (``metrics_log``). A whole-job trial hands
them to the driver with its reports and the driver logs them (``driver_logs``): importing MLflow and
opening its store in the trial held the GIL for ~2.5 s of the job's start. The others log from the
worker, in a background thread.
"""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import Future
from typing import Any, Iterator

import torch

from deepyard import tracking
from deepyard.runners import store_pages

# The report key under which a whole-job trial hands its metric lines to the driver: JSON text of
# [[step, {name: value}], ...]. (Text: Tune's own loggers skip it; a list went to TensorBoard's.)
TO_LOG = "deepyard_to_log"
# A streaming worker lets go of the object store's pages after reading this much (store_pages.py):
# its RSS then holds about this much of the store, not every page of the epoch's blocks.
RELEASE_EVERY_BYTES = 32 * 2 ** 20


class TrainWorker:
    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._raylet = os.getppid()  # the node's raylet started this worker
        self.job_name = context.get_experiment_name()

    def shard(self, loader):  # [1] this worker's shard, moved to its device
        return self._torch.prepare_data_loader(loader, add_dist_sampler=False)

    def stream(self, splits, split: str, batch_size: int, **options) -> "StreamedBatches":  # [1], streaming
        """This worker's shard of a streaming split (Ray Train splits train and val; test is whole)."""
        rows = splits.size(split) // self.world if split in SPLIT_BETWEEN_WORKERS else splits.size(split)
        return StreamedBatches(self._train.get_dataset_shard(split), rows, batch_size, self.device, **options)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:  # [2] DDP (gloo on CPU, NCCL on GPU)
        return self._torch.prepare_model(model)

    def checkpoint(self):  # [3] a restarted worker group resumes here: the newest complete checkpoint
        from deepyard.runners.checkpoints import newest_in_storage

        storage = self._train.get_context().get_storage()
        return newest_in_storage(storage.storage_filesystem, storage.experiment_fs_path, self._train.get_checkpoint())

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:  # [4] rank 0 persists
        _exit_if_orphaned(self._raylet)
        checkpoint = self._train.Checkpoint.from_directory(directory) if directory else None
        self._train.report(metrics, checkpoint=checkpoint)

    def metrics_log(self, config: dict[str, Any]) -> "_ToMLflow":
        return _ToMLflow(config)


class _ToMLflow(tracking.BackgroundLogger):
    """Rank 0 writes its metric lines to the job's MLflow run itself, from a background thread."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config["run_id"], config["tracking_uri"])
        self._run_id, self._uri = config["run_id"], config["tracking_uri"]

    def after_restore(self, history: list) -> int:
        """The last epoch MLflow has (logged after the checkpoint it goes on from): not logged again."""
        return tracking.last_step(self._run_id, "epoch", self._uri)


class _ToDriver:
    """Metric lines kept until the next report, which hands them to the driver (``driver_logs``)."""

    def __init__(self) -> None:
        self.lines: list = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.lines.append([step, dict(metrics)])

    def after_restore(self, history: list) -> int:
        """Every epoch the checkpoint covers goes out again: the driver logs those MLflow lacks (one a
        killed driver never heard of), and drops the rest, and the epochs redone after it."""
        for step, metrics in history:
            self(metrics, step)
        return 0

    def take(self) -> list:
        lines, self.lines = self.lines, []
        return lines

    def flush(self) -> None:  # (written by the driver, when it gets the report)
        pass

    def close(self) -> int:
        return 0


def driver_logs(run: Future):
    """The Tune callback that writes a whole-job trial's metric lines to its MLflow run: ``run``
    gives its id once the driver has opened it (the trial starts meanwhile); if it could not be
    opened, the callback raises that error, and the job stops. An epoch's line is written once: the
    first values stand (after what MLflow already has: a resumed run's). A line that cannot be
    written after a few tries is counted (``failed``) and said, never raised: the training goes on,
    and a later restart's copy of the line may still fill it in."""
    from ray.tune import Callback

    class LogReportedMetrics(Callback):
        def __init__(self, run: Future) -> None:
            self.run = run  # (an attribute, not a closure's: __getstate__ leaves it out)
            self.logged_up_to: int | None = None  # (asked of MLflow at the first lines: the run is open by then)
            self.failed = 0

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its callbacks into the experiment's state; a run still opening holds a lock
            return {**self.__dict__, "run": None}

        def on_step_begin(self, iteration, trials, **info) -> None:
            if self.run.done():
                self.run.result()  # (an error opening the run ends the job now, not after its epochs)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            lines = json.loads(result.get(TO_LOG) or "[]")
            if not lines:
                return
            run_id = self.run.result()
            for step, metrics in lines:
                try:
                    if self.logged_up_to is None:
                        self.logged_up_to = tracking.last_step(run_id, "epoch")
                    if "epoch" in metrics and step <= self.logged_up_to:
                        continue
                    tracking.log_metrics(run_id, metrics, step, attempts=3)
                except Exception as error:
                    self.failed += 1
                    print(f"could not log step {step}'s metrics to MLflow: {error}", file=sys.stderr)
                    continue
                if "epoch" in metrics:
                    self.logged_up_to = step

    return LogReportedMetrics(run)


def _exit_if_orphaned(raylet: int) -> None:
    """The raylet is gone (its driver was killed, and a local cluster with it): this process would
    train on alone until Ray noticed, writing checkpoints into the storage `--resume` goes on from."""
    if os.getppid() != raylet:
        os._exit(1)


# A data-parallel job's streaming splits that Ray Train divides between its workers (equal shares;
# the test split is scored whole, by rank 0).
SPLIT_BETWEEN_WORKERS = ("train", "val")


class StreamedBatches:
    """A streaming split's batches as the loop takes a DataLoader's: ``(inputs, targets)`` on the
    device, ``len()`` batches an epoch, and ``sampler.set_epoch`` to seed the epoch's shuffle.
    ``source``: a Ray Dataset, or the DataIterator of a Ray Train worker's shard."""

    def __init__(self, source, rows: int, batch_size: int, device: torch.device, *, training: bool = False,
                 shuffle_buffer: int | None = None, seed: int = 0, prefetch_batches: int = 1):
        self.source, self.batch_size, self.device = source, batch_size, device
        self.shuffle_buffer, self.seed, self.prefetch_batches = shuffle_buffer, seed, prefetch_batches
        # A last training batch of one sample would break batch norm; drop it (as the in-memory loader does).
        self.drop_last = training and rows % batch_size == 1 and rows > 1
        self.batches = rows // batch_size if self.drop_last else math.ceil(rows / batch_size)
        self.sampler, self.epoch = self, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator:
        # NumPy batches made tensors here: iter_torch_batches took 2-2.5x the time per batch (1 ms of a
        # 256-row batch's ~3 ms on one core), time the training step waits for.
        non_blocking = self.device.type == "cuda"
        unreleased = 0
        for batch in self.source.iter_batches(
                batch_size=self.batch_size, batch_format="numpy", drop_last=self.drop_last,
                prefetch_batches=self.prefetch_batches, local_shuffle_buffer_size=self.shuffle_buffer,
                local_shuffle_seed=self.seed * 100_003 + self.epoch if self.shuffle_buffer else None):
            # (copies: a batch may be a read-only view of the object store; a source may send uint8 levels)
            inputs, targets = torch.tensor(batch["x"]).float(), torch.tensor(batch["y"])
            unreleased += batch["x"].nbytes
            if unreleased >= RELEASE_EVERY_BYTES:  # the store's pages read so far: out of this worker's RSS
                store_pages.release()
                unreleased = 0
            yield inputs.to(self.device, non_blocking=non_blocking), targets.to(self.device, non_blocking=non_blocking)
        store_pages.release()


class _OnDevice:
    """A loader whose batches land on ``device`` (what ``prepare_data_loader`` does for Train)."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        non_blocking = self.device.type == "cuda"
        for inputs, targets in self.loader:
            yield inputs.to(self.device, non_blocking=non_blocking), targets.to(self.device, non_blocking=non_blocking)


class TuneTrial:
    """``whole_run``: the trial is a whole job (not one of a sweep's), and a restart goes on from the
    newest complete checkpoint of any of the job's trials: one it reported just before it died, which
    Tune never heard of, or one of the trial that ran before ``--resume``."""

    rank, world = 0, 1

    def __init__(self, use_gpu: bool, whole_run: bool = False) -> None:
        from ray import tune

        self._tune, self._whole_run, self._to_driver = tune, whole_run, None
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self._raylet = os.getppid()
        self.job_name = tune.get_context().get_experiment_name()

    def shard(self, loader):
        return loader if self.device.type == "cpu" else _OnDevice(loader, self.device)

    def stream(self, splits, split: str, batch_size: int, **options) -> "StreamedBatches":
        return StreamedBatches(splits.streams[split], splits.size(split), batch_size, self.device, **options)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def checkpoint(self):  # this trial's own (after a restore) or, under PBT, a better trial's
        if not self._whole_run:
            return self._tune.get_checkpoint()
        from deepyard.runners.checkpoints import newest_in_storage

        storage = self._tune.get_context().get_storage()
        return newest_in_storage(storage.storage_filesystem, storage.experiment_fs_path, self._tune.get_checkpoint())

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        _exit_if_orphaned(self._raylet)
        checkpoint = self._tune.Checkpoint.from_directory(directory) if directory else None
        if self._to_driver is not None:
            metrics = {**metrics, TO_LOG: json.dumps(self._to_driver.take())}
        self._tune.report(metrics, checkpoint=checkpoint)

    def metrics_log(self, config: dict[str, Any]):
        """A whole job's lines go to the driver; a sweep's trial writes its own child run's."""
        if not self._whole_run:
            return _ToMLflow(config)
        self._to_driver = _ToDriver()
        return self._to_driver
