"""`kind: robustness`: how easily small input changes fool a registered classifier
(`runners/robustness.py`): FGSM and PGD at each epsilon, in the data's own units."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from deepyard.spec.kinds import job_kind
from deepyard.spec.sections import JobBase, Section


class PGDSpec(Section):
    steps: PositiveInt = Field(10, description="signed-gradient steps per restart")
    step_size: PositiveFloat | None = Field(None, description="per step, in the data's units; default 2.5 x "
                                                              "epsilon / steps")
    restarts: PositiveInt = Field(1, description="random starts in the epsilon ball; an example counts as "
                                                 "fooled if any fools the model")


@job_kind(runner="deepyard.runners.robustness")
class RobustnessJob(JobBase):
    """A registered classifier attacked at each epsilon, one Ray task per epsilon: the accuracy left
    (a table, a plot, the version's tags), and checks that the numbers are not an artefact of
    masked gradients (Carlini et al. 2019)."""

    kind: Literal["robustness"]
    model: str = Field(description="NAME@alias or NAME:version of a classifier registered by a train job")
    attacks: list[Literal["fgsm", "pgd"]] = Field(["fgsm", "pgd"], min_length=1)
    epsilons: list[PositiveFloat] = Field([0.05, 0.1, 0.2], min_length=1,
                                          description="L-infinity budgets in the data's own units (digits' pixels: "
                                                      "0-16; Fashion-MNIST's: 0-255), rising")
    pgd: PGDSpec = Field(default_factory=PGDSpec)
    examples: PositiveInt = Field(1000, description="test examples attacked (the first ones of the model's own "
                                                    "test split)")
    batch_size: PositiveInt = Field(256)
    seed: int = Field(0, ge=0, description="PGD's random starts")

    @model_validator(mode="after")
    def _rising(self) -> "RobustnessJob":
        if self.epsilons != sorted(set(self.epsilons)):
            raise ValueError(f"epsilons must rise, each once: {self.epsilons}")
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks name each attack once: {self.attacks}")
        return self

    def footprint(self, trial: bool = False) -> dict[str, float]:
        return {"CPU": 1.0}  # (one attack task at a time holds a CPU)
