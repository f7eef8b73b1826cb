"""Data that streams: a source lists its samples and their splits (``StreamPlan``, before Ray
starts), and Ray Data reads and decodes them while the workers train (``attach``, once Ray is up).

The loop sees ``StreamSplits`` like any ``Splits``: the shapes, class names and a few decoded
samples of each split (the model's input example, the forward-pass check) are in memory; the
samples themselves are Ray Datasets, one per split, that the edges turn into batches
(``runners/edges.py``). Normalization statistics come from a Ray Data pass over the training
split only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepyard.data.splits import Splits, Task
from deepyard.errors import BadInput, DataError

SPLITS = ("train", "val", "test")
SAMPLES = {"train": 8, "val": 8, "test": 64}  # decoded in the driver: the forward check, input example, explanations
READ_FAILED = "deepyard could not read"  # a read error's mark: Ray Data retries those blocks, not decode errors
KEPT_SHARE = 0.25  # of the object store: the most a validation split may take there for the whole job
ROWS_PER_BLOCK = 1024  # files per Ray Data block (and task): 256 spent 40% of the time on tasks, not pixels


@dataclass
class StreamPlan:
    """What a streaming source returns: every sample's file and label per split, and how to decode one."""

    task: Task
    class_names: list[str] | None
    in_shape: tuple[int, ...]
    files: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    decode: dict[str, Any]  # decode_sample's settings: {"kind": "image", "channels": 1, "size": None}
    pixel_max: float | None = None
    where: str = ""


@dataclass
class StreamSplits(Splits):
    """Splits whose x_/y_ arrays hold only a few decoded samples; ``plan`` lists them all and
    ``streams`` (set by ``attach``) reads them. ``stats``: mean and std of the training split."""

    plan: Any = None  # a StreamPlan (files), or a TableStream (data/table_stream.py)
    stats: tuple[np.ndarray, np.ndarray] | None = None
    streams: dict[str, Any] | None = field(default=None, repr=False)
    sizes: dict[str, int] = field(default_factory=dict)  # samples per split (a table's: estimated until attached)
    counts: np.ndarray | None = None  # training samples per class
    targets: tuple[float, float] | None = None  # regression: the training targets' mean and std

    @property
    def streaming(self) -> bool:
        return True

    def size(self, split: str) -> int:
        return self.sizes[split]

    def class_counts(self) -> np.ndarray:
        return self.counts

    def input_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self.stats

    def target_stats(self) -> tuple[float, float]:
        return self.targets if self.task == "regression" and self.targets else (0.0, 1.0)

    def shipped(self) -> "StreamSplits":
        """Without the Datasets: what a Ray Train worker gets (its shards come from Ray Train)."""
        from dataclasses import replace

        return replace(self, streams=None)


def split_by_point(points: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Each sample's split (0 train, 1 val, 2 test) from its point in [0, 1), a hash of the sample
    and the seed: the test share of the points first, then the validation share."""
    val = test_fraction + val_fraction
    return np.where(points < test_fraction, 2, np.where(points < val, 1, 0)).astype(np.int8)


def decode_sample(source: str, settings: dict[str, Any], data: bytes | None = None) -> np.ndarray:
    """One sample's input, read from a local path or any URI pyarrow reaches (s3://, gs://)
    unless its bytes are given."""
    if settings["kind"] == "image":
        from deepyard.data.images import decode

        size = tuple(settings["size"]) if settings["size"] else None
        return decode(read_bytes(source) if data is None else data, settings["channels"], size)
    raise ValueError(f"unknown sample kind {settings['kind']!r}")


def _checked_sample(source: str, settings: dict[str, Any], data: bytes | None = None) -> np.ndarray:
    """``decode_sample``, or a DataError naming the file: it does not decode, or not to the plan's shape."""
    try:
        sample = decode_sample(source, settings, data)
    except (OSError, ValueError) as error:
        raise DataError(f"{source} cannot be decoded ({type(error).__name__}: {error}); remove or replace it") from None
    if sample.shape != (shape := tuple(settings["shape"])):
        raise DataError(f"{source} decodes to {sample.shape}, not {shape} as the first image; set data.params.size: "
                        "[height, width] to resize every image to one size")
    return sample


def read_bytes(source: str) -> bytes:
    if "://" not in source:
        with open(source, "rb") as file:
            return file.read()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(source)
    with filesystem.open_input_file(path) as file:
        return file.read()


def stream_splits(plan: StreamPlan) -> StreamSplits:
    """The in-memory face of a streaming source: its metadata and a few decoded samples per split."""
    samples = {}
    for split in SPLITS:
        chosen = plan.files[split][:SAMPLES[split]]
        x = np.zeros((len(chosen), *plan.in_shape), dtype=np.float32)
        for index, file in enumerate(chosen):
            x[index] = _checked_sample(file, plan.decode)
        samples[split] = (x, plan.labels[split][:len(chosen)])
    return StreamSplits(plan.task, *samples["train"], *samples["val"], *samples["test"],
                        class_names=plan.class_names, pixel_max=plan.pixel_max, plan=plan,
                        sizes={split: len(plan.files[split]) for split in SPLITS},
                        counts=np.bincount(plan.labels["train"], minlength=len(plan.class_names)).astype(float))


class _Decode:
    """Ray Data's map over a block of listed files: their inputs decoded, their labels as they are
    (and, for the statistics pass, which rows are training rows). A file that cannot be read is an
    OSError, which Ray retries (a storage hiccup); one that reads but does not decode is the user's."""

    def __init__(self, settings: dict[str, Any], flag_training: bool = False):
        self.settings, self.flag_training = settings, flag_training

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = []
        for source in map(str, batch["source"]):
            try:
                data = read_bytes(source)
            except OSError as error:  # (retried: ``configure``)
                raise OSError(f"{READ_FAILED} {source}: {error}") from None
            inputs.append(_checked_sample(source, self.settings, data))
        return {"x": np.stack(inputs), "y": batch["y"], **({"train": batch["train"]} if self.flag_training else {})}


def _moments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-channel sums of one batch's training images (or per-feature sums of table rows), to be added up."""
    x = batch["x"][batch["train"].astype(bool)].astype(np.float64)
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    count = x.size // x.shape[1]
    sums, squares = x.sum(axis=axes), (x * x).sum(axis=axes)
    row = {"n": np.array([count], dtype=np.float64)}
    for index in range(x.shape[1]):
        row[f"s{index}"], row[f"q{index}"] = np.array([sums[index]]), np.array([squares[index]])
    return row


def configure() -> None:
    """Ray Data's settings for this job's Datasets (they travel with them to the workers): a block
    whose file could not be read is retried; progress bars and per-dataset log lines are off (the
    job prints its own progress)."""
    import logging

    import ray.data

    from ray.data.context import ShuffleStrategy

    context = ray.data.DataContext.get_current()
    context.retried_map_errors, context.max_map_retries = [READ_FAILED], 3
    # The statistics' aggregation (and a full shuffle) by Ray's sort-based shuffle: the default one
    # starts aggregator actors on each call, 5-7 s against 1.2-3 s on 2 cores.
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # Parquet through Ray Data's first reader: its second (2.5x) lists the files in a task of each
    # epoch's run (~0.9 s) and reads a table this size as one block (a 400,000-row table: the
    # first batch after 1.7-1.9 s, against 0.2 s, and the whole table in one worker's memory).
    context.use_datasource_v2 = False
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # (not a line per dataset executed)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # ("progress bars disabled")


def check_resources(worker_cpus: float) -> str | None:
    """Ray Data decodes on CPUs the training workers do not hold: with none left it would wait forever.
    Returns a note when the cluster has them but other work holds them now: the job will wait, at
    "starting", until they are free (Ray Data's reads would otherwise wait without a word)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    if total - worker_cpus < 1:
        raise BadInput(f"scaling: the training workers take {worker_cpus:g} of the cluster's {total:g} CPUs, and a "
                       "streaming source needs at least one more to read and decode its files (Ray Data); lower "
                       "scaling.cpus_per_worker (e.g. 0.5) or num_workers, or add a node")
    free = ray.available_resources().get("CPU", 0.0)
    if free - worker_cpus < 1:
        return (f"{free:g} of the cluster's {total:g} CPUs are free now: the training workers take {worker_cpus:g} and "
                "Ray Data needs one more to read the files, so the job waits until other work lets go of some "
                "(`ray status` shows what holds them)")
    return None


def attach(splits: StreamSplits, options, seed: int) -> StreamSplits:
    """Ray is up: one Ray Dataset per split (the training split shuffled as ``options`` say: a
    ``StreamSpec``), after one Ray Data pass over every file: each must decode to the first one's
    shape (a DataError naming the file, before the first step), and the training split's files give
    the statistics."""
    import ray.data

    configure()
    plan = splits.plan
    items = {split: [{"source": file, "y": label, "train": split == "train"}
                     for file, label in zip(plan.files[split], plan.labels[split].tolist())] for split in SPLITS}

    def listed(rows: list[dict]):
        return ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / ROWS_PER_BLOCK)))

    def decoded(rows, flag_training: bool = False):
        return rows.map_batches(_Decode(plan.decode, flag_training), batch_format="numpy")

    streams = {split: listed(items[split]) for split in SPLITS}
    channels = plan.in_shape[0]
    try:  # every file of every split decodes to the one shape; the training split's sums
        every = listed([row for split in SPLITS for row in items[split]])
        totals = decoded(every, flag_training=True).map_batches(_moments, batch_format="numpy").sum(
            ["n"] + [f"{kind}{index}" for index in range(channels) for kind in "sq"])
    except Exception as error:  # a Ray task's failure wraps the DataError that says which file
        if (cause := _data_error(error)) is None:
            raise
        raise DataError(f"{plan.where}: {cause}") from None
    count = totals["sum(n)"]
    mean = np.array([totals[f"sum(s{index})"] / count for index in range(channels)])
    variance = np.array([totals[f"sum(q{index})"] / count for index in range(channels)]) - mean ** 2
    std = np.sqrt(np.maximum(variance, 0.0))
    std = np.where(std < 1e-8, 1.0, std)
    shape = (channels, 1, 1) if len(plan.in_shape) == 3 else (channels,)
    splits.stats = (mean.reshape(shape).astype(np.float32), std.reshape(shape).astype(np.float32))
    # Seeded, and reseeded each time an epoch runs the Dataset again: a new order every epoch, and
    # the same orders in every run of the spec (up to the order in which parallel tasks finish).
    order = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
    if options.shuffle == "local":  # a new file order each epoch; each worker's buffer mixes the samples further
        streams["train"] = streams["train"].randomize_block_order(seed=order)
    splits.streams = {split: decoded(rows) for split, rows in streams.items()}
    if options.shuffle == "full":
        splits.streams["train"] = splits.streams["train"].random_shuffle(seed=order)
    return splits


def keep_validation(splits: StreamSplits) -> None:
    """The validation split read once and kept in Ray's object store, where it fits in a share of
    it (``KEPT_SHARE``): every epoch would otherwise read all the files again to find its rows (a
    table's: ~1 s of an epoch at 400,000 rows). A larger one streams each epoch."""
    import ray

    encoded_bytes = splits.size("val") * (int(np.prod(splits.in_shape)) * 4 + 8)  # float32 inputs, a target
    if encoded_bytes <= KEPT_SHARE * ray.cluster_resources().get("object_store_memory", 0.0):
        splits.streams["val"] = splits.streams["val"].materialize()


def _data_error(error: BaseException) -> str | None:
    """The DataError inside Ray's wrappers (a task's error reaches the driver as text), if that is what failed."""
    import re

    found = re.search(r"DataError: (.+)", str(error))
    return found.group(1) if found else None

