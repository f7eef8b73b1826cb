"""`kind: train`: a supervised job on Ray Train. Run one with `deepyard run jobs/quickstart.yaml`.

Driver: check the spec against the data (before Ray starts) -> open the MLflow run -> ``fit`` -> log
plots and the model, register a version. ``fit`` runs a one-worker job as a single Tune trial (one
process: no Ray Train controller and worker group to start, ~7-14 s of each job on a laptop) and a
data-parallel one on a TorchTrainer; either way the worker runs the plain PyTorch loop ``fit_loop``,
and Ray appears only at the edges marked [1] to [4] (``runners/edges.py``).
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from deepyard import drivers, settings, stops, tracking, transfer
from deepyard.compress import hooks as compress_hooks
from deepyard.data import Splits, attach_streams, streaming
from deepyard.data.augment import random_affine
from deepyard.robust.training import Adversary
from deepyard.errors import BadInput, JobFailed
from deepyard.optim import make_schedule, restore
from deepyard.runners import checkpoints
from deepyard.runners.loop import EarlyStopping, Selection, reduce_sum, train_step
from deepyard.runners.setup import (EVAL_BATCH, batch_size, build, check_sizes, eval_loader, load_data, make_optimizer,
                                    monitored, preflight, serving_metadata, train_loader)
from deepyard.runners.summary import RunOptions, RunSummary
from deepyard.spec import TrainJob
from deepyard.spec.train import StreamSpec
from deepyard.tasks.base import evaluate_sums


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """A TorchTrainer worker: the loop, with Ray Train at its edges."""
    from deepyard.runners.edges import TrainWorker

    fit_loop(config, TrainWorker())


def train_in_trial(_: dict[str, Any], config: dict[str, Any], splits: Splits) -> None:
    """A whole one-worker job in one Tune trial: the loop, with Tune at its edges, on the splits the
    driver's preflight loaded (through Ray's object store: ~1 s less of a Fashion-MNIST job's start)."""
    from deepyard.runners.edges import TuneTrial

    fit_loop(config, TuneTrial(config["spec"]["scaling"]["use_gpu"], whole_run=True), splits.writable())


def fit_loop(config: dict[str, Any], edges, splits: Splits | None = None) -> dict[str, Any] | None:
    """The training loop; Ray appears only at the ``edges`` [1]-[4] (``runners.edges``). ``splits``:
    the job's data, when the caller has it; otherwise the worker loads it.

    Returns, on rank 0, the best epoch's monitored value and tie-breaker (None elsewhere)."""
    spec = TrainJob.model_validate(config["spec"])
    rank, world, device = edges.rank, edges.world, edges.device
    timings = _Timings(config.get("fit_started_at"))
    # Rank 0's epoch metrics reach the job's MLflow run off the training path (``edges.metrics_log``).
    # A logger of its own starts first: importing MLflow beside the first epoch held the GIL the loop
    # needs (epoch 1 at half speed, ~3 s lost); beside loading data and building the model it costs less.
    log = edges.metrics_log(config) if rank == 0 else None
    torch.manual_seed(spec.train.seed)
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))  # intra-op threads = the CPUs Ray gave us
    if splits is None:  # every worker builds the same deterministic splits locally (a streaming job's come along)
        splits = config["splits"] if config.get("splits") is not None else load_data(spec, config.get("tracking_uri"))
    model, task = build(spec, splits)
    freezer = transfer.start_from(spec.init, model.net, config.get("tracking_uri"))[0] if spec.init else None
    if method := compress_hooks.for_config(config.get("compress")):  # a compress stage: prune or distil
        splits, task = method.prepare(model, splits, task, config.get("tracking_uri"))
    if not task.data_parallel and world > 1:  # (a sweep may set num_workers past preflight's check)
        raise BadInput(f"scaling.num_workers: {spec.model.name} trains on one worker; its {task.name} steps "
                       "are not data-parallel yet")
    use_amp = spec.scaling.use_gpu and spec.scaling.mixed_precision
    augment = spec.data.augment if splits.is_image else None
    adversary = Adversary(spec.train.adversarial, splits, task, device) if spec.train.adversarial else None
    redraw = getattr(task, "training_batch", None)  # a task that redraws its training inputs (masked LM)

    if splits.streaming:  # [1] Ray Data's batches: this worker's share of the train and val splits
        stream = spec.data.stream or StreamSpec()
        batches = edges.stream(splits, "train", batch_size(spec, splits), training=True, seed=spec.train.seed + rank,
                               shuffle_buffer=stream.shuffle_buffer if stream.shuffle == "local" else None,
                               prefetch_batches=stream.prefetch_batches)
        val_loader = edges.stream(splits, "val", EVAL_BATCH)
    else:
        batches = edges.shard(train_loader(spec, splits, rank, world))  # [1]
        val_shard = slice(rank, None, world)  # every worker scores its own slice; sums are all-reduced
        val_loader = eval_loader(splits.x_val[val_shard], splits.y_val[val_shard], device)

    if freezer:
        freezer.set_epoch(1)  # before DDP: it registers only the parameters that train
    model = edges.wrap(model)  # [2]
    if world > 1:  # each rank its own dropout, masks and augmentations (the weights are rank 0's, broadcast)
        torch.manual_seed(spec.train.seed + rank)
    plain_model = getattr(model, "module", model)
    optimizer = make_optimizer(spec, plain_model.net)
    steps_per_epoch = len(batches)
    schedule = spec.optim.schedule
    scheduler = make_schedule(optimizer, name=schedule.name, total_steps=steps_per_epoch * spec.train.epochs,
                              steps_per_epoch=steps_per_epoch, warmup_epochs=schedule.warmup_epochs,
                              step_size=schedule.step_size, gamma=schedule.gamma)
    selection = Selection(*monitored(spec.checkpoint.metric, spec.checkpoint.mode, task), task.tie_breaker)
    stop_spec = spec.train.early_stopping
    stopper = EarlyStopping(*monitored(stop_spec.metric, stop_spec.mode, task), stop_spec.patience,
                            stop_spec.min_delta, task.tie_breaker) if stop_spec else None
    best = {"value": None, "tie": None, "epoch": 0, "weights": checkpoints.cpu_copy(plain_model.state_dict())}

    start_epoch, stop, history = 1, False, []  # history: every epoch's metric line, in the checkpoints
    if (resumed := edges.checkpoint()) is not None:  # [3]
        with resumed.as_directory() as directory:
            state = checkpoints.load(directory)
            if "test" in state:  # the job had finished: hand its final checkpoint back
                edges.report(selection.final_report(state["best_value"], state.get("best_tie"), state["epochs_run"]),
                             directory if rank == 0 else None)
                return {"value": state["best_value"], "tie": state.get("best_tie")} if rank == 0 else None
        stop = state.get("stopped", False)
        plain_model.load_state_dict(state["model"])
        restore(optimizer, scheduler, state["optimizer"], state["scheduler"])  # this spec's hyperparameters
        best = {"tie": None, **state["best"]}
        if stopper and state.get("stopper"):
            stopper.load_state_dict(state["stopper"])
        start_epoch, history = state["epoch"] + 1, state.get("history", [])

    # A sweep trial's numeric values, per epoch: under PBT they change as the trial goes.
    hyperparameters = {f"hp/{path}": float(value) for path, value in config.get("trial_values", {}).items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}
    logged_up_to = 0
    if log and start_epoch > 1:
        # (with the values it goes on with: PBT may have changed them, even after the last epoch)
        log({"resumed_from_epoch": start_epoch - 1, **hyperparameters}, start_epoch - 1)
        # Epochs logged after the newest checkpoint (the job stopped before it was saved) are
        # trained again, but logged once: their first values stand.
        logged_up_to = log.after_restore(history)

    timings.lap("trial_setup_s")
    epoch = start_epoch - 1
    for epoch in range(start_epoch, spec.train.epochs + 1 if not stop else start_epoch):
        if hasattr(batches.sampler, "set_epoch"):
            batches.sampler.set_epoch(epoch)
        if freezer and freezer.set_epoch(epoch) and world > 1:
            model = edges.wrap(plain_model)  # DDP again, over the parameters that train now
        model.train()
        if freezer:
            freezer.hold_norms()
        sums, started = None, time.perf_counter()
        for inputs, targets in batches:
            if redraw:
                inputs, targets = redraw(inputs, targets)
            if augment:
                inputs = random_affine(inputs, augment.max_shift, augment.max_rotation_deg)
            if adversary:
                inputs = adversary.perturb(plain_model, inputs, targets)
            if hasattr(task, "train_step"):  # a task with steps of its own (a GAN's alternating ones)
                batch = task.train_step(model, optimizer, scheduler, inputs, targets,
                                        use_amp=use_amp, grad_clip=spec.train.grad_clip)
            else:
                batch = train_step(model, task, optimizer, scheduler, inputs, targets,
                                   use_amp=use_amp, grad_clip=spec.train.grad_clip)
            sums = batch if sums is None else sums + batch
        train_seconds = time.perf_counter() - started
        scoring = time.perf_counter()
        train_sums = reduce_sum(sums, device)
        metrics = {**task.metrics(train_sums, "train"),
                   **task.metrics(reduce_sum(evaluate_sums(plain_model, val_loader, task, device), device), "val"),
                   **_throughput(float(train_sums[-1]), train_seconds, task, splits),  # summed over workers
                   **task.epoch_metrics(plain_model, splits, spec.train.seed),
                   "lr": optimizer.param_groups[0]["lr"], "epoch": epoch}
        timings.add("validation_s", time.perf_counter() - scoring)
        if selection.improved(metrics, best):
            best = {**selection.of(metrics), "epoch": epoch, "weights": checkpoints.cpu_copy(plain_model.state_dict())}
        stop = bool(stopper and stopper.update(metrics))
        line = {key: float(value) for key, value in {**metrics, **hyperparameters}.items()}
        history.append([epoch, line])
        if log and epoch > logged_up_to:
            log(line, epoch)
            log.flush()  # a scheduler may stop this trial at the report: its epochs are in MLflow first
            _log_epoch_artifacts(config, task, plain_model, splits, epoch)

        state = None
        if epoch % spec.checkpoint.every_n_epochs == 0 and rank == 0:
            state = {"model": plain_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "best": best, "epoch": epoch,
                     "stopper": stopper.state_dict() if stopper else None, "stopped": stop, "history": history}
        with checkpoints.staged(state) as directory:
            edges.report(selection.epoch_report(metrics), directory)  # [4] rank 0 persists the checkpoint
        if stop:
            break

    # The best epoch's weights, scored once on the held-out test split, go into the final checkpoint.
    # (No epoch ever scored, e.g. NaN from the start: rank it last.)
    best_value = best["value"] if best["value"] is not None else selection.worst
    final = None
    if rank == 0:
        plain_model.load_state_dict(best["weights"])
        if method:
            method.finish(plain_model)
            best["weights"] = checkpoints.cpu_copy(plain_model.state_dict())  # pruning masks folded in
        timings.lap("epochs_s")
        test_loader = (edges.stream(splits, "test", EVAL_BATCH) if splits.streaming
                       else eval_loader(splits.x_test, splits.y_test, device))
        test, details = task.test_metrics(plain_model, test_loader, device, splits, spec.train.seed)
        timings.lap("test_s")
        final = {"model": best["weights"], "best_epoch": best["epoch"], "best_value": best_value,
                 "best_tie": best["tie"], "epochs_run": epoch, "stopped_early": stop, "test": test, "task": task.name,
                 "example": task.input_example(plain_model, splits), "timings": timings.seconds,
                 "peak_rss_mb": _peak_rss_mb(), **details}
        log({**test, "best_epoch": best["epoch"]}, epoch)
        final["failed_metric_writes"] = log.close()  # waits until every metric is written
    with checkpoints.staged(final) as directory:
        edges.report(selection.final_report(best_value, best["tie"], epoch), directory)
    return {"value": best_value, "tie": best["tie"]} if rank == 0 else None


class _Timings:
    """Where rank 0's time went, in seconds, for the run's summary: from the driver's fit() to this
    loop (Tune or Ray Train setting up, the worker's process starting, its imports; ``fit_started_at``,
    the driver's clock), the setup before the first epoch (data, model, optimizer), the epochs
    (``validation_s``: the part of them spent scoring), the test split."""

    def __init__(self, fit_started_at: float | None) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()
        if fit_started_at is not None:
            self.seconds["trial_start_s"] = max(0.0, time.time() - fit_started_at)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._mark
        self._mark = now

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def _peak_rss_mb() -> float:
    """The most memory this (rank 0's) process has held: a streaming job's stays flat as the data grows."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (kilobytes on Linux)


def _log_epoch_artifacts(config: dict[str, Any], task, model, splits: Splits, epoch: int) -> None:
    """The task's samples of this epoch (texts, image grids): a nicety that must never stop training."""
    try:
        artifacts = task.epoch_artifacts(model, splits, epoch)
        run_id = _job_run_id(config) if artifacts else None
    except Exception as error:
        print(f"could not make or log epoch {epoch}'s samples: {error}")
        return
    if artifacts and run_id is None:
        print(f"epoch {epoch}'s samples are not logged: the job's MLflow run did not open")
        return
    tracking.log_outputs(run_id, artifacts, config["tracking_uri"], strict=False)


def _job_run_id(config: dict[str, Any], wait_s: float = 30.0) -> str | None:
    """The job's MLflow run id: given, or found by its checkpoints key (a one-worker job's trial
    starts while the driver still opens the run: waits up to ``wait_s`` for it once, then None)."""
    deadline = time.monotonic() + wait_s
    while config.get("run_id") is None and not config.get("run_not_found"):
        found = tracking.latest_run(config["experiment"], None, {CHECKPOINTS_TAG: config["run_key"]},
                                    config["tracking_uri"])
        config["run_id"] = found.info.run_id if found else None
        if config["run_id"] is None:
            config["run_not_found"] = time.monotonic() > deadline  # (the driver stops the job if it failed)
            time.sleep(0.2)
    return config["run_id"]


def _throughput(count: float, seconds: float, task, splits: Splits) -> dict[str, float]:
    """Samples per second. A task's sums count the targets it scores: one per sample, or one per
    token (a language model, which gets tokens per second too) or per step ahead (a forecast)."""
    samples = count / task.targets_per_sample(splits)
    rates = {"samples_per_s": samples / seconds, "train_samples": samples}
    return {**rates, f"{task.target_unit}_per_s": count / seconds} if task.target_unit else rates


CHECKPOINTS_TAG = "deepyard.checkpoints"  # a train run's tag: the key of its checkpoints' folder


def key_of(run_id: str) -> str:
    """The checkpoints' key of a run without the tag (runs from before 2026-12-05, a sweep's trials,
    a compress stage's): its id's first 8 characters."""
    return run_id[:8]


@dataclass(frozen=True)
class TrainRun:
    """The MLflow run a train job logs to, as ``fit`` needs it: ``key`` names its checkpoints'
    folder from the start; ``opening`` gives the run id once MLflow has opened the run, so that a
    one-worker job's trial process starts meanwhile (~1.5 s of a job on a running cluster)."""

    key: str
    opening: Future

    @property
    def id(self) -> str:
        return self.opening.result()

    def id_if_open(self) -> str | None:
        return self.opening.result() if self.opening.done() else None

    @classmethod
    def opened(cls, run_id: str, key: str | None = None) -> "TrainRun":
        """A run whose id is known (a resumed one, a compress stage's: named after its id, as ever)."""
        done: Future = Future()
        done.set_result(run_id)
        return cls(key or key_of(run_id), done)


def fit(spec: TrainJob, run: TrainRun, selection: Selection, splits,
        compress: dict[str, Any] | None = None, while_training=None):
    """Train the job; returns Ray's result (``checkpoint``, ``best_checkpoints``, ``error``, ``path``).

    One worker: a single Tune trial on ``splits`` (the driver's ``Splits``, or a reference to them
    in Ray's object store), with the same checkpoints kept, restarts after a crash and --resume; it
    starts without waiting for the MLflow run. More: a TorchTrainer (DDP) whose workers each load
    the data. ``compress``: a compress stage's method settings (``compress/hooks.py``).
    ``while_training``: work for the idle driver, done by the time fit returns."""
    if spec.scaling.num_workers > 1:
        side_work = _in_background(while_training)
        result = make_trainer(spec, run.id, selection, compress=compress, key=run.key,
                              splits=splits if getattr(splits, "streaming", False) else None).fit()
        if side_work is not None:
            side_work.join()
        return result
    from ray import tune

    from deepyard import cluster
    from deepyard.runners.edges import driver_logs

    cluster.quiet_tune()
    resources = {"cpu": spec.scaling.cpus_per_worker, "gpu": int(spec.scaling.use_gpu)}
    config = {**_loop_config(spec, run.id_if_open(), compress), "run_key": run.key}
    trainable = tune.with_resources(tune.with_parameters(train_in_trial, config=config, splits=splits), resources)
    tuner = tune.Tuner(trainable, run_config=tune.RunConfig(
        name=trainer_name(spec, run.key), storage_path=settings.storage_path(spec.storage_path), verbose=0,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.checkpoint.keep,
                                                checkpoint_score_attribute=Selection.SCORE,
                                                checkpoint_score_order=selection.mode),
        failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
        callbacks=[logger := driver_logs(run.opening),
                   side_work := _when_the_trial_starts(while_training), *cluster.tune_callbacks()]))
    with stops.safe_points():
        result = tuner.fit()[0]
    side_work.join()  # (not when fit raises, on a stop: the thread is a daemon, and nothing waits on it)
    if logger.failed:
        warnings.warn(f"{logger.failed} metric lines could not be written to MLflow run {run.id} (said above)")
    return result


def _when_the_trial_starts(work):
    """A Tune callback that runs ``work`` in a thread of the driver from the moment Tune starts the
    trial's process (``join()`` waits for it): before that the driver sets the trial up, and work
    beside it slowed that down (the GIL; ~0.6 s of a job's start)."""
    from ray.tune import Callback

    class Start(Callback):
        def __init__(self) -> None:
            self.thread: threading.Thread | None = None

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            if self.thread is None:
                self.thread = _in_background(work)

        def join(self) -> None:
            if self.thread is not None:
                self.thread.join()

    return Start()


def _in_background(work) -> threading.Thread | None:
    if work is None:
        return None
    thread = threading.Thread(target=_quietly, args=(work,), name="deepyard-side-work", daemon=True)
    thread.start()
    return thread


def _quietly(work) -> None:
    try:
        work()
    except Exception:  # (a head start only: what it prepared is done again, and fails loudly, when needed)
        pass


def _loop_config(spec: TrainJob, run_id: str | None, compress: dict[str, Any] | None) -> dict[str, Any]:
    return {"spec": spec.model_dump(mode="json"), "run_id": run_id, "experiment": spec.experiment,
            "tracking_uri": tracking.tracking_uri(),
            "compress": compress, "fit_started_at": time.time()}


def make_trainer(spec: TrainJob, run_id: str, selection: Selection, callbacks: list | None = None,
                 compress: dict[str, Any] | None = None, splits=None, key: str | None = None):
    """A data-parallel job (or a sweep's multi-worker trial) on Ray Train. ``splits``: a streaming
    job's (``StreamSplits``): Ray Train hands each worker its share of their Ray Datasets. ``key``
    names the checkpoints' folder (default: ``key_of(run_id)``)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    from deepyard.runners.edges import SPLIT_BETWEEN_WORKERS

    streams = {"datasets": splits.streams, "dataset_config": DataConfig(datasets_to_split=list(SPLIT_BETWEEN_WORKERS))
               } if splits is not None else {}
    return _trainer_class()(
        train_loop_per_worker,
        train_loop_config={**_loop_config(spec, run_id, compress),
                           **({"splits": splits.shipped()} if splits is not None else {})},
        **streams,
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=trainer_name(spec, key or key_of(run_id)),
            storage_path=settings.storage_path(spec.storage_path),
            # The best K by the validation metric (ties broken as the loop breaks them); Ray always
            # keeps the latest too (recovery).
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep,
                                               checkpoint_score_attribute=Selection.SCORE,
                                               checkpoint_score_order=selection.mode),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            callbacks=callbacks,
        ),
    )


@functools.cache
def _trainer_class():
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        """A TorchTrainer that leaves Ctrl-C to deepyard. Ray's own SIGINT handler aborts the run
        and then exits 1 from inside ``ray.get``: the run was marked FAILED and the command exited
        1. Here Ctrl-C raises KeyboardInterrupt as everywhere else (run KILLED, exit 130); the
        controller is told to stop its workers, and every checkpoint stays. A second Ctrl-C while
        it stops them stops at once."""

        _controller = None

        def _register_sigint_handler(self, controller) -> None:
            self._controller = controller

        def fit(self):
            try:
                return super().fit()
            except KeyboardInterrupt:
                if self._controller is not None:
                    import ray

                    try:
                        ray.get(self._controller.abort.remote(), timeout=30)
                    except (ray.exceptions.RayError, TimeoutError):
                        pass  # the controller is gone already: its workers go with it
                raise

    return Trainer


def final_state(result) -> dict[str, Any]:
    if result.checkpoint is None:
        raise JobFailed("training finished without a final checkpoint")
    with result.checkpoint.as_directory() as directory:
        return checkpoints.load(directory)


def log_outcome(spec: TrainJob, splits: Splits, run_id: str, final: dict[str, Any], *,
                registered_name: str | None, pipeline: torch.nn.Module | None = None) -> dict[str, Any]:
    """Plots, the serving model (preprocessing and output head included) and, under
    ``registered_name`` (None: not registered), a new registered version. ``pipeline``: the network
    the weights fit, where it is not the spec's (units removed by structured pruning)."""
    from deepyard import plots  # matplotlib: the driver needs it, the workers never do

    built, task = build(spec, splits)
    pipeline = pipeline if pipeline is not None else built
    history = {f"{split}_{name}": tracking.metric_history(run_id, f"{split}_{name}")
               for split in ("train", "val") for name in task.directions}  # only what this task logs
    artifacts = {"plots/learning_curves.png": plots.learning_curves({k: v for k, v in history.items() if v})}
    pipeline.load_state_dict(final["model"])
    serving = task.serving_module(pipeline)
    scores, more = task.outcome(serving, splits, final)
    tracking.log_outputs(run_id, {**artifacts, **more})
    if scores:
        final["test"].update(scores)
        tracking.log_metrics(run_id, scores, final["epochs_run"])
    metadata = serving_metadata(spec, splits, task, pipeline)
    log_weights(run_id, spec, pipeline)
    tags = {f"metric.{k}": f"{v:.6g}" for k, v in final["test"].items()}
    lineage = {"init_from": spec.init.from_} if spec.init else {}
    logged = tracking.log_model(run_id, serving, final["example"].numpy(), registered_name=registered_name,
                                metadata=metadata, version_tags={**tags, **lineage, "run_id": run_id})
    if spec.fairness:
        from deepyard.runners.fairness import log_fairness

        logged.update(log_fairness(spec, splits, run_id, serving, metadata, logged))
    if spec.explain:
        try:  # (the version is registered: pictures that cannot be made must not fail the job)
            log_explanations(run_id, spec.explain, serving, metadata, splits.x_test[:spec.explain.examples])
        except Exception as error:
            print(f"explain: no pictures logged: {type(error).__name__}: {error}")
    return logged


def log_explanations(run_id: str, options, serving: torch.nn.Module, metadata: dict[str, Any], inputs) -> None:
    """The job's ``explain:``: pictures and attributions of the first test examples, in the run."""
    import json
    import tempfile

    from deepyard.explain.attributions import Explainer
    from deepyard.explain.local import write_pictures

    name = metadata["job"]
    explanations = Explainer(serving.eval(), metadata, name).explain(inputs, options)
    with tempfile.TemporaryDirectory(prefix="deepyard-explain-") as directory:
        write_pictures(inputs, explanations, metadata, Path(directory), name)
        (Path(directory) / "explanations.json").write_text(json.dumps(explanations))
        tracking.log_artifacts(run_id, directory, "explanations")


def log_weights(run_id: str, spec: TrainJob, pipeline: torch.nn.Module) -> None:
    """The network's tensors and the spec that builds it: what a transfer or compress job starts from."""
    import tempfile

    from deepyard.spec import to_yaml

    with tempfile.TemporaryDirectory(prefix="deepyard-weights-") as directory:
        torch.save(checkpoints.cpu_copy(pipeline.state_dict()), Path(directory) / Path(transfer.WEIGHTS_ARTIFACT).name)
        (Path(directory) / Path(transfer.SPEC_ARTIFACT).name).write_text(to_yaml(spec))
        tracking.log_artifacts(run_id, directory, str(Path(transfer.WEIGHTS_ARTIFACT).parent))


def promote(model_name: str, version: str, options, metric: str, mode: str) -> dict[str, Any]:
    """Move the alias to ``version``, only if it beats the holder on the test twin of ``metric``."""
    return tracking.promote(model_name, version, options.alias, only_if_better=options.only_if_better,
                            metric="test_" + metric.removeprefix("val_"), mode=mode)


def check(spec: TrainJob) -> str:
    """What `deepyard validate` prints: the data's splits and shapes, and the model, once checked."""
    splits, _ = preflight(spec)
    return describe(spec, splits)


def describe(spec: TrainJob, splits: Splits) -> str:
    line = (f"data={spec.data.name} ({splits.size('train')} train / {splits.size('val')} val / "
            f"{splits.size('test')} test, input {splits.in_shape}{', streamed by Ray Data' if splits.streaming else ''}"
            f") model={spec.model.name}")
    if splits.table:
        from deepyard.data.tables import TableSchema

        line += "\ncolumns (fitted on the training split):\n  " + "\n  ".join(TableSchema.from_dict(splits.table)
                                                                              .describe())
    if splits.sensitive:
        line += f"\nsensitive (groups for fairness, not features): {', '.join(splits.sensitive)}"
    if spec.init:
        model, _ = build(spec, splits)
        line += "\n" + transfer.start_from(spec.init, model.net)[1]
        if splits.is_text and transfer.source_vocabulary(spec.init.from_):
            line += "\n" + inherited_vocabulary(spec, splits)
    return line


def inherited_vocabulary(spec: TrainJob, splits: Splits) -> str:
    """A pretrained model's vocabulary, extended by this job's own tokens, and its <unk> share."""
    from deepyard.data.splits import PAD, UNK

    def unknown(ids: np.ndarray) -> str:
        real = ids[ids != PAD]
        return f"{np.mean(real == UNK):.1%}" if real.size else "0%"

    inherited = len(transfer.source_vocabulary(spec.init.from_)[0])
    line = (f"vocabulary: {spec.init.from_}'s {inherited:,} tokens and {len(splits.vocab) - inherited:,} of this "
            f"data's own (new embeddings); {unknown(splits.x_train)} of the training inputs' tokens are <unk>")
    if splits.y_train.dtype.kind == "i" and splits.y_train.ndim == 2:  # (token targets)
        line += f", {unknown(splits.y_train)} of the targets'"
    return line


class Interrupted(NamedTuple):
    run_id: str
    key: str  # of its checkpoints' folder


def interrupted_run(spec: TrainJob) -> Interrupted:
    """The newest run of this job, if it was stopped (Ctrl-C, SIGTERM, a dead driver) or failed and
    left a checkpoint, and ran this same spec; else BadInput."""
    from deepyard.spec import flatten

    tracking.close_orphans(spec.experiment)  # a driver killed outright left its run RUNNING
    last = tracking.latest_run(spec.experiment, spec.name, {"deepyard.kind": spec.kind})
    if last is None:
        raise BadInput(f"--resume: no earlier run of {spec.name!r} in experiment {spec.experiment!r}; "
                       "run it without --resume")
    run_id, status = last.info.run_id, last.info.status
    if status == "FINISHED":
        raise BadInput(f"--resume: the last run of {spec.name!r} ({run_id}) finished; nothing to resume "
                       "(run it without --resume to train anew)")
    if status == "RUNNING":
        driver = last.data.tags.get(drivers.TAG, "")
        raise BadInput(f"--resume: the last run of {spec.name!r} ({run_id}) is still running"
                       f"{' (' + drivers.describe(driver) + ')' if driver else ''}; stop it first")
    key = last.data.tags.get(CHECKPOINTS_TAG) or key_of(run_id)
    folder = Path(settings.storage_path(spec.storage_path)) / trainer_name(spec, key)
    if "://" not in str(folder) and not checkpoints.saved_any(folder):
        raise BadInput(f"--resume: the {status} run {run_id} saved no checkpoint in {folder}; run it without "
                       "--resume")
    # The checkpoint holds this spec's model and optimizer: another spec would not load, or would
    # silently train something else. (The source of init.from mattered only at the first epoch.)
    then, now = last.data.params, flatten(spec)
    changed = [key for key in sorted(set(then) | set(now)) if not key.startswith("init.from")
               and then.get(key) != (now[key][:6000] if key in now else None)]
    if changed:
        shown = "; ".join(f"{key}: {then.get(key)} -> {now.get(key)}" for key in changed[:5])
        raise BadInput(f"--resume: the spec changed since run {run_id} ({shown}); resume with the spec it ran "
                       "with, or run without --resume")
    return Interrupted(run_id, key)


def trainer_name(spec: TrainJob, key: str) -> str:
    """Ray's name for the job's checkpoints' folder: the run's key (its tag) finds them again on --resume."""
    return f"{spec.name}-{key}"


def run(spec: TrainJob, options: RunOptions) -> RunSummary:
    """Run the job to the end; returns the ids, final test metrics and model URIs. With ``resume``,
    the last interrupted run goes on from its newest complete checkpoint, in the same MLflow run."""
    from deepyard import cluster, progress

    splits, task = preflight(spec)
    resumed = interrupted_run(spec) if options.resume else None
    key = resumed.key if resumed else uuid.uuid4().hex[:8]
    spec = transfer.pinned_spec(spec)  # every worker copies the version the alias points at now
    selection = Selection(*monitored(spec.checkpoint.metric, spec.checkpoint.mode, task), task.tie_breaker)
    storage = settings.storage_path(spec.storage_path)
    lineage = {"deepyard.init_from": spec.init.from_} if spec.init else {}
    with tracking.job_run(spec, tags={"deepyard.task": task.name, CHECKPOINTS_TAG: key, **lineage},
                          reopen=resumed.run_id if resumed else None,
                          failure="training failed", failure_hint=lambda: f" and checkpoints stay under {storage}",
                          killed_note="interrupted (Ctrl-C, SIGTERM or SIGHUP); continue with "
                                      "`deepyard run SPEC --resume`") as run:
        # Opening the MLflow run (~2 s on a new sqlite store) overlaps Ray's start-up (~4 s) and, on
        # a running cluster, the trial's start. A one-worker job is a Tune trial: no Ray Train worker
        # group, whose cleanup needs the dashboard.
        with cluster.connected(options.address, options.ray_logs, stop_behind=True,
                               dashboard=spec.scaling.num_workers > 1):
            run.mark("ray_connect")
            if splits.streaming:  # Ray Data reads the files from here on; the training split's statistics first
                waiting = streaming.check_resources(spec.scaling.footprint()["CPU"])
                if waiting and options.console:
                    options.console.print(f"[yellow]waiting for CPUs[/]: {waiting}", highlight=False)
                attach_streams(splits, spec.data.stream or StreamSpec(), spec.train.seed)
                check_sizes(spec, splits)  # (a streamed table's, counted by that pass)
                run.mark("data_stats")
            run.mark("startup")
            # (a resumed run's id is known: its trial need not look it up, and an old one has no key tag)
            job = TrainRun.opened(resumed.run_id, resumed.key) if resumed else TrainRun(key, run.opening)
            with progress.watch(lambda: job.id, spec.train.epochs, options.console):
                result = fit(spec, job, selection, splits, while_training=tracking.preload)
            run.timings["fit_s"] = run.elapsed() - run.timings["startup_s"]
        run_id = run.id
        run.timings["mlflow_start_s"] = run.opened_after
        if getattr(result, "error", None):
            raise result.error
        final = final_state(result)
        run.timings.update(final.get("timings", {}))  # (a checkpoint from before they were kept has none)
        checkpoints.tidy(result)
        outcome = log_outcome(spec, splits, run_id, final,
                              registered_name=spec.model_name if spec.register.enabled else None)
        if spec.promote and outcome.get("model_version"):
            outcome["promotion"] = promote(spec.model_name, outcome["model_version"], spec.promote,
                                           selection.metric, selection.mode)
        run.mark("total")
    return RunSummary(run_id=run_id, experiment=spec.experiment, metrics=final["test"], timings=run.timings,
                      details={"best_epoch": final["best_epoch"], "epochs_run": final["epochs_run"],
                               "stopped_early": final["stopped_early"], "checkpoint": result.checkpoint.path,
                               "worker_peak_rss_mb": final.get("peak_rss_mb"),
                               **outcome})
