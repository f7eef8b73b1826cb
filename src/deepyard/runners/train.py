"""`kind: train`: a supervised job on Ray Train. Run one with `deepyard run jobs/quickstart.yaml`.

Driver: check the spec against the data (before Ray starts) -> open the MLflow run -> TorchTrainer.fit
-> log plots and the model, register a version. Workers: the plain PyTorch loop in
``train_loop_per_worker``; Ray appears only at the edges marked [1] to [4].
"""

from __future__ import annotations

import math
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from deepyard import settings, tracking
from deepyard.data import Splits
from deepyard.data.augment import random_affine
from deepyard.errors import BadInput, JobFailed
from deepyard.optim import OPTIMIZERS, make_schedule, restore
from deepyard.runners import checkpoints
from deepyard.runners.loop import EarlyStopping, evaluate, improved, reduce_sum, train_step
from deepyard.runners.setup import build, eval_loader, load_data, monitored, preflight, train_loader
from deepyard.spec import TrainJob, flatten, to_yaml

# Test-only fault injection: the rank-0 worker exits hard once, at the end of this epoch.
FAIL_AT_EPOCH_ENV = "DEEPYARD_TEST_FAIL_AT_EPOCH"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """A TorchTrainer worker: the loop, with Ray Train at its edges."""
    from deepyard.runners.edges import TrainWorker

    fit_loop(config, TrainWorker())


def fit_loop(config: dict[str, Any], edges) -> float | None:
    """The training loop; Ray appears only at the ``edges`` [1]-[4] (``runners.edges``).

    Returns the best validation value on rank 0 (None elsewhere)."""
    spec = TrainJob.model_validate(config["spec"])
    rank, world, device = edges.rank, edges.world, edges.device
    torch.manual_seed(spec.train.seed)
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))  # intra-op threads = the CPUs Ray gave us
    splits = load_data(spec)  # every worker builds the same deterministic splits locally
    model, task = build(spec, splits)
    if task.name == "generation" and world > 1:  # (a sweep may set num_workers past preflight's check)
        raise BadInput(f"scaling.num_workers: {spec.model.name} trains on one worker; its alternating steps "
                       "are not data-parallel yet")
    use_amp = spec.scaling.use_gpu and spec.scaling.mixed_precision
    augment = spec.data.augment if splits.is_image else None

    batches = edges.shard(train_loader(spec, splits, rank, world))  # [1]
    val_shard = slice(rank, None, world)  # every worker scores its own slice; sums are all-reduced
    val_loader = eval_loader(splits.x_val[val_shard], splits.y_val[val_shard])

    model = edges.wrap(model)  # [2]
    plain_model = getattr(model, "module", model)
    optimizer = OPTIMIZERS.build(spec.optim.name, spec.optim.params, parameters=model.parameters(),
                                 lr=spec.optim.lr, weight_decay=spec.optim.weight_decay)
    steps_per_epoch = len(batches)
    schedule = spec.optim.schedule
    scheduler = make_schedule(optimizer, name=schedule.name, total_steps=steps_per_epoch * spec.train.epochs,
                              steps_per_epoch=steps_per_epoch, warmup_epochs=schedule.warmup_epochs,
                              step_size=schedule.step_size, gamma=schedule.gamma)
    ckpt_metric, ckpt_mode = monitored(spec.checkpoint.metric, spec.checkpoint.mode, task)
    stop_spec = spec.train.early_stopping
    stopper = EarlyStopping(*monitored(stop_spec.metric, stop_spec.mode, task), stop_spec.patience,
                            stop_spec.min_delta) if stop_spec else None
    best = {"value": None, "epoch": 0, "weights": checkpoints.cpu_copy(plain_model.state_dict())}

    start_epoch, stop = 1, False
    if (resumed := edges.checkpoint()) is not None:  # [3]
        with resumed.as_directory() as directory:
            state = checkpoints.load(directory)
            if "test" in state:  # the job had finished: hand its final checkpoint back
                edges.report({ckpt_metric: state["best_value"], "final": 1, "epoch": state["epochs_run"]},
                             directory if rank == 0 else None)
                return state["best_value"] if rank == 0 else None
        stop = state.get("stopped", False)
        plain_model.load_state_dict(state["model"])
        restore(optimizer, scheduler, state["optimizer"], state["scheduler"])  # this spec's hyperparameters
        best = state["best"]
        if stopper and state.get("stopper"):
            stopper.load_state_dict(state["stopper"])
        start_epoch = state["epoch"] + 1

    # Rank 0 logs each epoch to the job's MLflow run from a background thread, off the training path.
    log = tracking.BackgroundLogger(config["run_id"], config["tracking_uri"]) if rank == 0 else None
    if log and start_epoch > 1:
        log({"resumed_from_epoch": start_epoch - 1}, start_epoch - 1)
    # A sweep trial's numeric values, per epoch: under PBT they change as the trial goes.
    hyperparameters = {f"hp/{path}": float(value) for path, value in config.get("trial_values", {}).items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}

    epoch = start_epoch - 1
    for epoch in range(start_epoch, spec.train.epochs + 1 if not stop else start_epoch):
        if hasattr(batches.sampler, "set_epoch"):
            batches.sampler.set_epoch(epoch)
        model.train()
        sums, started = None, time.perf_counter()
        for inputs, targets in batches:
            if augment:
                inputs = random_affine(inputs, augment.max_shift, augment.max_rotation_deg)
            if hasattr(task, "train_step"):  # a GAN's alternating steps
                batch = task.train_step(model, optimizer, scheduler, inputs, targets,
                                        use_amp=use_amp, grad_clip=spec.train.grad_clip)
            else:
                batch = train_step(model, task, optimizer, scheduler, inputs, targets,
                                   use_amp=use_amp, grad_clip=spec.train.grad_clip)
            sums = batch if sums is None else sums + batch
        train_seconds = time.perf_counter() - started
        train_sums = reduce_sum(sums, device)
        metrics = {**task.metrics(train_sums, "train"),
                   **task.metrics(reduce_sum(evaluate(plain_model, val_loader, task, device)[0], device), "val"),
                   **_throughput(float(train_sums[-1]), train_seconds, task, splits),  # summed over workers
                   "lr": optimizer.param_groups[0]["lr"], "epoch": epoch}
        if task.name == "generation":  # one worker (preflight): judge this epoch's generator
            metrics.update(task.quality(plain_model, splits, "val", judge_seed=spec.train.seed))
        if improved(metrics[ckpt_metric], best["value"], ckpt_mode):
            best = {"value": metrics[ckpt_metric], "epoch": epoch,
                    "weights": checkpoints.cpu_copy(plain_model.state_dict())}
        stop = bool(stopper and stopper.update(metrics))
        if log:
            log({**metrics, **hyperparameters}, epoch)
            log.flush()  # a scheduler may stop this trial at the report: its epochs are in MLflow first
            if task.name == "language_model":
                _log_samples(config, plain_model, splits, epoch)
            elif task.name == "generation":
                _log_image_grid(config, plain_model, task, epoch)

        state = None
        if epoch % spec.checkpoint.every_n_epochs == 0 and rank == 0:
            state = {"model": plain_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "best": best, "epoch": epoch,
                     "stopper": stopper.state_dict() if stopper else None, "stopped": stop}
        with checkpoints.staged(state) as directory:
            edges.report(metrics, directory)  # [4] rank 0 persists the checkpoint

        if rank == 0 and epoch == config.get("fail_at_epoch") and not Path(config["fault_marker"]).exists():
            Path(config["fault_marker"]).touch()
            os._exit(1)
        if stop:
            break

    # The best epoch's weights, scored once on the held-out test split, go into the final checkpoint.
    # (No epoch ever scored, e.g. NaN from the start: rank it last.)
    best_value = best["value"] if best["value"] is not None else (-math.inf if ckpt_mode == "max" else math.inf)
    final = None
    if rank == 0:
        plain_model.load_state_dict(best["weights"])
        test_loader = eval_loader(splits.x_test, splits.y_test)
        classifying = task.name == "classification"
        sums, confusion = evaluate(plain_model, test_loader, task, device, confusion=classifying)
        test = task.metrics(sums, "test")
        final = {"model": best["weights"], "best_epoch": best["epoch"], "best_value": best_value, "epochs_run": epoch,
                 "stopped_early": stop, "test": test, "task": task.name,
                 "example": torch.from_numpy(splits.x_test[:5].copy())}
        if classifying:
            test["test_f1_macro"] = task.macro_f1(confusion)
            final["confusion"] = confusion
        if task.name == "generation":  # fresh noise, and how good the judge itself is on real images
            test.update(task.quality(plain_model, splits, "test", seed=1, judge_seed=spec.train.seed),
                        test_reference_accuracy=task.reference_accuracy)
            final["example"] = plain_model.net.noise(5, generator=torch.Generator().manual_seed(0))
        log({**test, "best_epoch": best["epoch"]}, epoch)
        final["failed_metric_writes"] = log.close()  # waits until every metric is written
    with checkpoints.staged(final) as directory:
        edges.report({ckpt_metric: best_value, "final": 1, "epoch": epoch}, directory)
    return best_value if rank == 0 else None


def _throughput(count: float, seconds: float, task, splits: Splits) -> dict[str, float]:
    """Samples per second. A task's sums count the targets it scores: one per sample, or one per
    token (a language model, which gets tokens per second too) or per step ahead (a forecast)."""
    samples = count / splits.y_train[0].size
    rates = {"samples_per_s": samples / seconds, "train_samples": samples}
    return {**rates, "tokens_per_s": count / seconds} if task.name == "language_model" else rates


def _log_samples(config: dict[str, Any], model, splits: Splits, epoch: int, count: int = 3) -> None:
    """A few texts sampled from the model, each from the start of a validation window, as an artifact."""
    from deepyard.data.text import decode
    from deepyard.tasks.language_model import generate

    model.eval()
    window = splits.in_shape[0]
    device = next(model.parameters()).device
    texts = []
    for index in range(count):
        prompt = splits.x_val[index * len(splits.x_val) // count, : max(1, window // 4)].tolist()
        ids = generate(lambda batch: model(batch.to(device)).cpu(), prompt, window=window,
                       max_new_tokens=2 * window, temperature=0.8, top_k=20, seed=index)
        texts.append(f"[{decode(prompt, splits.vocab, splits.join_with)}]"
                     f"{splits.join_with}{decode(ids, splits.vocab, splits.join_with)}")
    try:
        tracking.log_text(config["run_id"], "\n\n----\n\n".join(texts), f"samples/epoch_{epoch:04d}.txt",
                          uri=config["tracking_uri"])
    except Exception as error:  # a sample is a nicety: it must never stop training
        print(f"could not log the epoch's text samples: {error}")


def _log_image_grid(config: dict[str, Any], pipeline, task, epoch: int, rows: int = 8) -> None:
    """An 8x8 grid of generated images (fixed noise, so epochs compare) as an artifact."""
    from deepyard import plots
    from deepyard.tasks.generation import Sampler

    pipeline.eval()
    with torch.inference_mode():
        noise = pipeline.net.noise(rows * rows, generator=torch.Generator().manual_seed(0))
        images = Sampler(pipeline)(noise.to(next(pipeline.parameters()).device)).cpu().numpy()
    try:
        pixel_max = float(pipeline.standardize.mean.max() * 2)  # the GAN's scaling: mean = std = max / 2
        figure = plots.image_grid(images, rows, pixel_max, title=f"epoch {epoch}")
        tracking.client(config["tracking_uri"]).log_figure(config["run_id"], figure,
                                                          f"samples/epoch_{epoch:04d}.png")
        import matplotlib.pyplot as plt

        plt.close(figure)
    except Exception as error:  # a picture is a nicety: it must never stop training
        print(f"could not log the epoch's image grid: {error}")


def make_trainer(spec: TrainJob, run_id: str, monitor: tuple[str, str], callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = settings.storage_path(spec.storage_path)
    config: dict[str, Any] = {"spec": spec.model_dump(mode="json"), "run_id": run_id,
                              "tracking_uri": tracking.tracking_uri()}
    if fail_at := os.environ.get(FAIL_AT_EPOCH_ENV):
        config.update(fail_at_epoch=int(fail_at), fault_marker=str(Path(storage) / f"fault-{run_id}"))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=f"{spec.name}-{run_id[:8]}",
            storage_path=storage,
            # The best K by the validation metric; Ray always keeps the latest too (recovery).
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep, checkpoint_score_attribute=monitor[0],
                                               checkpoint_score_order=monitor[1]),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            callbacks=callbacks,
        ),
    )


def final_state(result) -> dict[str, Any]:
    if result.checkpoint is None:
        raise JobFailed("training finished without a final checkpoint")
    with result.checkpoint.as_directory() as directory:
        return checkpoints.load(directory)


def log_outcome(spec: TrainJob, splits: Splits, run_id: str, final: dict[str, Any], *,
                registered_name: str | None) -> dict[str, Any]:
    """Plots, the serving model (preprocessing and output head included) and, under
    ``registered_name`` (None: not registered), a new registered version."""
    from deepyard import plots  # matplotlib: the driver needs it, the workers never do

    pipeline, task = build(spec, splits)
    history = {f"{split}_{name}": tracking.metric_history(run_id, f"{split}_{name}")
               for split in ("train", "val") for name in task.metric_names}  # only what this task logs
    figure = plots.learning_curves({k: v for k, v in history.items() if v})
    tracking.log_figure(run_id, figure, "plots/learning_curves.png")
    if "confusion" in final:
        figure = plots.confusion_matrix(final["confusion"].numpy(), splits.class_names)
        tracking.log_figure(run_id, figure, "plots/confusion_matrix.png")

    pipeline.load_state_dict(final["model"])
    if splits.persistence:  # forecasting windows: the test span against the naive forecast
        _log_forecast(run_id, task, pipeline, splits, final)
    metadata = {"task": task.name, "input_shape": list(splits.in_shape), "class_names": splits.class_names,
                "feature_names": splits.feature_names, "job": spec.name}
    if task.name == "generation":  # the served model takes noise and answers images
        metadata.update(input_shape=[pipeline.net.latent_dim], image_shape=list(splits.in_shape))
    if splits.is_text:  # the served model tokenizes requests with the training vocabulary
        metadata.update(vocab=splits.vocab, token_level="char" if splits.join_with == "" else "word")
    if splits.is_image:  # PNG requests are scaled from 0-255 into the data set's own pixel range
        metadata["pixel_max"] = float(splits.x_train.max())
    tags = {f"metric.{k}": f"{v:.6g}" for k, v in final["test"].items()}
    return tracking.log_model(run_id, task.serving_module(pipeline), final["example"].numpy(),
                              registered_name=registered_name,
                              metadata=metadata, version_tags={**tags, "run_id": run_id})


def promote(model_name: str, version: str, options, metric: str, mode: str) -> dict[str, Any]:
    """Move the alias to ``version``, only if it beats the holder on the test twin of ``metric``."""
    return tracking.promote(model_name, version, options.alias, only_if_better=options.only_if_better,
                            metric="test_" + metric.removeprefix("val_"), mode=mode)


def _log_forecast(run_id: str, task, pipeline, splits: Splits, final: dict[str, Any]) -> None:
    """RMSE and MAE of the naive forecasts on the same test windows, and the model's ratio to each."""
    from deepyard import plots
    from deepyard.data.splits import persistence_forecast, seasonal_naive_forecast

    with torch.inference_mode():
        predicted = task.serving_module(pipeline).eval()(torch.from_numpy(splits.x_test)).numpy()
    naive = persistence_forecast(splits)
    baselines = {"persistence": naive, "seasonal_naive": seasonal_naive_forecast(splits)}
    test = final["test"]
    for name, forecast in baselines.items():
        if forecast is None:
            continue
        error = forecast - splits.y_test
        test[f"test_rmse_{name}"] = float(np.sqrt(np.mean(error**2)))
        test[f"test_mae_{name}"] = float(np.mean(np.abs(error)))
        test[f"test_rmse_vs_{name}"] = test["test_rmse"] / max(test[f"test_rmse_{name}"], 1e-12)
    tracking.log_metrics(run_id, {k: v for k, v in test.items() if "persistence" in k or "seasonal" in k},
                         final["epochs_run"])
    def first(values: np.ndarray) -> np.ndarray:  # the one-step-ahead forecasts
        return values[:, 0] if values.ndim == 2 else values

    tracking.log_figure(run_id, plots.forecast(first(splits.y_test), first(predicted), first(naive)),
                        "plots/forecast.png")


def run(spec: TrainJob, *, address: str | None = None, ray_logs: bool = False,
        watch: Callable[[str, int], Any] | None = None, resume: bool = False) -> dict[str, Any]:
    """Run the job to the end; returns the ids, final test metrics and model URIs.

    ``watch(run_id, epochs)``, if given, is a context manager that shows progress while training runs.
    """
    from contextlib import nullcontext

    from deepyard import cluster

    if resume:
        raise BadInput("--resume continues an interrupted sweep; a train job restarts from its checkpoints "
                       "on its own (failure.max_failures)")

    splits, task = preflight(spec)
    monitor = monitored(spec.checkpoint.metric, spec.checkpoint.mode, task)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def open_run() -> str:
        run_id = tracking.start_run(spec.experiment, spec.name, flatten(spec), to_yaml(spec),
                                    tags={"deepyard.task": task.name})
        timings["mlflow_start_s"] = time.perf_counter() - started
        return run_id

    # Opening the MLflow run (~2 s on a new sqlite store) overlaps Ray's start-up (~4 s).
    with ThreadPoolExecutor(max_workers=2) as pool:
        opening = pool.submit(open_run)
        try:
            with cluster.connected(address, ray_logs):
                timings["ray_connect_s"] = time.perf_counter() - started
                run_id = opening.result()
                timings["startup_s"] = time.perf_counter() - started
                trainer = make_trainer(spec, run_id, monitor)
                pool.submit(tracking.preload)  # the driver idles during fit(): import what logging needs
                with watch(run_id, spec.train.epochs) if watch else nullcontext():
                    result = trainer.fit()
                timings["fit_s"] = time.perf_counter() - started - timings["startup_s"]
            if getattr(result, "error", None):
                raise result.error
            final = final_state(result)
            outcome = log_outcome(spec, splits, run_id, final,
                                  registered_name=spec.model_name if spec.register.enabled else None)
            if spec.promote and outcome.get("model_version"):
                outcome["promotion"] = promote(spec.model_name, outcome["model_version"], spec.promote, *monitor)
            timings["total_s"] = time.perf_counter() - started
            tracking.log_metrics(run_id, {f"timing_{k}": v for k, v in timings.items()}, 0)
            tracking.finish_run(run_id, "FINISHED")
        except KeyboardInterrupt:
            tracking.finish_run(opening.result(), "KILLED", "interrupted by the user (Ctrl-C)")
            raise
        except BaseException as error:  # the run must never be left RUNNING
            run_id = opening.result()  # (if the run could not even be opened, that error surfaces here)
            tracking.finish_run(run_id, "FAILED", "".join(traceback.format_exception(error)))
            if isinstance(error, (BadInput, JobFailed)):
                raise
            raise JobFailed(f"training failed: {error}; the MLflow run {run_id} is marked FAILED and "
                            f"checkpoints stay under {settings.storage_path(spec.storage_path)}") from error
    return {
        "run_id": run_id,
        "experiment": spec.experiment,
        "metrics": final["test"],
        "best_epoch": final["best_epoch"],
        "epochs_run": final["epochs_run"],
        "stopped_early": final["stopped_early"],
        "checkpoint": result.checkpoint.path,
        "timings": timings,
        **outcome,
    }
