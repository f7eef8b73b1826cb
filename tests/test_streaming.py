"""Streaming sources: an image folder read by Ray Data into Ray Train workers (real Ray, real MLflow)."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import last_json

FOLDER_JOB = """
kind: train
name: {name}
data:
  name: image_folder
  params: {{path: {path}{extra}}}
model: {{name: cnn, params: {{channels: [8, 16], hidden_sizes: [32]}}}}
optim: {{name: adam, lr: 0.01}}
train: {{epochs: 2, batch_size: 32}}
scaling: {{num_workers: {workers}, cpus_per_worker: 0.5}}
"""


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 digits as 8x8 grey PNGs (levels 0-255), one folder per digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    levels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    return write_folder(tmp_path_factory.mktemp("digits_folder"), levels, digits.target, [str(c) for c in range(10)])


def folder_spec(write_spec, path, name: str, workers: int = 1, extra: str = "") -> str:
    return write_spec(FOLDER_JOB.format(name=name, path=path, workers=workers, extra=extra), f"{name}.yaml")


def test_each_file_keeps_its_split_whatever_else_is_in_the_folder():
    from deepyard.data.image_folder import split_of

    names = [f"{c}/{i}.png" for c in range(3) for i in range(2000)]
    splits = [split_of(name, 0, 0.15, 0.15) for name in names]
    assert splits == [split_of(name, 0, 0.15, 0.15) for name in reversed(names)][::-1]  # order-free
    shares = {split: splits.count(split) / len(splits) for split in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.7, abs=0.03) and shares["test"] == pytest.approx(0.15, abs=0.03)
    assert splits != [split_of(name, 1, 0.15, 0.15) for name in names]  # the seed reshuffles


def test_16_bit_images_are_scaled_to_8_bits_not_clipped():
    import io

    from deepyard.data.images import decode

    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I;16")
    assert decode(buffer.getvalue(), 1, None).tolist() == [[[0, 1, 128, 255]]]


@pytest.mark.slow
@pytest.mark.long  # (a minute: a Ray Train worker group and Ray Data's split coordinator start)
def test_an_image_folder_trains_on_two_workers_each_on_its_own_share(ray_cluster, cli, write_spec, digits_folder):
    result = cli("run", folder_spec(write_spec, digits_folder, "digits_folder_ddp", workers=2), "--json")
    summary = last_json(result)
    assert summary["metrics"]["test_accuracy"] > 0.6

    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    from deepyard.data.image_folder import image_folder

    plan = image_folder(str(digits_folder))
    train_rows = len(plan.files["train"])
    # Each worker trains on its own equal share: together they see the split once an epoch, not twice.
    seen = [m.value for m in client.get_metric_history(run.info.run_id, "train_samples")]
    assert seen == [2 * (train_rows // 2)] * 2
    assert run.data.params["data.name"] == "image_folder"

    # The registered model takes raw PNG levels: the statistics Ray Data measured travel inside it.
    model = mlflow.pyfunc.load_model(f"models:/digits_folder_ddp/{summary['model_version']}")
    test = plan.files["test"]
    images = np.stack([np.asarray(Image.open(file), dtype=np.float32)[None] for file in test])
    predicted = np.asarray(model.predict(images)).argmax(axis=1)
    assert (predicted == plan.labels["test"]).mean() == pytest.approx(summary["metrics"]["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_one_worker_streams_too_and_says_so(ray_cluster, cli, write_spec, digits_folder):
    spec = folder_spec(write_spec, digits_folder, "digits_folder_one", extra=", size: [12, 12]")
    assert "input (1, 12, 12), streamed by Ray Data" in (lambda r: r.stdout + r.stderr)(cli("validate", spec))
    summary = last_json(cli("run", spec, "--json"))
    assert summary["metrics"]["test_accuracy"] > 0.6
    assert "data_stats_s" in summary["timings"]


@pytest.mark.slow
def test_workers_that_leave_no_cpu_to_decode_on_exit_2(ray_cluster, cli, write_spec, digits_folder):
    spec = folder_spec(write_spec, digits_folder, "no_cpu_left", workers=2)
    result = cli("run", spec, "--set", "scaling.cpus_per_worker=1", expect=2)
    assert "take 2 of the cluster's 2 CPUs" in result.stderr + result.stdout


@pytest.mark.slow
def test_a_validation_split_that_fits_is_read_once_and_a_larger_one_streams(ray_cluster, monkeypatch):
    from types import SimpleNamespace

    import ray.data
    from ray.data.dataset import MaterializedDataset

    from deepyard.data import streaming

    def splits():
        return SimpleNamespace(in_shape=(3,), size=lambda split: 100, streams={"val": ray.data.range(100)})

    small = splits()
    streaming.keep_validation(small)
    assert isinstance(small.streams["val"], MaterializedDataset) and small.streams["val"].count() == 100
    monkeypatch.setattr(streaming, "KEPT_SHARE", 100 * (3 * 4 + 8) / 2 / ray.cluster_resources()["object_store_memory"])
    large = splits()
    streaming.keep_validation(large)
    assert not isinstance(large.streams["val"], MaterializedDataset)


@pytest.mark.slow
def test_statistics_come_from_the_training_split_only(ray_cluster, tmp_path):
    from deepyard.data.image_folder import image_folder
    from deepyard.data.streaming import attach, stream_splits
    from deepyard.spec.train import StreamSpec

    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=(120, 1, 1)).astype(np.uint8) * np.ones((1, 6, 6), dtype=np.uint8)
    write_folder(tmp_path / "flat", levels, np.arange(120) % 2, ["a", "b"])
    plan = image_folder(str(tmp_path / "flat"))
    splits = attach(stream_splits(plan), StreamSpec(), seed=0)
    train = np.array([np.asarray(Image.open(file), dtype=np.float64).mean() for file in plan.files["train"]])
    every = np.array([np.asarray(Image.open(file), dtype=np.float64).mean()
                      for split in ("train", "val", "test") for file in plan.files[split]])
    mean, std = splits.input_stats()
    assert mean.shape == (1, 1, 1)
    assert mean.item() == pytest.approx(train.mean(), rel=1e-5) and std.item() == pytest.approx(train.std(), rel=1e-4)
    assert abs(train.mean() - every.mean()) > 0.1  # (so the check above could fail)
    batches = next(iter(splits.streams["val"].iter_torch_batches(batch_size=1000)))
    assert batches["x"].shape == (len(plan.files["val"]), 1, 6, 6)
    assert batches["y"].tolist() == plan.labels["val"].tolist()


def _bad(tmp_path: Path, layout: str) -> Path:
    root = tmp_path / layout
    picture = np.zeros((8, 8), dtype=np.uint8)
    if layout == "no_class_folders":
        root.mkdir()
        Image.fromarray(picture).save(root / "loose.png")
    elif layout == "one_class":  # (hidden folders are not classes)
        for folder in ("cat", ".ipynb_checkpoints"):
            (root / folder).mkdir(parents=True)
            Image.fromarray(picture).save(root / folder / "1.png")
    elif layout == "empty_class":
        (root / "cat").mkdir(parents=True)
        (root / "dog").mkdir()
        Image.fromarray(picture).save(root / "cat" / "1.png")
    return root


@pytest.mark.parametrize("layout, says", [
    ("missing", "is not a directory"),
    ("no_class_folders", "has no class folders"),
    ("empty_class", "class folder dog in"),
    ("one_class", "has one class folder (cat); a classifier needs two or more"),
])
def test_a_bad_folder_exits_2_before_anything_starts(cli, write_spec, tmp_path, layout, says):
    spec = folder_spec(write_spec, _bad(tmp_path, layout), "bad_folder")
    result = cli("validate", spec, expect=2)
    assert says in result.stderr + result.stdout


def test_what_a_stream_cannot_do_yet_exits_2(cli, write_spec, digits_folder):
    base = folder_spec(write_spec, digits_folder, "folder_sweep_base")
    sweep = write_spec(f"kind: sweep\nname: folder_sweep\nbase: {base}\n"
                       "space: {optim.lr: {loguniform: [0.001, 0.1]}}\nnum_samples: 2\n", "sweep.yaml")
    result = cli("validate", sweep, expect=2)
    assert "streams through Ray Data, which sweep jobs do not read yet" in result.stderr + result.stdout
    result = cli("validate", base, "--set", "train.batch_size=full", expect=2)
    assert "train.batch_size: full needs the whole training split in memory" in result.stderr + result.stdout
    result = cli("validate", base, "--set", "scaling.num_workers=2", "--set", "data.max_train_samples=3", expect=2)
    assert "3 training and" in result.stderr + result.stdout and "cannot be shared by 2 workers" in result.stderr
    in_memory = str(Path(__file__).resolve().parents[1] / "jobs/digits_mlp.yaml")
    result = cli("validate", in_memory, "--set", "data.stream={shuffle: none}", expect=2)
    assert "data.stream: data 'digits' is loaded into memory, not streamed" in result.stderr + result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout, says", [
    ("truncated", "{file} cannot be decoded (OSError: image file is truncated)"),
    ("not_an_image", "{file} cannot be decoded (UnidentifiedImageError"),
    ("mixed_sizes", "{file} decodes to (1, 9, 8), not (1, 8, 8) as the first image; set data.params.size"),
])
def test_a_file_that_does_not_decode_fails_before_training_with_its_name(ray_cluster, cli, write_spec, tmp_path,
                                                                         layout, says):
    root = tmp_path / layout
    rng = np.random.default_rng(1)
    write_folder(root, rng.integers(0, 256, size=(40, 8, 8)).astype(np.uint8), np.arange(40) % 2, ["a", "b"])
    broken = root / "a" / "10.png"
    if layout == "truncated":
        broken.write_bytes(broken.read_bytes()[:60])  # the header reads; the pixels do not
    elif layout == "not_an_image":
        broken.write_text("not a picture")
    else:
        Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(broken)
    result = cli("run", folder_spec(write_spec, root, f"broken_{layout}"), expect=2)
    assert says.format(file=broken) in result.stderr + result.stdout


@pytest.fixture(scope="module")
def s3_folder(s3_server, digits_folder):
    """The digits folder in a bucket of the local S3-compatible server."""
    s3_server["client"].create_bucket(Bucket="pictures")
    for file in sorted(digits_folder.rglob("*.png"))[::4]:  # a quarter of them: 450 files
        s3_server["client"].put_object(Bucket="pictures", Key=f"digits/{file.relative_to(digits_folder).as_posix()}",
                                       Body=file.read_bytes())
    return {"uri": "s3://pictures/digits", "env": s3_server["env"]}


@pytest.mark.slow  # (an S3-compatible server in a process of its own: ~4.5 s of make test-fast's ~32)
def test_an_s3_folder_is_listed_and_split_like_a_local_one(cli, write_spec, s3_folder, digits_folder):
    from deepyard.data.image_folder import image_folder

    plan = image_folder(s3_folder["uri"])
    assert plan.class_names == [str(c) for c in range(10)]
    local = image_folder(str(digits_folder))
    # the same file, wherever it lies, goes to the same split
    here = {Path(file).relative_to(digits_folder).as_posix(): split for split in ("train", "val", "test")
            for file in local.files[split]}
    for split in ("train", "val", "test"):
        assert all(here[file.removeprefix(s3_folder["uri"] + "/")] == split for file in plan.files[split])
    spec = folder_spec(write_spec, s3_folder["uri"], "s3_folder")
    assert "streamed by Ray Data" in (lambda r: r.stdout + r.stderr)(cli("validate", spec))
    missing = folder_spec(write_spec, "s3://pictures/nothing-here", "s3_missing")
    assert "s3://pictures/nothing-here is not a folder there" in (lambda r: r.stdout + r.stderr)(
        cli("validate", missing, expect=2))


@pytest.mark.slow
@pytest.mark.long  # (a job of its own: its embedded Ray cluster's workers get the endpoint from the environment)
def test_a_job_trains_on_an_s3_folder(tmp_path, s3_folder):
    import json
    import os
    import subprocess
    import sys

    spec = tmp_path / "s3_job.yaml"
    # 450 files leave about 10 steps an epoch: 2 epochs ended at 0.50-0.60 test accuracy, too near the bar
    job = FOLDER_JOB.format(name="s3_job", path=s3_folder["uri"], workers=1, extra="")
    spec.write_text(job.replace("epochs: 2", "epochs: 5"))
    env = {**os.environ, **s3_folder["env"], "DEEPYARD_HOME": str(tmp_path / "home")}
    for inherited in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # its own store and cluster
        env.pop(inherited, None)
    done = subprocess.run([sys.executable, "-m", "deepyard", "run", str(spec), "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["metrics"]["test_accuracy"] > 0.5


@pytest.mark.slow
def test_a_block_whose_file_could_not_be_read_is_tried_again(ray_cluster, tmp_path, digits_folder):
    import ray.data

    from deepyard.data import streaming

    streaming.configure()
    hiccup = tmp_path / "hiccup"

    class ReadsOnceBadly(streaming._Decode):  # the storage fails the first read, as S3 sometimes does
        def __call__(self, batch):
            if not hiccup.exists():
                hiccup.touch()
                raise OSError(f"{streaming.READ_FAILED} {batch['source'][0]}: connection reset")
            return super().__call__(batch)

    files = sorted(str(path) for path in digits_folder.rglob("*.png"))[:5]
    rows = ray.data.from_items([{"source": file, "y": 0} for file in files]).map_batches(
        ReadsOnceBadly({"kind": "image", "channels": 1, "size": None, "shape": [1, 8, 8]}), batch_format="numpy")
    assert rows.count() == 5 and hiccup.exists()


@pytest.mark.slow
def test_a_streaming_trial_that_dies_goes_on_from_its_checkpoint(ray_cluster, cli, write_spec, digits_folder):
    import faults

    faults.crash_after_epoch("folder_recover", 2)  # the trial's process exits hard once, after epoch 2's checkpoint
    spec = folder_spec(write_spec, digits_folder, "folder_recover").replace("epochs: 2", "epochs: 3")
    Path(spec).write_text(Path(spec).read_text().replace("epochs: 2", "epochs: 3"))
    summary = last_json(cli("run", spec, "--set", "failure.max_failures=1", "--json"))
    client = MlflowClient()
    assert [m.value for m in client.get_metric_history(summary["run_id"], "resumed_from_epoch")] == [2]
    # The new process streamed the files again: every epoch saw the whole training split once.
    seen = sorted((m.step, m.value) for m in client.get_metric_history(summary["run_id"], "train_samples"))
    from deepyard.data.image_folder import image_folder

    rows = len(image_folder(str(digits_folder)).files["train"])
    rows -= rows % 32 == 1  # (a last batch of one sample is dropped: batch norm)
    assert seen == [(epoch, rows) for epoch in (1, 2, 3)]
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/maps' ranges: Linux only")
def test_a_streaming_worker_lets_go_of_the_store_pages_it_has_read(ray_cluster, monkeypatch):
    """A worker maps each block it reads from Ray's object store, and those pages stayed in its RSS
    for good (a 4M-row epoch: 384 MB). StreamedBatches lets go of them as it reads; the data stays
    in the store, and a block still in use reads back intact."""
    import ray
    import torch

    from deepyard.runners import edges, store_pages

    monkeypatch.setattr(edges, "RELEASE_EVERY_BYTES", 4 * 2 ** 20)
    rows, width = 128 * 1024, 64  # 32 MiB of float32 in 32 blocks, made by Ray tasks (in the store, not here)
    dataset = ray.data.range(rows, override_num_blocks=32).map_batches(
        lambda batch: {"x": np.repeat(batch["id"][:, None], width, axis=1).astype(np.float32),
                       "y": batch["id"] % 10}, batch_format="numpy")
    store_pages.release()
    mapped, seen = [], 0
    for inputs, targets in edges.StreamedBatches(dataset, rows, 1024, torch.device("cpu")):
        mapped.append(store_pages.mapped_bytes())
        assert torch.equal(inputs[:, 0], inputs[:, -1]) and torch.equal(targets, inputs[:, 0].long() % 10)
        seen += len(inputs)
    assert seen == rows
    assert max(mapped) < 12 * 2 ** 20  # 4 MiB between releases, plus the blocks in flight
    assert store_pages.mapped_bytes() < 2 ** 20  # and none once the epoch is over

    kept = ray.get(ray.put(np.arange(2 ** 20, dtype=np.float64)))  # 8 MiB, read-only view of the store
    assert store_pages.mapped_bytes() >= 8 * 2 ** 20
    assert store_pages.release() and store_pages.mapped_bytes() < 2 ** 20
    assert kept[-1] == 2 ** 20 - 1 and kept.sum() == (2 ** 20 - 1) * 2 ** 19  # mapped again, unchanged
