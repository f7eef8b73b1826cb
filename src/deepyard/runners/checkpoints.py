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


def newest_in_storage(filesystem, experiment_path: str, known) -> Any:
    """The newest checkpoint of a run that loads in full, or ``known`` (Ray's own) when none is newer.

    Ray Train's controller learns of a reported checkpoint only at its next poll of the workers
    (every 2 s): a worker that dies in between leaves a persisted checkpoint Ray never heard of, and
    Ray would resume from an older one, training those epochs again. A checkpoint cut short by a
    crash mid-upload does not load and is passed over. Directory names are timestamps, so the
    newest sorts last.
    """
    import pyarrow.fs
    from ray.train import Checkpoint

    found = filesystem.get_file_info(pyarrow.fs.FileSelector(experiment_path, allow_not_found=True))
    names = sorted((info.base_name for info in found if info.type == pyarrow.fs.FileType.Directory
                    and info.base_name.startswith("checkpoint_")), reverse=True)
    known_name = Path(known.path).name if known is not None else None
    for name in names:
        if name == known_name or (known_name and name < known_name):
            break  # Ray's own is the newest that is left
        candidate = Checkpoint(f"{experiment_path}/{name}", filesystem=filesystem)
        try:
            with candidate.as_directory() as directory:
                load(directory)
        except Exception:  # noqa: BLE001 - cut short by a crash: try the one before it
            continue
        return candidate
    return known


def tidy(result) -> None:
    """Delete the run's checkpoints that Ray no longer keeps: the ones its controller never heard of
    (``newest_in_storage``) are not deleted by Ray, so they outlived ``checkpoint.keep``."""
    import pyarrow.fs

    kept = {Path(c.path).name for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        kept.add(Path(result.checkpoint.path).name)
    found = result.filesystem.get_file_info(pyarrow.fs.FileSelector(result.path, allow_not_found=True))
    for info in found:
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_") \
                and info.base_name not in kept:
            result.filesystem.delete_dir(info.path)


def cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in state_dict.items()}
