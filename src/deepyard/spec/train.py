"""`kind: train`: a supervised job on Ray Train (`runners/train.py`). Data, model and optimizer
names resolve through their registries; a builder's signature is the schema of its ``params``."""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from deepyard.explain.options import ExplainJob
from deepyard.fairness.options import FairnessSpec
from deepyard.registry import Registry, unknown_name_message
from deepyard.spec.kinds import job_kind
from deepyard.spec.problems import describe_all
from deepyard.spec.sections import JobBase, MetricName, PromoteSpec, RegisterSpec, Section, check_promote


def _registries() -> dict[str, Registry]:
    from deepyard.data import DATASETS
    from deepyard.models import MODELS
    from deepyard.optim import OPTIMIZERS

    return {"data": DATASETS, "model": MODELS, "optim": OPTIMIZERS}


def _names(section: str) -> str:
    return ", ".join(_registries()[section].names())


def _monitors() -> str:
    from deepyard.tasks import TASKS

    return "; ".join(f"{task.monitor} for {name}" for name, task in TASKS.items() if hasattr(task, "monitor"))


def resolve_builder(document: dict, section: str, registry: Registry, problems: list[str], prefix: tuple = ()) -> None:
    """``document[section]`` names a builder of ``registry`` and its ``params`` fit its signature (the
    params are normalized in place); each problem is added with its dotted path."""
    default = OptimSpec.model_fields["name"].default if registry.what == "optimizer" else None
    if default and document.get(section) is None:  # optim may be left out: resolve its params too
        document[section] = {}
    body = document.get(section)
    name = body.get("name", default) if isinstance(body, dict) else None
    if not isinstance(name, str):
        return  # the structural pass reports it
    if name not in registry:
        dotted = "".join(f"{part}." for part in prefix)
        problems.append(f"{dotted}{section}.name: {unknown_name_message(registry.what, name, registry.names())}")
        return
    params = body.get("params", {})
    if not isinstance(params, dict):
        return
    try:
        body["params"] = registry.params_model(name).model_validate(params).model_dump(mode="json")
    except pydantic.ValidationError as error:
        problems += describe_all(error.errors(), registry.params_model(name), params, (*prefix, section, "params"))


class AugmentSpec(Section):
    """Random image augmentation applied to training batches only."""

    max_shift: float = Field(0.1, ge=0, le=0.5, description="largest shift, as a fraction of the image size")
    max_rotation_deg: float = Field(10.0, ge=0, le=180, description="largest rotation, in degrees")


class StreamSpec(Section):
    """How a streaming source (image_folder; csv or parquet folders, or files given ``stream:``) is read
    each epoch by Ray Data."""

    shuffle: Literal["local", "full", "none"] = Field(
        "local", description="local: the files in a new order each epoch, mixed further in a buffer of "
                             "shuffle_buffer samples on the worker; full: a global shuffle each epoch (Ray Data's "
                             "random_shuffle: slower, spills to disk); none: the listed order")
    shuffle_buffer: PositiveInt = Field(2048, description="local shuffle: samples each worker mixes at a time")
    prefetch_batches: PositiveInt = Field(2, description="batches each worker decodes ahead of the step")


class DataSpec(Section):
    name: str = Field(description=f"a data set: {_names('data')}")
    params: dict[str, Any] = Field(default_factory=dict, description="the data set builder's keyword arguments")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="share of the training data held out for validation")
    test_fraction: float = Field(0.15, ge=0, lt=1,
                                 description="share held out for the test; unused where a data set has its own "
                                             "test split")
    max_train_samples: PositiveInt | None = Field(None, description="train on at most this many samples (quick runs)")
    seed: int | None = Field(None, description="seeds the splits (and a label budget); default: train.seed. A "
                                               "compress job keeps its parent's, so both score the same test split")
    augment: AugmentSpec | None = Field(None, description="random shifts and rotations of training images")
    stream: StreamSpec | None = Field(None, description="stream through Ray Data, shuffled and read ahead as set here "
                                                        "(`{}`: the defaults). image_folder, and csv or parquet "
                                                        "folders, globs, lists and URIs, always stream; one local "
                                                        "csv or parquet file streams only when this is set")


class ModelSpec(Section):
    name: str = Field(description=f"a model builder: {_names('model')}")
    params: dict[str, Any] = Field(default_factory=dict, description="the model builder's keyword arguments")


class ScheduleSpec(Section):
    name: Literal["constant", "step", "cosine", "onecycle"] = "constant"
    warmup_epochs: NonNegativeFloat = Field(0.0, description="linear warm-up from 0 over this many epochs")
    step_size: PositiveInt = Field(10, description="step: multiply the rate by gamma every step_size epochs")
    gamma: float = Field(0.1, gt=0, le=1, description="step: the decay factor")


class ParamGroupSpec(Section):
    """Parameters whose names match get their own rate: a pretrained body learning 10x slower than a
    new head (discriminative learning rates). The first group that matches a parameter takes it."""

    match: str = Field(description="a regex searched in the network's parameter names (body.0.weight, head.4.bias)")
    lr: PositiveFloat = Field(description="this group's (peak) learning rate")
    weight_decay: NonNegativeFloat | None = Field(None, description="default: optim.weight_decay")


class OptimSpec(Section):
    name: str = Field("adam", description=f"an optimizer: {_names('optim')}")
    lr: PositiveFloat = Field(1e-3, description="learning rate (the peak rate under a schedule)")
    weight_decay: NonNegativeFloat = Field(0.0, description="L2 penalty (decoupled for adamw)")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="momentum, nesterov, betas...: the optimizer's own")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    param_groups: list[ParamGroupSpec] = Field(default_factory=list,
                                               description="rates per parameter group; the rest use optim.lr")


class InitSpec(Section):
    """Start from another model's weights (transfer learning): copy, optionally freeze, fine-tune."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    from_: str = Field(alias="from", description="NAME@alias or NAME:version (a registered model), or a local "
                                                 "state-dict file (.pt)")
    modules: list[str] | None = Field(None, description="regexes of the parameter names to copy; default: every "
                                                        "tensor, with a new output layer where the class count "
                                                        "differs")
    freeze: list[str] = Field(default_factory=list, description="regexes of parameters that do not train "
                                                                "(frozen batch norms keep their statistics)")
    unfreeze_at_epoch: PositiveInt | None = Field(None, description="from this epoch on, everything trains")


class EarlyStoppingSpec(Section):
    metric: MetricName | None = Field(None, description=f"validation metric to watch; default: the task's "
                                                         f"({_monitors()})")
    mode: Literal["min", "max"] | None = Field(None, description="default: the metric's own direction")
    patience: PositiveInt = Field(5, description="epochs without improvement before stopping")
    min_delta: NonNegativeFloat = Field(0.0, description="smallest change that counts as an improvement")


class AdversarialSpec(Section):
    """Adversarial training (Madry et al. 2018): each batch partly replaced by attacks on the model."""

    method: Literal["pgd", "fgsm"] = "pgd"
    epsilon: PositiveFloat = Field(description="L-infinity budget in the data's own units (digits' pixels: 0-16)")
    steps: PositiveInt = Field(7, description="pgd: signed-gradient steps per batch")
    step_size: PositiveFloat | None = Field(None, description="pgd: default 2.5 x epsilon / steps")
    mix: float = Field(1.0, gt=0, le=1, description="share of each batch replaced by adversarial examples "
                                                    "(1: Madry et al.; 0.5: Goodfellow et al.'s mix)")


class TrainSpec(Section):
    epochs: PositiveInt = 10
    batch_size: PositiveInt | Literal["full"] = Field(
        64, description="samples per step and worker: 1 is stochastic, 'full' is batch gradient descent")
    seed: int = Field(0, description="seeds the splits, the initial weights and the shuffling")
    early_stopping: EarlyStoppingSpec | None = None
    grad_clip: PositiveFloat | None = Field(None, description="clip the global gradient norm to this value")
    adversarial: AdversarialSpec | None = Field(None, description="train on adversarial examples too")
    class_weight: Literal["balanced"] | None = Field(
        None, description="classification: weigh each class's loss by n / (classes x its count in the training "
                          "split), as scikit-learn's class_weight='balanced': a rare class is not outvoted")


class ScalingSpec(Section):
    num_workers: PositiveInt = Field(1, description="data-parallel training workers (DDP)")
    use_gpu: bool = Field(False, description="one GPU per worker; NCCL instead of gloo")
    cpus_per_worker: PositiveFloat = 1.0
    mixed_precision: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")

    def footprint(self) -> dict[str, float]:
        return {"CPU": self.num_workers * self.cpus_per_worker, "GPU": float(self.num_workers if self.use_gpu else 0)}


class CheckpointSpec(Section):
    every_n_epochs: PositiveInt = 1
    keep: PositiveInt = Field(2, description="keep the best K checkpoints by the validation metric")
    metric: MetricName | None = Field(None, description=f"default: the task's ({_monitors()}); epochs that tie "
                                                         "on it are ranked by val_loss")
    mode: Literal["min", "max"] | None = Field(None, description="default: the metric's own direction")


class FailureSpec(Section):
    max_failures: int = Field(0, ge=-1, description="restarts from the last checkpoint; -1: no limit")


@job_kind(runner="deepyard.runners.train", resumable=True, trials="deepyard.runners.train_trials")
class TrainJob(JobBase):
    """A supervised job on Ray Train: data -> model -> task loss -> optimizer."""

    kind: Literal["train"] = "train"
    data: DataSpec
    model: ModelSpec
    init: InitSpec | None = Field(None, description="start from a registered model's weights (transfer learning)")
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    register: RegisterSpec = Field(default_factory=RegisterSpec)
    promote: PromoteSpec | None = Field(None, description="move a registry alias to the new version")
    explain: ExplainJob | None = Field(None, description="attribution pictures of the first test examples, "
                                                         "logged to the run under explanations/")
    fairness: FairnessSpec | None = Field(None, description="per-group metrics and disparities of a classifier "
                                                            "on a table, and optionally a mitigated version")

    @model_validator(mode="after")
    def _promote_needs_a_version(self) -> "TrainJob":
        return check_promote(self)

    def footprint(self, trial: bool = False) -> dict[str, float]:
        return self.scaling.footprint()

    @property
    def model_name(self) -> str:
        return self.register.model_name or self.name

    @classmethod
    def resolve(cls, document: dict, problems: list[str], prefix: tuple = ()) -> None:
        """Names resolve through the registries; ``params`` must match the builder's signature."""
        for section, registry in _registries().items():
            resolve_builder(document, section, registry, problems, prefix)

    def pbt_problem(self) -> str | None:
        if self.scaling.num_workers != 1:
            return ("scheduler pbt runs each trial in one process (it copies checkpoints between trials); "
                    "set base.scaling.num_workers: 1")
        return None
