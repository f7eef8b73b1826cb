"""What a supervised job needs before its first step: data, model, task, loaders.

``preflight`` runs all of it once on the driver, before Ray or MLflow start, so that bad input
costs seconds and exits with code 2; the workers then build the same things deterministically.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from deepyard import transfer
from deepyard.data import Splits, load_splits
from deepyard.errors import BadInput, DataError
from deepyard.models import MODELS
from deepyard.models.pipeline import Pipeline, TableEmbeddings
from deepyard.optim import OPTIMIZERS, check_optimizer
from deepyard.spec import TrainJob
from deepyard.tasks import TASKS
from deepyard.tasks.generation import Generation
from deepyard.tasks.base import selectable


def load_data(spec: TrainJob, uri: str | None = None) -> Splits:
    """The spec's splits. Text that starts from a pretrained model (``init.from``) is coded with
    that model's vocabulary (``uri``: the tracking server that holds it, where not the default)."""
    fairness = getattr(spec, "fairness", None)  # (a compress job's spec has none)
    inherited = transfer.source_vocabulary(spec.init.from_, uri) if getattr(spec, "init", None) else None
    splits = load_splits(spec.data.name, spec.data.params, val_fraction=spec.data.val_fraction,
                         test_fraction=spec.data.test_fraction, seed=split_seed(spec),
                         max_train_samples=spec.data.max_train_samples,
                         sensitive=fairness.sensitive if fairness else (),
                         keep_sensitive=fairness.include_sensitive if fairness else False,
                         stream=spec.data.stream is not None, vocab=list(inherited[0]) if inherited else None)
    if inherited and splits.is_text and inherited[1] != splits.token_level:
        raise BadInput(f"init.from: {spec.init.from_} reads {inherited[1]} tokens but data {spec.data.name!r} is "
                       f"{splits.token_level} tokens; start from a model trained on {splits.token_level} tokens, "
                       "or set the data's level to match")
    return splits


def split_seed(spec: TrainJob) -> int:
    return spec.train.seed if spec.data.seed is None else spec.data.seed


def build(spec: TrainJob, splits: Splits):
    """The model (preprocessing fitted on the training split included) and the task."""
    if splits.is_text != MODELS.accepts(spec.model.name, "vocab_size"):
        raise BadInput(f"model {spec.model.name!r} reads {'numbers' if splits.is_text else 'token ids'} but data "
                       f"{spec.data.name!r} is {'text' if splits.is_text else 'numbers'}; use " +
                       ("transformer_encoder (classification) or transformer_decoder (language model)"
                        if splits.is_text else "mlp, cnn, lstm, gru or rnn"))
    embedded = splits.embedded()
    embeddings = TableEmbeddings(splits.in_shape[0], embedded) if embedded else None
    in_shape = (embeddings.out_width,) if embeddings else splits.in_shape
    net = MODELS.build(spec.model.name, spec.model.params, in_shape=in_shape,
                       num_outputs=splits.num_outputs, vocab_size=len(splits.vocab) if splits.is_text else None)
    # A generative model's task is generation, whatever the data's labels; otherwise the data's task.
    task_class = TASKS[Generation.name if getattr(net, "generative", False) else splits.task]
    if problem := task_class.fits(net, splits):
        raise BadInput(f"model {spec.model.name!r} does not fit data {spec.data.name!r}: {problem}")
    target_mean, target_std = splits.target_stats()
    if spec.train.class_weight and not task_class.weighs_classes:
        raise BadInput(f"train.class_weight: a {task_class.name} job has no classes to weigh; leave it out")
    weights = class_weights(splits) if spec.train.class_weight else None
    task = task_class(num_classes=splits.num_outputs, target_mean=target_mean, target_std=target_std,
                      class_weights=weights)
    return Pipeline(net, task.input_stats(splits), embeddings), task


def class_weights(splits: Splits) -> list[float]:
    """scikit-learn's "balanced" weights, from the training split: n / (classes x count)."""
    counts = splits.class_counts()
    return (counts.sum() / (len(counts) * np.maximum(counts, 1))).tolist()


def monitored(spec_metric: str | None, spec_mode: str | None, task) -> tuple[str, str]:
    """The validation metric to rank checkpoints (or stop early) by, and whether higher is better
    (the task's direction unless the spec says otherwise)."""
    metric = spec_metric or task.monitor
    return metric, spec_mode or selectable(type(task))[metric]


def batch_size(spec: TrainJob, splits: Splits) -> int:
    return splits.size("train") if spec.train.batch_size == "full" else spec.train.batch_size


def train_loader(spec: TrainJob, splits: Splits, rank: int, world: int) -> DataLoader:
    """Shuffled batches of this worker's shard; the shuffle follows ``train.seed`` on any worker count."""
    dataset = TensorDataset(torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train))
    size = batch_size(spec, splits)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=spec.train.seed) if world > 1 else None
    # A last batch of one sample would break batch norm; drop it (it is reshuffled next epoch).
    drop_last = math.ceil(len(dataset) / world) % size == 1 and len(dataset) > world
    return DataLoader(dataset, batch_size=size, shuffle=sampler is None, sampler=sampler, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(spec.train.seed))


EVAL_BATCH = 1024  # scoring needs no gradients: large batches for a GPU, and for Ray Data's streams
# (each streamed batch has a fixed cost). In memory on a CPU large batches outgrow the caches: on 2
# cores the zoo's CNN scored 4,096 Fashion-MNIST images in 1.44 s in batches of 1024, 0.90 s in 256
# and 0.60 s in 128 (no faster below); the char GPT 2.47, 2.10 and 1.68 s (1.47 in 32); the
# BERT-like encoder on reviews 0.24, 0.15 and 0.15 s (bench/eval_batch.py).
CPU_EVAL_BATCH = 128


def eval_loader(x: np.ndarray, y: np.ndarray, device: torch.device) -> DataLoader:
    size = CPU_EVAL_BATCH if device.type == "cpu" else EVAL_BATCH
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=size)


def preflight(spec: TrainJob):
    """Everything that can fail on bad input, done once before Ray or MLflow start: exit code 2.

    Returns the data splits and the task."""
    splits = load_data(spec)
    check_sizes(spec, splits)
    try:
        model, task = build(spec, splits)
        model.train()(torch.from_numpy(splits.x_train[:2]))  # one forward pass: shapes fit end to end
    except (ValueError, RuntimeError) as error:
        raise BadInput(f"model {spec.model.name!r} does not fit data {spec.data.name!r} "
                       f"(input {splits.in_shape}): {error}") from None
    if not task.data_parallel and spec.scaling.num_workers > 1:
        raise BadInput(f"scaling.num_workers: {spec.model.name} trains on one worker (its {task.name} steps are "
                       "not data-parallel yet); set num_workers: 1")
    has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_batch_norm and batch_size(spec, splits) == 1:
        raise BadInput("train.batch_size: 1 cannot train a model with batch norm (it needs 2+ samples per "
                       "batch); use a larger batch or model.params.batch_norm: false")
    if spec.init:
        transfer.start_from(spec.init, model.net)  # the source exists and fits, each regex matches
        if (spec.init.unfreeze_at_epoch or 0) > spec.train.epochs:
            raise BadInput(f"init.unfreeze_at_epoch: {spec.init.unfreeze_at_epoch} is after the last epoch "
                           f"(train.epochs: {spec.train.epochs}); nothing would unfreeze")
    try:
        parameter_groups(spec, model.net)
        check_optimizer(spec.optim.name, spec.optim.params)
    except ValueError as error:
        raise BadInput(f"optim: {error}") from None
    for section, choice in (("train.early_stopping", spec.train.early_stopping), ("checkpoint", spec.checkpoint)):
        check_metric(f"{section}.metric", getattr(choice, "metric", None), task)
    if spec.explain:
        check_explain(spec, splits, task, model)
    if getattr(spec, "fairness", None):
        from deepyard.runners import fairness

        fairness.check(spec.fairness, splits, task)
    if spec.train.adversarial and (splits.is_text or hasattr(task, "train_step")):
        why = "reads token ids, which gradients cannot perturb" if splits.is_text else "has steps of its own (a GAN)"
        raise BadInput(f"train.adversarial: {spec.model.name} on {spec.data.name} {why}; adversarial training "
                       "is for models of numeric inputs trained on a loss")
    if splits.streaming:
        check_streaming(spec, splits, task)
    elif spec.data.stream:
        raise BadInput(f"data.stream: data {spec.data.name!r} is loaded into memory, not streamed; leave data.stream "
                       "out (it applies to streaming sources: image_folder, and csv or parquet files)")
    return splits, task


def in_memory(splits: Splits, spec: TrainJob, job: str) -> Splits:
    """``splits``, for a job kind that reads its data in memory only so far (sweeps, compress, robustness)."""
    if splits.streaming:
        raise BadInput(f"data {spec.data.name!r} streams through Ray Data, which {job} jobs do not read yet; train it "
                       "with a train job, or use an in-memory data set")
    return splits


def check_sizes(spec: TrainJob, splits: Splits) -> None:
    """Every split has samples, and a stream's can be shared by the workers. (A streamed table's sizes
    are estimates before Ray starts: checked again once its pass has counted them.)"""
    for split in ("train", "val", "test"):
        if splits.size(split) == 0:
            raise DataError(f"data {spec.data.name!r}: the {split} split is empty; use more data or change "
                            "data.val_fraction / data.test_fraction / data.max_train_samples")
    workers = spec.scaling.num_workers
    if splits.streaming and (splits.size("train") // workers < 2 or splits.size("val") < workers):
        raise DataError(f"data {spec.data.name!r}: {splits.size('train')} training and {splits.size('val')} validation "
                        f"samples cannot be shared by {workers} workers (each needs 2 training samples and 1 "
                        "validation sample); add data or use fewer workers")


def check_streaming(spec: TrainJob, splits: Splits, task) -> None:
    """What a streaming source cannot do yet, said before anything starts."""
    where = f"data {spec.data.name!r} streams through Ray Data"
    if spec.train.batch_size == "full":
        raise BadInput(f"train.batch_size: full needs the whole training split in memory; {where}: set a batch size")
    if spec.train.adversarial:
        raise BadInput(f"train.adversarial: {where}; adversarial training needs the training inputs' range, which "
                       "is measured on in-memory data sets only so far")
    if hasattr(task, "train_step"):
        raise BadInput(f"model {spec.model.name!r}: {where}; a model with steps of its own (a GAN) trains on "
                       "in-memory data sets only so far")


def check_explain(spec: TrainJob, splits: Splits, task, pipeline: torch.nn.Module) -> None:
    """``explain:`` tried on the untrained model, one test example, two steps: an option the model
    cannot take (a target it does not have, saliency on text) fails now, not after training."""
    from deepyard.explain.attributions import Explainer, explained_output
    from deepyard.serve.payloads import BadRequest

    try:
        explained_output({"task": task.name}, f"{spec.model.name} on {spec.data.name}")
        explainer = Explainer(task.serving_module(pipeline).eval(), serving_metadata(spec, splits, task, pipeline),
                              spec.name)
        explainer.explain(splits.x_test[:1], spec.explain.model_copy(update={"steps": 2}), refine=False)
    except BadRequest as error:
        raise BadInput(f"explain: {error}") from None


def serving_metadata(spec: TrainJob, splits: Splits, task, pipeline: torch.nn.Module) -> dict[str, Any]:
    """What the registered model carries for serving (and explaining): task, shapes, names..."""
    metadata = {"task": task.name, "input_shape": list(splits.in_shape), "class_names": splits.class_names,
                "feature_names": splits.feature_names, "job": spec.name}
    if splits.is_text:  # the served model tokenizes requests with the training vocabulary
        metadata.update(vocab=splits.vocab, token_level=splits.token_level)
    if splits.persistence:  # forecasting windows: explained per past time step
        metadata["series"] = True
    if splits.table:  # a mixed table: requests are objects of raw columns, encoded with the fitted schema
        metadata["table"] = splits.table
    if splits.is_image:  # PNG requests are scaled from 0-255 into the data set's own pixel range
        metadata["pixel_max"] = splits.pixel_max or float(splits.x_train.max())
    metadata.update(task.serving_metadata(pipeline, splits))
    return metadata


def make_optimizer(spec: TrainJob, net: torch.nn.Module) -> torch.optim.Optimizer:
    """The spec's optimizer over ``net``, with its parameter groups' own rates."""
    return OPTIMIZERS.build(spec.optim.name, spec.optim.params, parameters=parameter_groups(spec, net),
                            lr=spec.optim.lr, weight_decay=spec.optim.weight_decay)


def parameter_groups(spec: TrainJob, net: torch.nn.Module) -> list[dict]:
    """``net``'s parameters in the spec's groups (a BadInput where a group's regex matches nothing)."""
    return transfer.param_groups(net, spec.optim.param_groups, lr=spec.optim.lr,
                                 weight_decay=spec.optim.weight_decay)


def check_metric(where: str, metric: str | None, task) -> None:
    """A validation metric the task reports (None: the task's default)."""
    valid = list(selectable(type(task)))
    if metric and metric not in valid:
        raise BadInput(f"{where}: {task.name} reports {', '.join(valid)}, not {metric!r}")
