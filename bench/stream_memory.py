"""Where a streaming worker's memory goes: one epoch of a streamed table's training split consumed
as a worker consumes it (``StreamedBatches``, batches of 256, the default shuffle buffer), for each
folder given; the process's RSS, USS (private) and shared memory after, and the peak USS sampled
every 500 batches. Ray's object store is mapped shared memory: the pages of the blocks a process
has read count in its RSS, not in its USS (``object_store_pages_mb``: those pages, from smaps).

    .venv/bin/python bench/stream_memory.py DIR_1X DIR_10X   # (bench/table_scale.py writes both)
"""

from __future__ import annotations

import resource
import sys

import psutil
import ray
import torch

import record
from deepyard.data import load_splits
from deepyard.data import attach_streams as attach
from deepyard.runners.edges import StreamedBatches
from deepyard.spec.train import StreamSpec


def object_store_pages_mb() -> float:
    """The resident pages of Ray's object store (plasma's shared file) that this process maps."""
    pages, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = "plasma" in line
            elif inside and line.startswith("Rss:"):
                pages += int(line.split()[1])
    return pages / 1024


def one_epoch(path: str) -> dict:
    splits = load_splits("parquet", {"path": path, "target": "label"}, val_fraction=0.05, test_fraction=0.05,
                         seed=0, stream=True)
    attach(splits, StreamSpec(), 0)
    process, peak_uss = psutil.Process(), 0
    batches = StreamedBatches(splits.streams["train"], splits.size("train"), 256, torch.device("cpu"), training=True,
                              shuffle_buffer=2048, prefetch_batches=2)
    for index, _ in enumerate(batches):
        if index % 500 == 0:
            peak_uss = max(peak_uss, process.memory_full_info().uss)
    memory = process.memory_full_info()
    return {"path": path, "train_rows": splits.size("train"), "rss_mb": memory.rss / 2 ** 20,
            "uss_mb": memory.uss / 2 ** 20, "shared_mb": memory.shared / 2 ** 20, "peak_uss_mb": peak_uss / 2 ** 20,
            "object_store_pages_mb": object_store_pages_mb(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = [one_epoch(path) for path in sys.argv[1:]]
    ray.shutdown()
    record.save("stream_memory", {"bench": "stream_memory", "runs": runs,
                                  "ratio_peak_uss_last_vs_first": runs[-1]["peak_uss_mb"] / runs[0]["peak_uss_mb"],
                                  "ratio_peak_rss_last_vs_first": runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]})


if __name__ == "__main__":
    main()
