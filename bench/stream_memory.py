"""Where a streaming worker's memory goes: one epoch of a streamed table's training split consumed
as a worker consumes it (``StreamedBatches``, batches of 256, the default shuffle buffer), for each
folder given; the process's RSS, USS (private) and shared memory after, and the peak USS sampled
every 500 batches. Ray's object store is mapped shared memory: the pages of the blocks a process
has read count in its RSS, not in its USS (``object_store_pages_mb``: those pages, from smaps).

    .venv/bin/python bench/stream_memory.py DIR_1X DIR_10X [--object-store-mb 512]   # (table_scale.py writes both)

Each table in a process of its own, twice: with the raylet settings a deepyard cluster runs with
(``settings.NODE_ENV``: released objects freed every 100 ms) and with Ray's defaults (in batches of
100 or once a second). With ``--object-store-mb``, Ray's object store is that size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import os

import psutil
import ray
import torch

import record
from deepyard.data import load_splits
from deepyard.data import attach_streams as attach
from deepyard.runners.edges import StreamedBatches
from deepyard.settings import NODE_ENV
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
    parser = argparse.ArgumentParser()
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--object-store-mb", type=int, help="cap Ray's object store (default: Ray's, ~30%% of memory)")
    parser.add_argument("--one", action="store_true", help="(internal) one path, in this process")
    parser.add_argument("--ray-defaults", action="store_true", help="(internal) without settings.NODE_ENV")
    args = parser.parse_args()
    if args.one:
        if not args.ray_defaults:
            os.environ.update(NODE_ENV)  # (read by the raylet that ray.init starts)
        store = args.object_store_mb * 2 ** 20 if args.object_store_mb else None
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=store)
        print(json.dumps(one_epoch(args.paths[0])))
        return
    result = {"bench": "stream_memory", "object_store_mb": args.object_store_mb, "node_env": NODE_ENV}
    for settings in ("node_env", "ray_defaults"):
        runs = []
        for path in args.paths:  # each in a process of its own: a peak is that table's alone
            command = [sys.executable, __file__, path, "--one"] + (
                ["--object-store-mb", str(args.object_store_mb)] if args.object_store_mb else []) + (
                ["--ray-defaults"] if settings == "ray_defaults" else [])
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
        result[settings] = {"runs": runs,
                            "ratio_peak_uss_last_vs_first": runs[-1]["peak_uss_mb"] / runs[0]["peak_uss_mb"],
                            "ratio_peak_rss_last_vs_first": runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]}
    record.save("stream_memory" + (f"_store{args.object_store_mb}mb" if args.object_store_mb else ""), result)


if __name__ == "__main__":
    main()
