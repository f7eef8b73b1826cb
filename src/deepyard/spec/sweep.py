"""`kind: sweep`: hyperparameter search on Ray Tune (`runners/sweep.py`) over any job kind that can
be a sweep's base (it registers a trials module): every path and every value of the space is
checked against the base job before anything starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pydantic
import yaml
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from deepyard.errors import SpecError
from deepyard.spec.kinds import KINDS, job_kind, sweep_bases
from deepyard.spec.sections import JobBase, MetricName, PromoteSpec, RegisterSpec, Section, check_promote
from deepyard.spec.loading import parse_spec
from deepyard.spec.space import distribution_problem, sample_values


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
    synchronous: bool = Field(
        False, description="PBT: every trial waits at each perturbation step until the whole population is there, "
                           "so every step exploits (reproducible, but trials pause and wait for stragglers); "
                           "false: a trial copies whichever better trial has a checkpoint when it reports")

    @model_validator(mode="after")
    def _mutations_are_for_pbt(self) -> "SchedulerSpec":
        if self.name == "pbt" and not self.mutations:
            raise ValueError("pbt needs mutations: the paths it may perturb, e.g. optim.lr: {loguniform: [1e-4, 1e-2]}")
        if self.name != "pbt" and self.mutations:
            raise ValueError(f"mutations are for scheduler pbt; {self.name} does not use them")
        if self.name != "pbt" and self.synchronous:
            raise ValueError(f"synchronous is for scheduler pbt; {self.name} does not use it")
        return self


@job_kind(runner="deepyard.runners.sweep", resumable=True)
class SweepJob(JobBase):
    """Hyperparameter search on Ray Tune; each trial is a job of the base's kind."""

    kind: Literal["sweep"]
    # SweepBase: the union of the kinds that can be a sweep's base, bound by bind_bases()
    base: SweepBase = Field(  # noqa: F821
        description="the job to vary (kind train or rl): a spec path (e.g. jobs/digits_mlp.yaml) or inline")
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
            raise ValueError("space is empty: give at least one path to vary, "
                             "e.g. optim.lr: {loguniform: [1e-4, 1e-2]}")
        if self.scheduler.name == "pbt":
            if self.search != "random":
                raise ValueError(f"scheduler pbt picks the next hyperparameters itself; use search: random "
                                 f"(not {self.search})")
            if problem := self.base.pbt_problem():
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _promote_needs_a_version(self) -> "SweepJob":
        return check_promote(self)

    @property
    def model_name(self) -> str:
        return self.register.model_name or self.base.register.model_name or self.name

    def footprint(self, trial: bool = False) -> dict[str, float]:
        """One trial's: the sweep starts when one fits and runs more as the cluster has room."""
        return self.base.footprint(trial=True)

    @classmethod
    def prepare(cls, document: dict, source: str, problems: list[str]) -> None:
        _resolve_base(document, source, problems)  # first, so that --set base.train.epochs=2 works

    @classmethod
    def resolve(cls, document: dict, problems: list[str], prefix: tuple = ()) -> None:
        if kind := _base_kind(document, problems):
            KINDS[kind].spec.resolve(document["base"], problems, (*prefix, "base"))

    @classmethod
    def check_document(cls, document: dict, problems: list[str]) -> None:
        _check_space(document, problems)

    @property
    def varied_paths(self) -> list[str]:
        """Every path a trial's config sets: the space's, then PBT's mutations."""
        return list(dict.fromkeys([*self.space, *self.scheduler.mutations]))

    @property
    def trials(self) -> int:
        """num_samples, defaulting to one pass over a grid (repeats would rerun identical seeds)."""
        has_grid = self.search == "grid" or any("grid" in d for d in self.space.values())
        return self.num_samples or (1 if has_grid else 8)


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
    """The base job's kind (train when not given): one that registered sweep trials."""
    base = document.get("base")
    if not isinstance(base, dict):
        return None
    kind = base.setdefault("kind", "train")
    bases = [k.name for k in sweep_bases()]
    if kind not in bases:
        problems.append(f"base.kind: a sweep varies a job of kind {' or '.join(sorted(bases))}, not a {kind!r} job")
        document.pop("base")
        return None
    return kind


def _check_space(document: dict, problems: list[str]) -> None:
    """Every path in ``space`` and PBT's ``scheduler.mutations`` must exist in the base job, and every
    value it can take must be valid there.

    Works on the raw document, so that these problems are reported next to any others."""
    scheduler = document.get("scheduler")
    spaces = {"space": document.get("space"),
              "scheduler.mutations": scheduler.get("mutations") if isinstance(scheduler, dict) else None}
    base = document.get("base")
    try:
        base = KINDS[base["kind"]].spec.model_validate(base).model_dump(mode="json")
    except (pydantic.ValidationError, TypeError, KeyError):
        base = None  # reported already; the distributions can still be checked
    for where, space in spaces.items():
        for path, distribution in (space.items() if isinstance(space, dict) else ()):
            if not isinstance(distribution, dict):
                continue  # the structural pass reports it
            if problem := distribution_problem(distribution):
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


def bind_bases() -> None:
    """The base's type: a union of every kind that can be a sweep's base (once all are registered)."""
    global SweepBase
    members = tuple(kind.spec for kind in sweep_bases())
    SweepBase = Annotated[Union[members], Field(discriminator="kind")] if len(members) > 1 else members[0]
    SweepJob.model_rebuild()
