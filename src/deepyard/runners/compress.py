"""`kind: compress`: a registered model made smaller. Run one with `deepyard run jobs/digits_cnn_prune.yaml`.

Driver: the parent from the registry -> its data, split as it was -> the parent scored and measured
-> each stage: prune and distil fine-tune in a Ray Train job (``train.fit_loop`` with the method's
hook, one child run per stage), quantize converts on the driver -> each result scored and measured
beside the parent, registered with its tags -> the accuracy-vs-size plot in the job's run.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch

from deepyard import tracking
from deepyard.compress import measure
from deepyard.compress.parent import Parent, load_parent, rebuild
from deepyard.errors import BadInput
from deepyard.runners import checkpoints
from deepyard.runners.setup import build, eval_loader, in_memory, load_data, monitored, preflight, split_seed
from deepyard.runners.summary import RunOptions, RunSummary
from deepyard.spec import CompressJob, TrainJob, flatten, to_yaml

SUFFIX = {"prune": "pruned", "quantize": "int8", "distill": "distilled"}


@dataclass
class Checked:
    parent: Parent
    splits: Any
    pipeline: torch.nn.Module  # the parent's, weights loaded
    task: Any
    metric: str  # the test metric versions are compared on (the parent task's monitor)
    lines: list[str]

    @functools.cached_property
    def stored_splits(self):
        """The splits in Ray's object store, put once for every stage's trial: Tune holds each
        reference it is given until Ray shuts down."""
        import ray

        return ray.put(self.splits)


@dataclass
class Produced:
    label: str
    pipeline: torch.nn.Module  # scored on the test split: outputs logits (or standardized values)
    test: dict[str, float]
    outcome: dict[str, Any]  # model_version, model_uri...
    extra_tags: dict[str, str]
    run_id: str


def registered_name(spec: CompressJob, parent: Parent) -> str:
    return spec.register.model_name or f"{parent.name}-{SUFFIX[spec.method.name]}"


def stage_spec(spec: CompressJob, parent: Parent, label: str, *, init_from: str | None,
               model: dict | None = None, augment: bool = True) -> TrainJob:
    """The train job of one fine-tuning stage: the parent's data split as the parent's was, the
    compress job's optimizer, epochs and scaling, nothing registered by the stage itself."""
    document = parent.spec.model_dump(mode="json")
    document.update(name=f"{spec.name}-{label}", description=f"{spec.method.name} {label} of {parent.ref}",
                    tracking={"experiment": spec.experiment}, storage_path=spec.storage_path,
                    init={"from": init_from} if init_from else None, optim=spec.optim.model_dump(mode="json"),
                    train=spec.train.model_dump(mode="json"), scaling=spec.scaling.model_dump(mode="json"),
                    failure=spec.failure.model_dump(mode="json"), register={"enabled": False}, promote=None)
    document["data"]["seed"] = split_seed(parent.spec)
    if document.get("fairness"):  # measured for the compressed model too; mitigated only by its own job
        document["fairness"]["mitigation"] = None
    if model is not None:
        document["model"] = model
    if not augment:  # a distillation's targets are the teacher's outputs on the images as they are
        document["data"]["augment"] = None
    return TrainJob.model_validate(document)


# ---- checks: before Ray starts, exit 2 -----------------------------------------------------------

def _check_prune(spec: CompressJob, checked: Checked) -> list[str]:
    from deepyard.compress.prune import prunable

    if not prunable(checked.pipeline.net):
        raise BadInput(f"method prune: {checked.parent.ref} has no Conv or Linear layer to prune")
    if spec.method.structured:
        from deepyard.compress.structured import check_structured

        check_structured(checked.pipeline, checked.splits)
    preflight(stage_spec(spec, checked.parent, "check", init_from=checked.parent.ref))
    kind = "structured (units removed)" if spec.method.structured else "global magnitude"
    return [f"prune: {kind} at {', '.join(f'{s:.0%}' for s in spec.method.sparsities)}, "
            f"{spec.train.epochs} fine-tuning epochs each"]


def _check_quantize(spec: CompressJob, checked: Checked) -> list[str]:
    from deepyard.compress.quantize import RECURRENT, quantizable

    if spec.method.mode == "static":
        if any(isinstance(module, RECURRENT) for module in checked.pipeline.modules()):
            raise BadInput(f"method quantize, mode static: {checked.parent.ref} is recurrent; use mode: dynamic "
                           "(int8 LSTM/GRU weights)")
        _quantized(spec, checked, calibration=checked.splits.x_train[:8])  # it converts and traces, or exit 2
        return [f"quantize: static int8 of every layer, calibrated on {spec.method.calibration_samples} "
                "training inputs"]
    layers = quantizable(checked.pipeline.net)
    if not layers:
        raise BadInput(f"method quantize: {checked.parent.ref} has no Linear or LSTM/GRU layer for dynamic int8 "
                       "(a CNN's convolutions stay float: prune or distil it instead)")
    shown = ", ".join(layers[:4]) + ("..." if len(layers) > 4 else "")
    return [f"quantize: dynamic int8 of {len(layers)} layers ({shown})"]


def _check_distill(spec: CompressJob, checked: Checked) -> list[str]:
    from deepyard.tasks.classification import Classification

    if not isinstance(checked.task, Classification):
        raise BadInput(f"method distill: the teacher {checked.parent.ref} is a {checked.task.name} model; "
                       "distillation learns a classifier's softened outputs")
    student = stage_spec(spec, checked.parent, "check", init_from=None,
                         model=spec.method.student.model_dump(mode="json"), augment=False)
    preflight(student)
    probe = torch.from_numpy(checked.splits.x_train[:2])
    with torch.inference_mode():
        model, _ = build(student, checked.splits)
        ours, theirs = model.eval()(probe).shape, checked.pipeline(probe).shape
    if ours != theirs:
        raise BadInput(f"method.student: its outputs are {tuple(ours)} but the teacher's are {tuple(theirs)}")
    teacher_params = measure.parameters(checked.pipeline)
    return [f"distill: student {spec.method.student.name} ({measure.parameters(model):,} parameters) from teacher "
            f"{checked.parent.ref} ({teacher_params:,}), T={spec.method.temperature}, alpha={spec.method.alpha}"]


CHECKS: dict[str, Callable[[CompressJob, Checked], list[str]]] = {
    "prune": _check_prune, "quantize": _check_quantize, "distill": _check_distill}


def _checked(spec: CompressJob) -> Checked:
    parent = load_parent(spec.model)
    splits = in_memory(load_data(parent.spec), parent.spec, "compress")
    pipeline, task = rebuild(parent, splits)
    if getattr(pipeline.net, "generative", False):
        raise BadInput(f"method {spec.method.name}: {parent.ref} is a generative model (a GAN); compress takes "
                       "classifiers, regressors and language models")
    metric = "test_" + monitored(None, None, task)[0].removeprefix("val_")
    lines = [f"parent {parent.ref}: {parent.spec.model.name} on {parent.spec.data.name} "
             f"({len(splits.x_train)} train / {len(splits.x_test)} test)"]
    checked = Checked(parent, splits, pipeline, task, metric, lines)
    checked.lines += CHECKS[spec.method.name](spec, checked)
    return checked


def check(spec: CompressJob) -> str:
    """What `deepyard validate` prints: the parent, and what the method will do to it."""
    return "\n".join(_checked(spec).lines)


# ---- stages --------------------------------------------------------------------------------------

def _fine_tune(stage: TrainJob, label: str, settings: dict, checked: Checked, parent_run: str, registered: str,
               options: RunOptions) -> Produced:
    """One stage as a train job in its own child run; its result registered as a version."""
    from deepyard import progress
    from deepyard.runners.loop import Selection
    from deepyard.runners.train import TrainRun, final_state, fit, log_outcome

    child = tracking.start_run(stage.experiment, stage.name, flatten(stage), to_yaml(stage), kind="train",
                               tags={"mlflow.parentRunId": parent_run, "deepyard.compress_stage": stage.name})
    with tracking.finishing(child):
        selection = Selection(*monitored(stage.checkpoint.metric, stage.checkpoint.mode, checked.task),
                              checked.task.tie_breaker)
        with progress.watch(lambda: child, stage.train.epochs, options.console):
            result = fit(stage, TrainRun.opened(child), selection, checked.stored_splits, compress=settings)
        if getattr(result, "error", None):
            raise result.error
        final = final_state(result)
        checkpoints.tidy(result)
        pipeline = _stage_pipeline(stage, settings, checked.splits, final["model"])
        outcome = log_outcome(stage, checked.splits, child, final, registered_name=registered, pipeline=pipeline)
    return Produced(label, pipeline.eval(), final["test"], outcome, {}, child)


def _stage_pipeline(stage: TrainJob, settings: dict, splits, weights: dict) -> torch.nn.Module:
    """The network a stage's weights fit: the stage spec's, with the units a structured pruning removed
    removed again (the same ones: it is deterministic given the parent's weights)."""
    pipeline, _ = build(stage, splits)
    if settings.get("structured"):
        from deepyard import transfer
        from deepyard.compress.structured import remove_units

        transfer.start_from(stage.init, pipeline.net)
        remove_units(pipeline, torch.from_numpy(splits.x_train[:2]), settings["sparsity"])
    pipeline.load_state_dict(weights)
    return pipeline


def _prune(spec: CompressJob, checked: Checked, run_id: str, registered: str, options: RunOptions) -> list[Produced]:
    """Each sparsity in turn, from the last stage's weights: the weights it zeroed are the smallest."""
    from deepyard.compress.prune import sparsity

    produced, source = [], checked.parent.ref
    structured = spec.method.structured
    for amount in spec.method.sparsities:
        label = f"{'units' if structured else 'sparsity'}-{amount:g}"
        stage = stage_spec(spec, checked.parent, label, init_from=source)
        settings = {"method": "prune", "sparsity": amount, "structured": structured}
        result = _fine_tune(stage, label, settings, checked, run_id, registered, options)
        result.extra_tags = {"units_removed": f"{amount:g}"} if structured else {
            "sparsity": f"{sparsity(result.pipeline.net):.4f}"}
        produced.append(result)
        if not structured:  # each sparsity prunes the last stage further; units are removed from the parent
            source = f"{registered}:{result.outcome['model_version']}"
    return produced


def _quantize(spec: CompressJob, checked: Checked, run_id: str, registered: str, options: RunOptions) -> list[Produced]:
    """Post-training, on the driver: no fine-tuning to run."""
    quantized, serving = _quantized(spec, checked, checked.splits.x_train[:spec.method.calibration_samples])
    test = _score(quantized, checked)
    metadata = tracking.model_metadata(checked.parent.name, checked.parent.version)  # the same requests
    tags = {f"metric.{k}": f"{v:.6g}" for k, v in test.items()}
    outcome = tracking.log_model(run_id, serving, checked.splits.x_test[:5].copy(), registered_name=registered,
                                 metadata=metadata, version_tags={**tags, "run_id": run_id}, exportable=False)
    return [Produced(f"int8-{spec.method.mode}", quantized, test, outcome, {"mode": spec.method.mode}, run_id)]


def _quantized(spec: CompressJob, checked: Checked, calibration) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the quantized pipeline, its serving module as TorchScript); a BadInput if either step fails."""
    from deepyard.compress.quantize import for_serving, quantize_dynamic, quantize_static

    example = torch.from_numpy(checked.splits.x_test[:2].copy())
    try:
        quantized = (quantize_static(checked.pipeline, calibration) if spec.method.mode == "static"
                     else quantize_dynamic(checked.pipeline))
        return quantized, for_serving(checked.task.serving_module(quantized), example)
    except Exception as error:  # FX tracing or TorchScript refuses this network
        raise BadInput(f"method quantize, mode {spec.method.mode}: {checked.parent.ref} cannot be quantized "
                       f"({type(error).__name__}: {str(error)[:300]})") from None


def _distill(spec: CompressJob, checked: Checked, run_id: str, registered: str, options: RunOptions) -> list[Produced]:
    method = spec.method
    stage = stage_spec(spec, checked.parent, "student", init_from=None, model=method.student.model_dump(mode="json"),
                       augment=False)
    settings = {"method": "distill", "teacher": checked.parent.ref, "temperature": method.temperature,
                "alpha": method.alpha, "unlabeled": method.unlabeled}
    result = _fine_tune(stage, "student", settings, checked, run_id, registered, options)
    result.extra_tags = {"teacher": checked.parent.ref}
    return [result]


STAGES: dict[str, Callable[..., list[Produced]]] = {"prune": _prune, "quantize": _quantize, "distill": _distill}


def _score(pipeline: torch.nn.Module, checked: Checked) -> dict[str, float]:
    cpu = torch.device("cpu")
    test, _ = checked.task.test_metrics(pipeline, eval_loader(checked.splits.x_test, checked.splits.y_test, cpu),
                                        cpu, checked.splits, checked.parent.spec.train.seed)
    return test


# ---- the job -------------------------------------------------------------------------------------

def run(spec: CompressJob, options: RunOptions) -> RunSummary:
    from deepyard import cluster, plots

    checked = _checked(spec)
    parent, task, metric = checked.parent, checked.task, checked.metric
    registered = registered_name(spec, parent)
    example = torch.from_numpy(checked.splits.x_test[:64].copy())
    tags = {"deepyard.parent": parent.ref, "deepyard.method": spec.method.name, "deepyard.task": task.name}
    with tracking.job_run(spec, tags=tags, failure="compression failed",
                          killed_note="interrupted (Ctrl-C or SIGTERM); the versions registered so far stay") as run:
        with cluster.connected(options.address, options.ray_logs):
            run.mark("startup")
            produced = STAGES[spec.method.name](spec, checked, run.id, registered, options)
        # The parent and every version scored and measured here, side by side (the same split, the same moment)
        float_parent = checked.pipeline if spec.method.name == "quantize" else None
        servings = [task.serving_module(m) for m in [checked.pipeline, *(r.pipeline for r in produced)]]
        measured = measure.profiles(servings, example, [None] + [float_parent] * len(produced))
        before = {**_score(checked.pipeline, checked), **measured[0]}
        tracking.log_metrics(run.id, {f"parent_{k}": v for k, v in before.items()}, 0)
        rows = [{"label": "parent", "version": parent.ref, **before, "sparsity": 0.0}]
        for step, (result, profile) in enumerate(zip(produced, measured[1:]), start=1):
            after = {**result.test, **profile}
            version = result.outcome["model_version"]
            _tag_version(registered, version, spec, parent, before, after, result.extra_tags)
            tracking.log_metrics(run.id, {k: v for k, v in after.items()}, step)
            rows.append({"label": result.label, "version": f"{registered}:{version}", **after,
                         **{k: float(v) for k, v in result.extra_tags.items() if _is_number(v)}})
        if spec.promote:
            version = produced[-1].outcome["model_version"]
            promotion = tracking.promote(registered, version, spec.promote.alias,
                                         only_if_better=spec.promote.only_if_better, metric=metric,
                                         mode=monitored(None, None, task)[1])
        x = "sparsity" if spec.method.name == "prune" and not spec.method.structured else "stored_bytes"
        tracking.log_outputs(run.id, {
            "plots/accuracy_vs_size.png": plots.compression(rows, x, metric, x.replace("_", " ")),
            "compression.json": json.dumps(rows, indent=2)})
        run.mark("total")
    return RunSummary(run_id=run.id, experiment=spec.experiment, metrics=produced[-1].test, timings=run.timings,
                      details={"parent": parent.ref, "model_name": registered,
                               "model_version": produced[-1].outcome["model_version"], "versions": rows,
                               **({"promotion": promotion} if spec.promote else {})},
                      notes=[f"{row['version']}: {metric} {row.get(metric, float('nan')):.4f}, "
                             f"{row['stored_bytes'] / 1e6:.2f} MB, p50 {row['latency_ms_p50_batch1']:.2f} ms "
                             f"(batch 1)" for row in rows])


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _tag_version(name: str, version: str, spec: CompressJob, parent: Parent, before: dict, after: dict,
                 extra: dict[str, str]) -> None:
    """The version's tags: method, parent, size and latency, and each test metric's change against the
    parent (both scored here, on the same split)."""
    client = tracking.client()
    tags = {"compress.method": spec.method.name, "compress.parent": parent.ref,
            **{f"compress.{k}": v for k, v in extra.items()},
            **{f"compress.{k}": f"{v:.6g}" for k, v in after.items() if not k.startswith("test_")},
            **{f"compress.change.{k}": f"{after[k] - before[k]:+.6g}" for k in after if k.startswith("test_")},
            "compress.size_ratio": f"{before['stored_bytes'] / after['stored_bytes']:.3g}",
            "compress.speedup_batch1": f"{before['latency_ms_p50_batch1'] / after['latency_ms_p50_batch1']:.3g}",
            "compress.speedup_batch64": f"{before['latency_ms_p50_batch64'] / after['latency_ms_p50_batch64']:.3g}"}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
