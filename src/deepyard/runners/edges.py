"""Where the training loop meets Ray: the four edges [1]-[4] of ``train.fit_loop``, two ways.

``TrainWorker``: one worker of a TorchTrainer's group (DDP, Ray Train's checkpoints and restarts).
``TuneTrial``: the whole job in one process inside a Tune trial. One-worker train jobs and a sweep's
single-worker trials run this way: no controller and worker group to start (~7-14 s on a laptop), and
the trial's checkpoints are Tune's own, which PBT copies between trials and ``--resume`` continues from.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch


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


def _exit_if_orphaned(raylet: int) -> None:
    """The raylet is gone (its driver was killed, and a local cluster with it): this process would
    train on alone until Ray noticed, writing checkpoints into the storage `--resume` goes on from."""
    if os.getppid() != raylet:
        os._exit(1)


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

        self._tune, self._whole_run = tune, whole_run
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self._raylet = os.getppid()
        self.job_name = tune.get_context().get_experiment_name()

    def shard(self, loader):
        return loader if self.device.type == "cpu" else _OnDevice(loader, self.device)

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
        self._tune.report(metrics, checkpoint=checkpoint)
