"""The job-kind contract: one registration per kind, beside its spec class.

A kind is its spec class (``kind: <name>`` in YAML), the runner module that checks and runs it
(``check(spec) -> str``: what `deepyard validate` prints, before Ray starts; ``run(spec, options)
-> RunSummary``), whether ``--resume`` can continue it, and, if it can be a sweep's base, the module
that runs one trial of it (``runners/trials.py`` says what that module provides). The CLI and the
sweep runner ask this table; they never test a kind's name.
"""

from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass
from types import ModuleType
from typing import Callable


@dataclass(frozen=True)
class JobKind:
    name: str
    spec: type
    runner: str  # module path of the runner: check(spec) and run(spec, options)
    resumable: bool = False  # `deepyard run --resume` continues its last interrupted run
    trials: str | None = None  # module path of its sweep trials; None: it cannot be a sweep's base

    def runner_module(self) -> ModuleType:
        # Runners import lazily: they pull in Ray, which validating a spec does not need.
        return importlib.import_module(self.runner)

    def trials_module(self) -> ModuleType:
        if self.trials is None:
            raise TypeError(f"a {self.name} job cannot be a sweep's base")
        return importlib.import_module(self.trials)


KINDS: dict[str, JobKind] = {}


def job_kind(*, runner: str, resumable: bool = False, trials: str | None = None) -> Callable[[type], type]:
    """Register the decorated spec class as the job kind its ``kind`` field names."""

    def register(spec_class: type) -> type:
        (name,) = typing.get_args(spec_class.model_fields["kind"].annotation)
        if name in KINDS:
            raise ValueError(f"job kind {name!r} is registered twice")
        KINDS[name] = JobKind(name, spec_class, runner, resumable, trials)
        return spec_class

    return register


def sweep_bases() -> list[JobKind]:
    return [kind for kind in KINDS.values() if kind.trials]
