"""Checkpoint files: plain dicts of tensors and numbers, so they load with ``weights_only=True``."""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

STATE_FILE = "state.pt"


STAGING_PREFIX = "deepyard-ckpt-"
_swept = False


@contextmanager
def staged(state: dict[str, Any] | None) -> Iterator[str | None]:
    """A directory holding ``state`` for ``ray.train.report`` to persist (None: nothing to save).
    Its process holds a lock on it while it lives: a worker killed while reporting cannot remove its
    own, so the next process to stage one on the machine removes those that no one holds."""
    global _swept
    if state is None:
        yield None
        return
    if not _swept:
        _swept = True
        try:
            sweep_orphans()
        except OSError:  # housekeeping: never the reason a checkpoint was not saved
            pass
    with (tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-", ignore_cleanup_errors=True)
          as directory, _held(directory)):
        torch.save(state, os.path.join(directory, STATE_FILE))
        yield directory


def sweep_orphans(folder: str | None = None) -> list[str]:
    """Removes the staging directories of this user's that no live process holds from ``folder``
    (the temp folder); the ones removed. (A full checkpoint each: on a node whose workers die
    often, they would fill its disk.) The lock, not the pid in the name, says whether one is in
    use: a pid means nothing across containers that share a temp folder."""
    import re
    import shutil

    removed = []
    for entry in Path(folder or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        if not re.fullmatch(rf"{STAGING_PREFIX}[0-9]+-\w+", entry.name):  # (a name another program chose)
            continue
        try:
            if entry.is_symlink() or entry.lstat().st_uid != os.getuid():
                continue
            with _held(str(entry), wait=False) as free:
                if free:
                    shutil.rmtree(entry)
                    removed.append(str(entry))
        except OSError:  # gone already (another process swept it), or not ours to remove
            continue
    return removed


@contextmanager
def _held(directory: str, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``directory`` for the block: whether it was taken (``wait=False``:
    not when another process holds it). Without fcntl (Windows), always taken."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)


def load(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def newest_in_storage(filesystem, run_path: str, known) -> Any:
    """The checkpoint of a run that has trained furthest and loads in full, or ``known`` (Ray's own)
    when none has.

    Ray learns of a reported checkpoint only after the worker has written it (Ray Train's controller
    at its next poll of the workers, Tune when it next takes the trial's results): a worker that dies
    in between leaves a checkpoint Ray never heard of, and Ray would resume from an older one,
    training those epochs again. A checkpoint cut short by a crash mid-upload does not load and is
    passed over. ``run_path`` holds the checkpoints (Ray Train) or trial folders holding them (Tune:
    a job resumed with --resume runs in a new trial beside the old one).
    """
    from ray.train import Checkpoint

    furthest, progress = known, -1.0
    for path in _checkpoint_dirs(filesystem, run_path):
        try:
            with Checkpoint(path, filesystem=filesystem).as_directory() as directory:
                state = load(directory)
        except Exception:  # noqa: BLE001 - cut short by a crash: it does not count
            continue
        epochs = math.inf if "test" in state else float(state["epoch"])  # a final one: the job had finished
        if epochs > progress:
            furthest, progress = Checkpoint(path, filesystem=filesystem), epochs
    return furthest


def _checkpoint_dirs(filesystem, run_path: str) -> list[str]:
    import pyarrow.fs

    def folders(path: str) -> list:
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        return [info for info in found if info.type == pyarrow.fs.FileType.Directory]

    found = []
    for folder in folders(run_path):
        inside = [folder] if folder.base_name.startswith("checkpoint_") else folders(folder.path)
        found += [info.path for info in inside if info.base_name.startswith("checkpoint_")]
    return found


def saved_any(folder: Path) -> bool:
    """Did the run in local ``folder`` save a checkpoint (Ray Train's layout, or Tune's)?"""
    return any(folder.glob("checkpoint_*")) or any(folder.glob("*/checkpoint_*"))


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
