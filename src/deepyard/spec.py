"""The job spec: YAML -> validated pydantic models, a union keyed by ``kind``.

The only module that knows YAML. ``load_spec`` reports every problem in a file at once, each
naming the dotted path, the bad value and the fix, and starts nothing (no Ray, no MLflow).
"""

from __future__ import annotations

import copy
import json
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pydantic
import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat,
                      PositiveInt, model_validator)

from deepyard.errors import BadInput, SpecError
from deepyard.registry import Registry, did_you_mean, unknown_name_message
from deepyard.serve.options import EndpointOptions

MetricName = Literal["val_loss", "val_accuracy", "val_rmse", "val_mae", "val_bits_per_token", "val_perplexity",
                     "val_quality", "val_confident_share", "val_min_class_share", "val_d_loss", "val_g_loss",
                     "eval_return_mean", "return_mean"]  # (the last two: an rl sweep's)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentSpec(Section):
    """Random image augmentation applied to training batches only."""

    max_shift: float = Field(0.1, ge=0, le=0.5, description="largest shift, as a fraction of the image size")
    max_rotation_deg: float = Field(10.0, ge=0, le=180, description="largest rotation, in degrees")


class DataSpec(Section):
    name: str = Field(description="a data set name: digits, fashion_mnist, csv... (`deepyard data` lists them)")
    params: dict[str, Any] = Field(default_factory=dict, description="the data set builder's keyword arguments")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="share of the training data held out for validation")
    test_fraction: float = Field(0.15, ge=0, lt=1,
                                 description="share held out for the test; unused where a data set has its own test split")
    max_train_samples: PositiveInt | None = Field(None, description="train on at most this many samples (quick runs)")
    augment: AugmentSpec | None = Field(None, description="random shifts and rotations of training images")


class ModelSpec(Section):
    name: str = Field(description="a model builder: perceptron, mlp, cnn, cnn_lenet, cnn_resnet_small")
    params: dict[str, Any] = Field(default_factory=dict, description="the model builder's keyword arguments")


class ScheduleSpec(Section):
    name: Literal["constant", "step", "cosine", "onecycle"] = "constant"
    warmup_epochs: NonNegativeFloat = Field(0.0, description="linear warm-up from 0 over this many epochs")
    step_size: PositiveInt = Field(10, description="step: multiply the rate by gamma every step_size epochs")
    gamma: float = Field(0.1, gt=0, le=1, description="step: the decay factor")


class OptimSpec(Section):
    name: str = Field("adam", description="sgd, adam, adamw or rmsprop")
    lr: PositiveFloat = Field(1e-3, description="learning rate (the peak rate under a schedule)")
    weight_decay: NonNegativeFloat = Field(0.0, description="L2 penalty (decoupled for adamw)")
    params: dict[str, Any] = Field(default_factory=dict, description="momentum, nesterov, betas...: the optimizer's own")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)


class EarlyStoppingSpec(Section):
    metric: MetricName | None = Field(None, description="validation metric to watch; default: the task's (val_accuracy or val_rmse)")
    mode: Literal["min", "max"] | None = Field(None, description="default: max for accuracy, min otherwise")
    patience: PositiveInt = Field(5, description="epochs without improvement before stopping")
    min_delta: NonNegativeFloat = Field(0.0, description="smallest change that counts as an improvement")


class TrainSpec(Section):
    epochs: PositiveInt = 10
    batch_size: PositiveInt | Literal["full"] = Field(
        64, description="samples per step and worker: 1 is stochastic, 'full' is batch gradient descent")
    seed: int = Field(0, description="seeds the splits, the initial weights and the shuffling")
    early_stopping: EarlyStoppingSpec | None = None
    grad_clip: PositiveFloat | None = Field(None, description="clip the global gradient norm to this value")


class ScalingSpec(Section):
    num_workers: PositiveInt = Field(1, description="data-parallel training workers (DDP)")
    use_gpu: bool = Field(False, description="one GPU per worker; NCCL instead of gloo")
    cpus_per_worker: PositiveFloat = 1.0
    mixed_precision: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")


class CheckpointSpec(Section):
    every_n_epochs: PositiveInt = 1
    keep: PositiveInt = Field(2, description="keep the best K checkpoints by the validation metric")
    metric: MetricName | None = Field(None, description="default: the task's validation metric")
    mode: Literal["min", "max"] | None = None


class FailureSpec(Section):
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1: no limit")


class RegisterSpec(Section):
    enabled: bool = True
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                                   description="registered model name; default: the job's name")


class PromoteSpec(Section):
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
                       description="the registry alias that deploy serves by default")
    only_if_better: bool = Field(True, description="move the alias only if the new version beats its holder "
                                                   "on the same test metric")


class TrackingSpec(Section):
    experiment: str | None = Field(None, description="MLflow experiment; default: the job's name")


class JobBase(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                      description="letters, digits, '_', '.', '-'; names the experiment and the model")
    description: str = ""
    storage_path: str | None = Field(None, description="checkpoint storage (a shared URI on multi-node clusters); "
                                                       "default: $DEEPYARD_HOME/ray_results")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


def _check_promote(job):
    if job.promote and not job.register.enabled:
        raise ValueError("promote moves an alias to the new registered version; "
                         "it needs register.enabled: true (or drop promote)")
    return job


# `register` is also ABCMeta.register on the class; as a field it is what users expect to write.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class TrainJob(JobBase):
    """A supervised job on Ray Train: data -> model -> task loss -> optimizer."""

    kind: Literal["train"] = "train"
    data: DataSpec
    model: ModelSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    register: RegisterSpec = Field(default_factory=RegisterSpec)
    promote: PromoteSpec | None = Field(None, description="move a registry alias to the new version")

    @model_validator(mode="after")
    def _promote_needs_a_version(self) -> "TrainJob":
        return _check_promote(self)

    @property
    def model_name(self) -> str:
        return self.register.model_name or self.name


# Search-space distributions: name -> what its list holds (the error message says it too).
DISTRIBUTIONS = {
    "choice": "values to pick from", "grid": "values to try, every one",
    "uniform": "[low, high]", "loguniform": "[low, high], low > 0", "randint": "[low, high), integers",
    "quniform": "[low, high, step]", "qloguniform": "[low, high, step], low > 0", "normal": "[mean, std]",
}


class SchedulerSpec(Section):
    """Which trials to stop early (ASHA/Hyperband/median compare trials at the same epoch), or PBT:
    every ``perturbation_interval`` epochs the bottom ``quantile_fraction`` of trials copy a top
    trial's checkpoint and go on with its hyperparameters, perturbed within ``mutations``."""

    name: Literal["fifo", "asha", "hyperband", "median", "pbt"] = "asha"
    grace_period: PositiveInt = Field(1, description="epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA/Hyperband: keep 1/reduction_factor per rung")
    perturbation_interval: PositiveInt = Field(2, description="PBT: epochs between exploit/explore steps")
    mutations: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="PBT: dotted spec path -> distribution to perturb within")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="PBT: share of trials that copy a better one")
    resample_probability: float = Field(0.25, ge=0, le=1, description="PBT: chance to resample instead of "
                                                                       "scaling by 0.8/1.2 or stepping a choice")

    @model_validator(mode="after")
    def _mutations_are_for_pbt(self) -> "SchedulerSpec":
        if self.name == "pbt" and not self.mutations:
            raise ValueError("pbt needs mutations: the paths it may perturb, e.g. optim.lr: {loguniform: [1e-4, 1e-2]}")
        if self.name != "pbt" and self.mutations:
            raise ValueError(f"mutations are for scheduler pbt; {self.name} does not use them")
        return self


class SweepJob(JobBase):
    """Hyperparameter search on Ray Tune; each trial is a train job, or an rl job."""

    kind: Literal["sweep"]
    base: Annotated[Union["TrainJob", "RLJob"], Field(discriminator="kind")] = Field(
        description="the train or rl job to vary: a spec path (e.g. jobs/digits_mlp.yaml) or inline")
    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="dotted spec path -> {distribution: args}, e.g. optim.lr: {loguniform: [1e-4, 1e-2]}, "
                    "training.lr for an rl base")
    search: Literal["random", "grid", "optuna"] = Field("random", description="optuna is TPE")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: MetricName | None = Field(None, description="validation metric to optimize; default: the task's")
    mode: Literal["min", "max"] | None = None
    num_samples: PositiveInt | None = Field(None, description="trials; with a grid, repeats of the whole grid. "
                                                            "Default: 8, or 1 when the space has a grid")
    max_concurrent_trials: PositiveInt | None = Field(None, description="default: as many as the CPUs allow")
    time_budget_s: PositiveFloat | None = Field(None, description="stop starting trials after this many seconds")
    register: RegisterSpec = Field(default_factory=RegisterSpec)
    promote: PromoteSpec | None = Field(None, description="move a registry alias to the new version")

    @model_validator(mode="after")
    def _pbt_fits(self) -> "SweepJob":
        if not self.space and self.scheduler.name != "pbt":
            raise ValueError("space is empty: give at least one path to vary, e.g. optim.lr: {loguniform: [1e-4, 1e-2]}")
        if self.scheduler.name == "pbt":
            if self.search != "random":
                raise ValueError(f"scheduler pbt picks the next hyperparameters itself; use search: random "
                                 f"(not {self.search})")
            if isinstance(self.base, TrainJob) and self.base.scaling.num_workers != 1:
                raise ValueError("scheduler pbt runs each trial in one process (it copies checkpoints between "
                                 "trials); set base.scaling.num_workers: 1")
        return self

    @model_validator(mode="after")
    def _promote_needs_a_version(self) -> "SweepJob":
        return _check_promote(self)

    @property
    def model_name(self) -> str:
        return self.register.model_name or self.base.register.model_name or self.name

    @property
    def varied_paths(self) -> list[str]:
        """Every path a trial's config sets: the space's, then PBT's mutations."""
        return list(dict.fromkeys([*self.space, *self.scheduler.mutations]))

    @property
    def trials(self) -> int:
        """num_samples, defaulting to one pass over a grid (repeats would rerun identical seeds)."""
        has_grid = self.search == "grid" or any("grid" in d for d in self.space.values())
        return self.num_samples or (1 if has_grid else 8)


class HttpSpec(Section):
    host: str = Field("127.0.0.1", description="0.0.0.0 listens beyond this machine")
    port: int = Field(8000, ge=1, le=65535)


class DeployJob(JobBase):
    """Registered models served over HTTP by Ray Serve, one application per model (`deepyard deploy`)."""

    kind: Literal["deploy"]
    models: list[EndpointOptions] = Field(min_length=1, description="one entry per model: model: NAME[@alias|:version], "
                                                                    "replicas, batching, limits...")
    http: HttpSpec = Field(default_factory=HttpSpec)
    detach: bool = Field(False, description="leave the endpoints on the running cluster (needs --address)")
    fast_proxy: bool = Field(True, description="local cluster: Serve's HAProxy high-throughput mode")


class EnvSpec(Section):
    id: str = Field(description="a registered gymnasium id: CartPole-v1, Acrobot-v1, Pendulum-v1, MountainCar-v0...")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for gymnasium.make")


class EnvRunnersSpec(Section):
    count: int = Field(1, ge=0, description="EnvRunner actors sampling in parallel (0: sample in the driver)")
    envs_per_runner: PositiveInt = Field(1, description="vectorized environments in each runner")


class PolicyNetSpec(Section):
    hidden_sizes: list[PositiveInt] = Field(default_factory=lambda: [64, 64], description="the policy's MLP layers")
    activation: Literal["tanh", "relu", "silu", "linear"] = "tanh"
    head_hidden_sizes: list[PositiveInt] = Field(default_factory=list, description="hidden layers of the output "
                                                 "heads (e.g. DQN's dueling value and advantage streams)")
    vf_share_layers: bool = Field(False, description="the value function shares the policy's hidden layers "
                                  "(RLlib's default; separate networks, as in stable-baselines3, learn "
                                  "CartPole several times faster with PPO)")


class RLStopSpec(Section):
    """Stop at whichever comes first."""

    mean_return: float | None = Field(None, description="the evaluation mean return to reach (the training "
                                                         "return without evaluation)")
    timesteps: PositiveInt | None = Field(100_000, description="environment steps sampled")
    time_s: PositiveFloat | None = Field(None, description="seconds of training")
    iterations: PositiveInt | None = Field(None, description="training iterations")


class RLEvaluationSpec(Section):
    interval: int = Field(1, ge=0, description="evaluate every N iterations with the greedy policy (0: never)")
    episodes: PositiveInt = Field(10, description="episodes per evaluation")


class RLCheckpointSpec(Section):
    every_n_iterations: PositiveInt = Field(10, description="save the algorithm's state every N iterations")


class RLJob(JobBase):
    """A reinforcement-learning agent trained by RLlib on a gymnasium environment (`deepyard run`)."""

    kind: Literal["rl"]
    algorithm: Literal["ppo", "dqn", "sac", "appo", "impala"]
    env: EnvSpec
    env_runners: EnvRunnersSpec = Field(default_factory=EnvRunnersSpec)
    training: dict[str, Any] = Field(default_factory=dict, description="the algorithm's hyperparameters, RLlib's "
                                     "names: lr, gamma, lambda_, train_batch_size_per_learner, minibatch_size, "
                                     "num_epochs, entropy_coeff, clip_param...")
    model: PolicyNetSpec = Field(default_factory=PolicyNetSpec)
    stop: RLStopSpec = Field(default_factory=RLStopSpec)
    evaluation: RLEvaluationSpec = Field(default_factory=RLEvaluationSpec)
    checkpoint: RLCheckpointSpec = Field(default_factory=RLCheckpointSpec)
    seed: int = 0
    register: RegisterSpec = Field(default_factory=RegisterSpec)

    @property
    def model_name(self) -> str:
        return self.register.model_name or self.name


SweepJob.model_rebuild()  # its base may be an RLJob, defined after it

# One entry per job kind; runners/__init__.py holds the matching runner for each (a test keeps them in sync).
KINDS: dict[str, type[JobBase]] = {"train": TrainJob, "sweep": SweepJob, "deploy": DeployJob, "rl": RLJob}


def _builder_registries() -> dict[str, Registry]:
    from deepyard.data import DATASETS
    from deepyard.models import MODELS
    from deepyard.optim import OPTIMIZERS

    return {"data": DATASETS, "model": MODELS, "optim": OPTIMIZERS}


# ---------------------------------------------------------------- loading and error reporting


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if found := _unwrap_model(arg):
                return found
    return None


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    annotation: Any = model
    for part in loc:
        if typing.get_origin(annotation) is list:  # models.0 -> the list's item type
            annotation = typing.get_args(annotation)[0]
            continue
        model = _unwrap_model(annotation)
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
    model = _unwrap_model(annotation)
    return list(model.model_fields) if model else []


def _data_path(loc: tuple, data: Any) -> tuple:
    """``loc`` without the names pydantic gives union members ("constrained-int", "literal['full']"):
    a part is kept only where it is a key (or index) of the user's data."""
    kept = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        elif isinstance(data, dict) or isinstance(part, int):
            data = None  # a missing key, or a list index: still a real path part
        else:
            continue  # a union member's tag
        kept.append(part)
    return tuple(kept)


def _describe_errors(errors: list[dict], root: type[BaseModel], data: Any) -> list[str]:
    """As ``_describe_all``; a sweep's base is described as its own job kind. Pydantic names the
    union member in the path (``base.train...``, ``base.rl...``): that tag is dropped, and the
    member's fields are the ones listed."""
    tagged = {kind: [] for kind in KINDS}
    rest = []
    for error in errors:
        loc = tuple(error["loc"])
        if root is SweepJob and len(loc) > 1 and loc[0] == "base" and loc[1] in tagged:
            tagged[loc[1]].append({**error, "loc": loc[2:]})
        else:
            rest.append(error)
    problems = _describe_all(rest, root, data)
    for kind, base_errors in tagged.items():
        if base_errors:
            problems += _describe_all(base_errors, KINDS[kind], data.get("base"), ("base",))
    return problems


def _describe_all(errors: list[dict], root: type[BaseModel] | None, data: Any,
                  prefix: tuple = ()) -> list[str]:
    """One line per path: the failures of a union's members are merged into one line."""
    merged: dict[tuple, dict] = {}
    for error in errors:
        loc = _data_path(tuple(error["loc"]), data)
        if loc in merged and error["type"] not in ("extra_forbidden", "missing"):
            merged[loc]["msg"] += " or " + error["msg"].removeprefix("Input should be ")
        else:
            merged[loc] = {**error, "loc": loc}
    return [_describe(error, root, prefix) for error in merged.values()]


def _describe(error: dict, root: type[BaseModel] | None, prefix: tuple = ()) -> str:
    loc = tuple(error["loc"])
    path = _dotted(prefix + loc)
    if error["type"] == "extra_forbidden" and loc:
        valid = _fields_at(root, loc[:-1])
        return f"{path}: unknown field{did_you_mean(str(loc[-1]), valid)} (valid: {', '.join(valid)})"
    if error["type"] == "missing":
        return f"{path}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message} (got {error['input']!r})"


def _check_builders(document: dict, problems: list[str], prefix: tuple = ()) -> None:
    """Names resolve through the registries; ``params`` must match the builder's signature."""
    dotted = "".join(f"{part}." for part in prefix)
    for section, registry in _builder_registries().items():
        default = OptimSpec.model_fields["name"].default if section == "optim" else None
        if default and document.get(section) is None:  # optim may be left out: resolve its params too
            document[section] = {}
        body = document.get(section)
        name = body.get("name", default) if isinstance(body, dict) else None
        if not isinstance(name, str):
            continue  # the structural pass reports it
        if name not in registry:
            problems.append(f"{dotted}{section}.name: {unknown_name_message(registry.what, name, registry.names())}")
            continue
        params = body.get("params", {})
        if not isinstance(params, dict):
            continue
        try:
            body["params"] = registry.params_model(name).model_validate(params).model_dump(mode="json")
        except pydantic.ValidationError as error:
            schema = registry.params_model(name)
            problems += _describe_all(error.errors(), schema, params, (*prefix, section, "params"))


def apply_overrides(document: dict, overrides: list[str], problems: list[str]) -> None:
    """``train.epochs=3`` sets a dotted path; the value is parsed as YAML (3 -> int, [8, 8] -> list)."""
    for override in overrides:
        path, sep, text = override.partition("=")
        if not sep or not path.strip():
            problems.append(f"--set {override!r}: expected dotted.path=value, e.g. --set train.epochs=3")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        keys = path.strip().split(".")
        node = document
        for key in keys[:-1]:
            if node.get(key) is None:  # absent, or left empty in the YAML
                node[key] = {}
            if not isinstance(node[key], dict):
                problems.append(f"--set {override!r}: {key} is not a section")
                break
            node = node[key]
        else:
            node[keys[-1]] = value


def parse_spec(document: Any, source: str = "<spec>", overrides: list[str] | None = None) -> JobBase:
    problems: list[str] = []
    if not isinstance(document, dict):
        raise SpecError(source, [f"(top level): expected a mapping with kind, name, data, model..., got {type(document).__name__}"])
    document = copy.deepcopy(document)  # overrides and resolved params are written into it
    kind = document.get("kind", "train")
    job_class = KINDS.get(kind) if isinstance(kind, str) else None
    if job_class is None:
        problems.append(f"kind: {unknown_name_message('job kind', str(kind), list(KINDS))}")
        raise SpecError(source, problems)
    if job_class is SweepJob:
        _resolve_base(document, source, problems)  # first, so that --set base.train.epochs=2 works
    apply_overrides(document, overrides or [], problems)
    if job_class is SweepJob:
        if _base_kind(document, problems) == "train":
            _check_builders(document["base"], problems, ("base",))
    elif job_class is TrainJob:
        _check_builders(document, problems)
    spec = None
    try:
        spec = job_class.model_validate(document)
    except pydantic.ValidationError as error:
        problems += _describe_errors(error.errors(), job_class, document)
    if job_class is SweepJob:
        _check_space(document, problems)
    if problems:
        raise SpecError(source, problems)
    return spec


def _resolve_base(document: dict, source: str, problems: list[str]) -> None:
    """``base: jobs/x.yaml`` -> that file's mapping (a path is tried from here, then beside the sweep)."""
    base = document.get("base")
    if not isinstance(base, str):
        return
    candidates = [Path(base), Path(source).parent / base]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        problems.append(f"base: no spec file {base!r} (looked in . and {Path(source).parent})")
        document.pop("base")
        return
    try:
        loaded = yaml.safe_load(found.read_text())
    except yaml.YAMLError as error:
        problems.append(f"base: {found} is not valid YAML: {getattr(error, 'problem', error)}")
        document.pop("base")
        return
    document["base"] = loaded


def _base_kind(document: dict, problems: list[str]) -> str | None:
    """The base job's kind (train when not given); a sweep varies a train or an rl job."""
    base = document.get("base")
    if not isinstance(base, dict):
        return None
    kind = base.setdefault("kind", "train")
    if kind not in ("train", "rl"):
        problems.append(f"base.kind: a sweep varies a train or an rl job, not a {kind!r} job")
        document.pop("base")
        return None
    return kind


def _distribution_problem(distribution: dict[str, Any]) -> str | None:
    if len(distribution) != 1 or next(iter(distribution)) not in DISTRIBUTIONS:
        names = ", ".join(f"{name} ({args})" for name, args in DISTRIBUTIONS.items())
        given = ", ".join(map(str, distribution)) or "nothing"
        return f"expected one distribution, got {given}; one of: {names}"
    kind, args = next(iter(distribution.items()))
    if not isinstance(args, list) or not args:
        return f"{kind} takes a list: {DISTRIBUTIONS[kind]}"
    if kind in ("choice", "grid"):
        return None
    expected = 3 if kind.startswith("q") else 2
    if len(args) != expected or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        return f"{kind} takes {expected} numbers: {DISTRIBUTIONS[kind]}"
    if kind != "normal" and args[0] >= args[1]:
        return f"{kind}: low must be below high, got {args[0]} >= {args[1]}"
    if "log" in kind and args[0] <= 0:
        return f"{kind}: low must be > 0, got {args[0]}"
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        return "randint takes two integers"
    return None


def sample_values(distribution: dict[str, Any]) -> list[Any]:
    """Values that stand for a distribution when checking a path: every choice, or both bounds."""
    kind, args = next(iter(distribution.items()))
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0]] if kind == "normal" else [args[0], args[1]]


def _check_space(document: dict, problems: list[str]) -> None:
    """Every path in ``space`` and PBT's ``scheduler.mutations`` must exist in the base job, and every
    value it can take must be valid there.

    Works on the raw document, so that these problems are reported next to any others."""
    scheduler = document.get("scheduler")
    spaces = {"space": document.get("space"),
              "scheduler.mutations": scheduler.get("mutations") if isinstance(scheduler, dict) else None}
    base = document.get("base")
    try:
        base = KINDS[base["kind"]].model_validate(base).model_dump(mode="json")
    except (pydantic.ValidationError, TypeError, KeyError):
        base = None  # reported already; the distributions can still be checked
    for where, space in spaces.items():
        for path, distribution in (space.items() if isinstance(space, dict) else ()):
            if not isinstance(distribution, dict):
                continue  # the structural pass reports it
            if problem := _distribution_problem(distribution):
                problems.append(f"{where}.{path}: {problem}")
                continue
            if "grid" in distribution and (where != "space" or document.get("search") == "optuna"):
                sampler = "pbt" if where != "space" else "optuna"
                problems.append(f"{where}.{path}: {sampler} samples, it cannot walk a grid; use choice instead of grid")
            if base is None:
                continue
            for value in sample_values(distribution):
                try:
                    parse_spec(base, "base", [f"{path}={json.dumps(value)}"])
                except SpecError as error:
                    problems += [f"{where}.{path}={value!r}: {p}" for p in error.problems]
                    break


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobBase:
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"{file}: no such spec file")
    try:
        document = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError(str(file), [f"not valid YAML{line}: {problem}"]) from None
    return parse_spec(document, str(file), overrides)


def to_yaml(spec: JobBase) -> str:
    """The resolved spec (defaults filled in): enough to reproduce the run."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def flatten(spec: JobBase) -> dict[str, str]:
    """``{"train.epochs": "10", ...}``: the resolved spec as MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = str(value)

    walk("", spec.model_dump(mode="json"))
    return flat
