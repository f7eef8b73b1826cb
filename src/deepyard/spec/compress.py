"""`kind: compress`: a registered model made smaller (`runners/compress.py`): pruned, quantized or
distilled into a new registered version that serves the same requests as its parent."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from deepyard.spec.kinds import job_kind
from deepyard.spec.sections import JobBase, PromoteSpec, RegisterSpec, Section, check_promote
from deepyard.spec.train import FailureSpec, ModelSpec, OptimSpec, ScalingSpec, TrainSpec, resolve_builder

Sparsity = Annotated[float, Field(gt=0, lt=1)]


class PruneMethod(Section):
    """Global magnitude pruning at each sparsity in turn, each stage fine-tuned (a Ray Train job)
    from the last; or, ``structured``, whole channels and neurons removed so that the stored model
    and its latency really shrink."""

    name: Literal["prune"]
    sparsities: list[Sparsity] = Field([0.5, 0.8, 0.9, 0.95], min_length=1,
                                       description="shares of weights removed, rising; each one is a version")
    structured: bool = Field(False, description="remove channels/neurons (Torch-Pruning) instead of masking weights")

    @model_validator(mode="after")
    def _rising(self) -> "PruneMethod":
        if self.sparsities != sorted(set(self.sparsities)):
            raise ValueError(f"sparsities must rise, each once: {self.sparsities}")
        return self


class QuantizeMethod(Section):
    """int8 after training, no fine-tuning: ``dynamic`` quantizes Linear and LSTM/GRU weights (any
    model); ``static`` weights and activations of every layer (CNNs: convolutions too), calibrated."""

    name: Literal["quantize"]
    mode: Literal["dynamic", "static"] = Field("dynamic", description="dynamic: Linear/LSTM/GRU weights; static: "
                                                                      "all layers, activations calibrated")
    calibration_samples: PositiveInt = Field(512, description="static: training inputs that set activation ranges")


class DistillMethod(Section):
    """A smaller student learns from the parent (the teacher): its softened outputs mixed with the labels."""

    name: Literal["distill"]
    student: ModelSpec = Field(description="the student network: a model builder and its params")
    temperature: PositiveFloat = Field(4.0, description="softens both distributions (Hinton et al. 2015)")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the teacher's soft targets; 1 - alpha: the labels'")
    unlabeled: bool = Field(True, description="also learn the teacher's outputs on training inputs whose labels "
                                              "a label budget withheld")


Method = Annotated[Union[PruneMethod, QuantizeMethod, DistillMethod], Field(discriminator="name")]


@job_kind(runner="deepyard.runners.compress")
class CompressJob(JobBase):
    """A registered model (the parent) pruned, quantized or distilled into a new registered version,
    tagged with its size, latency and test metrics against the parent's."""

    kind: Literal["compress"]
    model: str = Field(description="the parent: NAME@alias or NAME:version of a supervised model")
    method: Method
    optim: OptimSpec = Field(default_factory=lambda: OptimSpec(lr=3e-4),
                             description="the fine-tuning's (prune, distill); default: adam at 3e-4")
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=2),
                             description="fine-tuning epochs per stage and batch size; the data and its splits "
                                         "are the parent's")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec, description="a stage's worker-group restarts from "
                                                                          "its last checkpoint")
    register: RegisterSpec = Field(default_factory=RegisterSpec,
                                   description="default name: the parent's, plus -pruned, -int8 or -distilled")
    promote: PromoteSpec | None = Field(None, description="move a registry alias to the job's last version "
                                                          "(prune: the sparsest)")

    def footprint(self, trial: bool = False) -> dict[str, float]:
        return self.scaling.footprint()  # its fine-tuning stages train as a train job does

    @classmethod
    def resolve(cls, document: dict, problems: list[str], prefix: tuple = ()) -> None:
        """The optimizer and a distillation's student resolve through their registries, as a train job's do."""
        from deepyard.models import MODELS
        from deepyard.optim import OPTIMIZERS

        if isinstance(document.get("optim"), dict):  # left out: the compress default (adam at 3e-4)
            resolve_builder(document, "optim", OPTIMIZERS, problems, prefix)
        method = document.get("method")
        if isinstance(method, dict) and method.get("name") == "distill":
            resolve_builder(method, "student", MODELS, problems, (*prefix, "method"))

    @model_validator(mode="after")
    def _promote_needs_a_version(self) -> "CompressJob":
        if not self.register.enabled:
            raise ValueError("register.enabled: false: a compress job's result is its registered versions")
        return check_promote(self)
