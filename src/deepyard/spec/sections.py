"""What every job spec shares: the strict section base, the job base, registering and promoting."""

from __future__ import annotations

import warnings
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from deepyard.registry import unknown_name_message


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _known_metric(name: str) -> str:
    from deepyard.tasks import metric_directions  # the tasks say which metrics exist

    if name not in (known := metric_directions()):
        raise ValueError(unknown_name_message("metric", name, list(known)))
    return name


# A metric the tasks report (val_accuracy, val_rmse, eval_return_mean...): the tasks list them.
MetricName = Annotated[str, AfterValidator(_known_metric)]


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

    # Hooks of the loader (``loading.parse_spec``), on the raw YAML mapping, so that every problem is
    # reported at once, with its dotted path (``prefix``: where the mapping sits, e.g. a sweep's base).

    @classmethod
    def prepare(cls, document: dict, source: str, problems: list[str]) -> None:
        """Before --set overrides apply (a sweep reads its base file here)."""

    @classmethod
    def resolve(cls, document: dict, problems: list[str], prefix: tuple = ()) -> None:
        """After the overrides, before validation: names that resolve through registries."""

    @classmethod
    def check_document(cls, document: dict, problems: list[str]) -> None:
        """After validation: checks that need the whole document (a sweep's search space)."""

    def pbt_problem(self) -> str | None:
        """Why population-based training cannot vary this job, if it cannot."""
        return None

    def footprint(self, trial: bool = False) -> dict[str, float]:
        """The CPUs and GPUs the job's workers hold while it runs, beyond its driver (``CPU``, ``GPU``):
        what a cluster's queue admits it by (``deepyard submit``). ``trial``: as one trial of a sweep
        (which runs in a Tune trial's process, not in the driver)."""
        return {}


def check_promote(job):
    if job.promote and not job.register.enabled:
        raise ValueError("promote moves an alias to the new registered version; "
                         "it needs register.enabled: true (or drop promote)")
    return job


# `register` is also ABCMeta.register on the class; as a field it is what users expect to write.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)
